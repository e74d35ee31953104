//! Hosts as real containers for `tests/system/containers.rs`: a Debian bookworm
//! root filesystem (built once by `tests/system/build-image.sh`, cached
//! under `/var/cache/deploy-agent-tests`) booted N times with `systemd-nspawn --boot`,
//! each with a real systemd as PID 1, its own journald, and its own network
//! namespace on a bridge in the root namespace (the fleet tests' plan, in
//! 198.19.<subnet>.0/24: half of 198.18.0.0/15, so the two suites never
//! share a subnet). The package under test (`debian/build-deb.sh`) is
//! installed inside each container with `dpkg -i`, as an operator would.
//!
//! Each nspawn runs in a cgroup of its own (`dac-<test pid>-<name>`): the
//! host's PID 1 is not systemd, and containers sharing one cgroup would run
//! their systemd instances in the same cgroup tree and hang at boot.
//!
//! Crash guarantees: every container, cgroup, overlay mount, veth and
//! namespace is owned by a value here whose `Drop` removes it, panics
//! included. nspawn is spawned with `PR_SET_PDEATHSIG=SIGTERM`, so if the
//! test process is killed outright the containers still shut down; only
//! the bridge, the namespaces, empty cgroups and a persistent overlay's
//! mount would then stay behind, all named after the dead test's pid
//! (`dac*`), never reused.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The longest any one command inside a container may take (`dpkg -i`,
/// `systemctl restart` waiting out a stop timeout, a polling loop).
pub const EXEC_LIMIT: Duration = Duration::from_secs(240);

/// `DEPLOY_AGENT_CONTAINERS`: `require` (CI) turns every reason to skip
/// into a failure; `skip` skips; unset runs when possible.
pub const MODE_ENV: &str = "DEPLOY_AGENT_CONTAINERS";
/// A prebuilt package to test instead of building one.
pub const DEB_ENV: &str = "DEPLOY_AGENT_DEB";

/// The repository root (the root package's manifest dir).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn mode() -> String {
    std::env::var(MODE_ENV).unwrap_or_default()
}

/// Whether the suite must run (CI) rather than skip.
pub fn required() -> bool {
    mode() == "require"
}

/// Why the container suite cannot run here, if it cannot.
pub fn unsupported() -> Option<String> {
    if mode() == "skip" {
        return Some(format!("{MODE_ENV}=skip"));
    }
    if !crate::disk::is_root() {
        return Some("not root: nspawn, network namespaces and debootstrap need root".into());
    }
    for (tool, pkg) in [
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
    ] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!(
                "`{tool}` is missing (apt-get install {pkg}; .ci/run does)"
            ));
        }
    }
    if std::env::var_os(DEB_ENV).is_none() {
        let deb = Command::new(env!("CARGO"))
            .args(["deb", "--version"])
            .output();
        if !deb.is_ok_and(|o| o.status.success()) {
            return Some(format!(
                "cargo-deb is missing (cargo install cargo-deb --locked; .ci/run does), \
                 or set {DEB_ENV} to a built package"
            ));
        }
    }
    None
}

fn run_script(script: &Path, what: &str) -> Result<PathBuf, String> {
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(script)
        .env("CARGO", env!("CARGO"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", script.display(), out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default().trim().to_string();
    eprintln!(
        "[containers] {what}: {last} ({:.0} s)",
        start.elapsed().as_secs_f64()
    );
    Ok(PathBuf::from(last))
}

/// The cached base image (built on first use: about 4 minutes).
pub fn image() -> Result<PathBuf, String> {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| run_script(&repo().join("tests/system/build-image.sh"), "base image"))
        .clone()
}

/// The package under test: `$DEPLOY_AGENT_DEB`, else built now.
///
/// `.ci/run` builds the package in the background while the other tests
/// run, and names it here before it exists: the suite waits for the file,
/// or for `<deb>.failed`, which the build writes when it fails (with its
/// log beside it as `<deb>.log`).
pub fn package() -> Result<PathBuf, String> {
    static DEB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DEB.get_or_init(|| match std::env::var_os(DEB_ENV) {
        Some(p) => wait_for_package(PathBuf::from(p)),
        None => run_script(&repo().join("debian/build-deb.sh"), "package"),
    })
    .clone()
}

fn wait_for_package(deb: PathBuf) -> Result<PathBuf, String> {
    let failed = PathBuf::from(format!("{}.failed", deb.display()));
    let start = Instant::now();
    // A cold optimized build of the package takes minutes on 2 cores.
    let limit = Duration::from_secs(30 * 60);
    let built = crate::poll_until(limit, Duration::from_millis(500), || {
        if deb.is_file() {
            Ok(true)
        } else if failed.exists() {
            Ok(false)
        } else {
            Err(())
        }
    });
    match built {
        Ok(true) => {
            eprintln!(
                "[containers] package {} ready after waiting {:.0} s",
                deb.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(deb)
        }
        Ok(false) => Err(format!(
            "building {DEB_ENV}={} failed: see {}.log",
            deb.display(),
            deb.display()
        )),
        Err(()) => Err(format!(
            "{DEB_ENV}={} did not appear within {limit:?}",
            deb.display()
        )),
    }
}

use crate::netns::must;
pub use crate::netns::{run, Net};

/// A read-write overlay of the image that outlives container boots (for
/// the reboot scenario): upper and work dirs under `dir`, mounted at
/// `dir/root`. Unmounted and removed on drop.
#[derive(Debug)]
pub struct PersistentRoot {
    pub dir: PathBuf,
    pub root: PathBuf,
    mounted: bool,
}

impl PersistentRoot {
    pub fn create(image: &Path, dir: &Path) -> PersistentRoot {
        let (upper, work, root) = (dir.join("upper"), dir.join("work"), dir.join("root"));
        for d in [&upper, &work, &root] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            image.display(),
            upper.display(),
            work.display()
        );
        let mut me = PersistentRoot {
            dir: dir.to_path_buf(),
            root: root.clone(),
            mounted: false,
        };
        must(&[
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts,
            &root.display().to_string(),
        ]);
        me.mounted = true;
        me
    }
}

impl Drop for PersistentRoot {
    fn drop(&mut self) {
        if self.mounted {
            let root = self.root.display().to_string();
            if run(&["umount", &root]).is_err() {
                let _ = run(&["umount", "-l", &root]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How a container's root is made.
#[derive(Debug, Clone)]
pub enum RootFs {
    /// The shared image under `--volatile=overlay`: a tmpfs upper layer
    /// that vanishes when the container stops.
    Volatile(PathBuf),
    /// A [`PersistentRoot`]'s mount point: survives a poweroff.
    Persistent(PathBuf),
}

/// One booted container.
#[derive(Debug)]
pub struct Container {
    pub name: String,
    pub index: usize,
    pub netns: String,
    pub rootfs: RootFs,
    /// Bound read-only at `/share` (the package, the worker script).
    pub share: PathBuf,
    nspawn: Option<Child>,
    /// The container's PID 1 (systemd), as seen from the host.
    pub pid1: i32,
    /// nspawn's console (boot messages).
    pub console: PathBuf,
}

/// Spawns `cmd` from a thread that lives as long as the process:
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// so children spawned from short-lived scenario threads would be killed
/// with them.
fn spawn_long_lived(cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Request>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        });
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    tx.lock()
        .map_err(|_| std::io::Error::other("spawner lock poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("spawner thread gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread gone"))?
}

/// The container's init: the child of `parent` (nspawn) that is PID 1 in
/// its own PID namespace. nspawn first forks an "outer child" that forks
/// init and exits, so the first child seen is not always init.
fn init_of(parent: u32) -> Option<i32> {
    let rd = std::fs::read_dir("/proc").ok()?;
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let ppid = field("PPid:");
        let nspid = field("NSpid:");
        if ppid.first() == Some(&parent.to_string().as_str())
            && nspid.len() > 1
            && nspid.last() == Some(&"1")
        {
            return Some(pid);
        }
    }
    None
}

impl Container {
    /// Boots a container (does not wait for systemd to finish booting).
    pub fn boot(
        name: &str,
        index: usize,
        netns: &str,
        rootfs: RootFs,
        share: &Path,
        console: &Path,
    ) -> Container {
        let mut c = Container {
            name: name.to_string(),
            index,
            netns: netns.to_string(),
            rootfs,
            share: share.to_path_buf(),
            nspawn: None,
            pid1: 0,
            console: console.to_path_buf(),
        };
        c.start();
        c
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.console)
            .unwrap_or_else(|e| panic!("{}: {e}", self.console.display()));
        // nspawn runs in a cgroup of its own (it then splits it into
        // `supervisor` and `payload`): two containers in one cgroup would
        // both run their systemd in the same cgroup tree and hang at boot.
        let cgroups = self.cgroups();
        for d in &cgroups {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        }
        let paths: Vec<String> = cgroups.iter().map(|d| d.display().to_string()).collect();
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            r#"for g in $DAC_CGROUPS; do echo $$ > "$g/cgroup.procs" || exit 1; done; exec "$@""#,
            "sh",
            "systemd-nspawn",
        ])
        .env("DAC_CGROUPS", paths.join(" "));
        match &self.rootfs {
            RootFs::Volatile(image) => {
                cmd.arg("-D").arg(image).arg("--volatile=overlay");
            }
            RootFs::Persistent(root) => {
                cmd.arg("-D").arg(root);
            }
        }
        cmd.args(["--register=no", "--keep-unit", "--boot", "-q"])
            .arg(format!("--machine={}", self.name))
            .arg(format!("--hostname={}", self.name))
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                self.netns
            ))
            .arg(format!("--bind-ro={}:/share", self.share.display()))
            // Its own process group: a Ctrl-C of the test does not reach
            // nspawn before our destructors have run.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("dup log: {e}")))
            .stderr(log);
        // SAFETY: between fork and exec the child may only do what is
        // async-signal-safe: prctl is one syscall and touches only the
        // child, and its error becomes an `io::Error` from the raw errno,
        // without allocating.
        // PDEATHSIG shuts the container down (SIGTERM to nspawn) if this
        // process dies without running our destructors (see
        // `spawn_long_lived` for why the forking thread must live on).
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let child =
            spawn_long_lived(cmd).unwrap_or_else(|e| panic!("systemd-nspawn {}: {e}", self.name));
        let nspawn_pid = child.id();
        self.nspawn = Some(child);
        let what = format!("no init process under nspawn for {}", self.name);
        self.pid1 = crate::wait_until(&what, Duration::from_secs(30), || {
            if let Some(p) = init_of(nspawn_pid) {
                return Ok(p);
            }
            if let Some(Ok(Some(st))) = self.nspawn.as_mut().map(Child::try_wait) {
                panic!(
                    "systemd-nspawn {} exited ({st}):\n{}",
                    self.name,
                    std::fs::read_to_string(&self.console).unwrap_or_default()
                );
            }
            Err(format!("nspawn pid {nspawn_pid} has no child yet"))
        });
    }

    /// The cgroups nspawn runs in: `dac-<test pid>-<name>` in the unified
    /// hierarchy and, on a hybrid host, in the name=systemd one too.
    fn cgroups(&self) -> Vec<PathBuf> {
        let leaf = format!("dac-{}-{}", std::process::id(), self.name);
        let base = Path::new("/sys/fs/cgroup");
        if base.join("cgroup.controllers").exists() {
            return vec![base.join(leaf)];
        }
        ["unified", "systemd"]
            .iter()
            .map(|h| base.join(h))
            .filter(|h| h.is_dir())
            .map(|h| h.join(&leaf))
            .collect()
    }

    /// Removes this container's (empty, stopped) cgroup trees, deepest first.
    fn remove_cgroups(&self) {
        fn rm(dir: &Path) {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        rm(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        for d in self.cgroups() {
            rm(&d);
        }
    }

    /// Waits until `systemctl is-system-running` says running (or
    /// degraded, with the failed units in the panic message otherwise).
    pub fn wait_booted(&self, limit: Duration) -> Result<(), String> {
        let booted = crate::poll_until(limit, Duration::from_millis(100), || {
            let out = self.exec(&["systemctl", "is-system-running"]);
            let state = out
                .as_ref()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
            match state.as_deref() {
                Ok("running") => Ok(Ok(())),
                Ok("degraded") => {
                    let failed = self.sh("systemctl --failed --no-legend");
                    Ok(Err(format!("{} booted degraded: {failed}", self.name)))
                }
                _ => Err(format!("{state:?}")),
            }
        });
        booted.unwrap_or_else(|state| {
            Err(format!(
                "{} not booted after {limit:?} ({state}); console:\n{}",
                self.name,
                std::fs::read_to_string(&self.console).unwrap_or_default()
            ))
        })
    }

    fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.pid1.to_string())
            .arg("-a")
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "");
        c
    }

    /// Runs a command inside (all the container's namespaces), for at most
    /// [`EXEC_LIMIT`] (see [`output_within`]).
    pub fn exec(&self, args: &[&str]) -> std::io::Result<Output> {
        let mut cmd = self.nsenter();
        cmd.args(args);
        output_within(cmd, EXEC_LIMIT)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.name)))
    }

    /// Runs a shell script inside; returns stdout+stderr, whatever the exit.
    pub fn sh(&self, script: &str) -> String {
        match self.exec(&["/bin/sh", "-c", script]) {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("nsenter: {e}"),
        }
    }

    /// Runs a shell script inside and panics unless it exits 0 within
    /// [`EXEC_LIMIT`]; returns stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let o = self
            .exec(&["/bin/sh", "-c", script])
            .unwrap_or_else(|e| panic!("{}: nsenter: {e}", self.name));
        assert!(
            o.status.success(),
            "{}: `{script}` failed ({}):\n{}{}",
            self.name,
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Writes `content` to `path` inside the container (mode 0644), by
    /// rename, within [`EXEC_LIMIT`]. The content travels in the script,
    /// single-quoted, so the write is one bounded command like any other.
    pub fn write(&self, path: &str, content: &str) {
        let quoted = format!("'{}'", content.replace('\'', r"'\''"));
        let script = format!(
            "mkdir -p \"$(dirname '{path}')\" && printf '%s' {quoted} > '{path}.tmp' \
             && mv '{path}.tmp' '{path}'"
        );
        self.sh_ok(&script);
    }

    /// Where the container's `/` is visible from the host, for reading
    /// files on its disk without entering it.
    pub fn host_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.pid1, path))
    }

    /// Reads a file on the container's disk ("" when absent).
    pub fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.host_path(path)).unwrap_or_default()
    }

    /// `deploy-agent status --json`, parsed (None while the agent is not up).
    pub fn status(&self) -> Option<serde_json::Value> {
        let o = self.exec(&["deploy-agent", "status", "--json"]).ok()?;
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// The deploy-agent unit's journal, one JSON object per entry.
    pub fn journal(&self, unit: &str) -> Vec<serde_json::Value> {
        let o = self.exec(&["journalctl", "-u", unit, "-o", "json", "--no-pager"]);
        let Ok(o) = o else { return Vec::new() };
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `systemctl show -p K --value` for each key.
    pub fn unit_props(&self, unit: &str, keys: &[&str]) -> Vec<String> {
        keys.iter()
            .map(|k| {
                self.sh(&format!("systemctl show -p {k} --value {unit}"))
                    .trim()
                    .to_string()
            })
            .collect()
    }

    /// Powers the container off from inside with `how` (e.g. `systemctl
    /// poweroff --no-block`; empty when something inside already did) and
    /// waits for nspawn to exit.
    pub fn poweroff(&mut self, how: &[&str], limit: Duration) {
        if !how.is_empty() {
            let _ = self.exec(how);
        }
        if let Some(mut child) = self.nspawn.take() {
            let off = crate::poll_until(limit, Duration::from_millis(50), || {
                match child.try_wait() {
                    Ok(Some(_)) => Ok(()),
                    _ => Err(()),
                }
            });
            if off.is_err() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not power off within {limit:?}", self.name);
            }
        }
        self.pid1 = 0;
        self.remove_cgroups();
    }

    /// Boots it again on the same root (after [`Container::poweroff`]).
    pub fn boot_again(&mut self) {
        assert!(self.nspawn.is_none(), "{} is still running", self.name);
        self.start();
    }

    fn stop(&mut self) {
        let Some(mut child) = self.nspawn.take() else {
            return;
        };
        // SIGTERM to nspawn shuts the container down cleanly; SIGKILL (to
        // nspawn, which takes the container's processes with it) after a
        // bound.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let exited =
            crate::poll_until(
                Duration::from_secs(20),
                Duration::from_millis(50),
                || match child.try_wait() {
                    Ok(Some(_)) => Ok(()),
                    _ => Err(()),
                },
            );
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            // nspawn is gone; take whatever is left of the container with it.
            for d in self.cgroups() {
                let _ = std::fs::write(d.join("cgroup.kill"), "1");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.remove_cgroups();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops many containers at once (shutdown takes a second or two each).
pub fn stop_all(containers: &mut Vec<Container>) {
    std::thread::scope(|s| {
        for c in containers.iter_mut() {
            s.spawn(move || c.stop());
        }
    });
    containers.clear();
}

/// `cmd.output()` for at most `limit`: then the command and everything it
/// started (its own process group, which spans PID namespaces, so this
/// covers what `nsenter` runs inside a container) is killed and the result
/// is a `TimedOut` error naming it. A command that hangs must fail its
/// scenario, not hold the whole suite until CI gives up on it.
pub fn output_within(mut cmd: Command, limit: Duration) -> std::io::Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Drained on threads so that a chatty command cannot fill a pipe and
    // stall before it exits.
    fn drain(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let exited = crate::poll_until(limit, crate::POLL, || match child.try_wait() {
        Ok(Some(st)) => Ok(Ok(st)),
        Ok(None) => Err(()),
        Err(e) => Ok(Err(e)),
    });
    let status = match exited {
        Ok(st) => st?,
        Err(()) => {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{what} still running after {limit:?}, killed"),
            ));
        }
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// [`crate::wait_until`] polling every 100 ms: each poll of a container
/// runs commands in it.
pub fn wait_for<T>(what: &str, limit: Duration, f: impl FnMut() -> Result<T, String>) -> T {
    crate::wait_until_every(what, limit, Duration::from_millis(100), f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command that outlives its limit is killed with everything it
    /// started, and says so; one that finishes in time keeps its output.
    #[test]
    fn output_within_kills_the_whole_group_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("sleep 60 & echo $! > {}; wait", pidfile.display()));
        let start = Instant::now();
        let err = output_within(cmd, Duration::from_millis(300)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("sleep 60"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild is gone too (a zombie until init reaps it at most).
        let gone = (0..100).any(|_| {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let alive = !state.is_empty() && !state.contains(") Z ");
            if alive {
                std::thread::sleep(Duration::from_millis(20));
            }
            !alive
        });
        assert!(gone, "sleep {pid} survived the kill");

        let mut ok = Command::new("/bin/sh");
        ok.args(["-c", "echo out; echo err >&2; exit 3"]);
        let o = output_within(ok, Duration::from_secs(30)).unwrap();
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(o.stdout, b"out\n");
        assert_eq!(o.stderr, b"err\n");
    }
}
