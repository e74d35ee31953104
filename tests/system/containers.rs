//! Hosts as real containers: the shipped Debian package and unit under a
//! real systemd. Fourteen `systemd-nspawn --boot` containers of one cached
//! bookworm image (tests/system/build-image.sh), each with its own
//! network namespace on a bridge, its own journald and a stand-in web
//! worker service; the Consul-compatible and artifact servers run in this
//! process on the bridge. The package is installed in each container with
//! `dpkg -i`, the agent started with `systemctl enable --now`, and every
//! scenario asserts on the container's disk, over the status socket
//! (`deploy-agent status --json` inside) and in the journal
//! (`journalctl -u deploy-agent -o json`).
//!
//! Scenarios (docs/containers.md has the figures): install and first
//! deploy; a staged rollout over ten containers; `systemctl reload` with a
//! changed and with an invalid config; `systemctl restart` and a watchdog
//! kill during a download and during a drain, and an operator hold and
//! rollback surviving both; a reboot in the middle of an unpack; the drain
//! naming the worker's pids; the sandbox versus drain scan, hooks and
//! health command; `systemd-analyze security`; the log format in journald.
//!
//! Test-only change to the shipped unit, in the two containers that test
//! the watchdog: a drop-in sets `WatchdogSec=5s` (30 s shipped) and
//! `RestartSec=1s` to keep the wall time low, and raises the start limit
//! because those scenarios restart the agent more often than the shipped
//! 5 starts in 10 minutes allow.
//!
//! If the test process dies midway, its containers shut down on their own
//! (nspawn gets `PR_SET_PDEATHSIG`); what else can stay behind, and how it
//! is named, is in `tests/support/containers.rs`. Nothing outside
//! `target/containers/`, the base image cache (read only) and the `dac*`
//! network objects is touched.
//!
//! Needs root, systemd-nspawn, debootstrap and cargo-deb (or
//! `DEPLOY_AGENT_DEB`); otherwise it says why and passes without running,
//! unless `DEPLOY_AGENT_CONTAINERS=require` (what .ci/run sets).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use deploy_agent::manifest::{Format, Manifest, UrlPolicy};
use deploy_agent_tests::containers::{
    image, output_within, package, required, stop_all, unsupported, wait_for, Container, Net,
    PersistentRoot, RootFs,
};
use deploy_agent_tests::{poll_until, precondition};
use serde_json::Value;
use testkit::buildgen::{self, Artifact, BuildProfile};
use testkit::testserver::artifact::{ArtifactServer, Fault, FaultRule};
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig};

const APP: &str = "web";
/// Containers 0..ROLLOUT serve the production tier (the staged rollout).
const ROLLOUT: usize = 10;
const RELOAD: usize = 10;
const RESTART: usize = 11;
const DRAIN: usize = 12;
const REBOOT: usize = 13;
const HOSTS: usize = 14;
const T: Duration = Duration::from_secs(90);
/// `systemd-analyze security deploy-agent` of the unit as it was before
/// this suite existed (commit cb5e115), measured in these containers: the
/// score must not rise above it.
const EXPOSURE_BEFORE: f64 = 2.7;

fn tier(i: usize) -> &'static str {
    match i {
        RELOAD => "reload",
        RESTART => "restart",
        DRAIN => "drain",
        REBOOT => "reboot",
        _ => "production",
    }
}

const WORKER_PY: &str = r#"# Stand-in web worker: two processes that hold the build `current` names
# by cwd and by an open file, like php-fpm workers. SIGHUP (systemctl
# reload web-worker) moves both to the build `current` names now.
import os, signal, sys
held = []
child = 0
def enter():
    global held
    slot = os.path.realpath("/srv/app/current")
    os.chdir(slot)
    f = open(os.path.join(slot, "BUILD"))
    for old in held:
        old.close()
    held = [f]
    print("pid %d serves %s from %s" % (os.getpid(), f.read().strip(), slot), flush=True)
def reload(signum, frame):
    enter()
    if child:
        os.kill(child, signal.SIGHUP)
signal.signal(signal.SIGHUP, reload)
enter()
child = os.fork()
while True:
    signal.pause()
"#;

const WORKER_UNIT: &str = "[Unit]
Description=stand-in web worker (holds current by cwd and an open file)
ConditionPathExists=/srv/app/current

[Service]
ExecStart=/usr/bin/python3 -u /share/worker.py
ExecReload=/bin/sh -c 'kill -HUP \"$$MAINPID\"'
";

/// The test-only drop-in of the watchdog scenarios (see the module docs).
const FAST_WATCHDOG: &str = "[Unit]
StartLimitBurst=100

[Service]
WatchdogSec=5s
RestartSec=1s
";

fn agent_config(c: &Container, consul: &str, tier: &str, extra: &str) -> String {
    format!(
        r#"deploy-root = "/srv/app"
[consul]
address = "{consul}"
wait = "60s"
first-request-splay = "0s"
rate-interval = "200ms"
[download]
parallel-ranges = 1
connect-timeout = "2s"
read-timeout = "10s"
retries = 3
[drain]
cold-deadline = "10m"
poll = "100ms"
[hooks]
pre-flip = ["/bin/sh", "-c", "echo pre-flip $DEPLOY_BUILD >> /srv/app/hooks.log"]
post-flip = ["/bin/sh", "-c", "echo post-flip $DEPLOY_BUILD >> /srv/app/hooks.log"]
[health]
command = ["/bin/sh", "-c", "test -s \"$DEPLOY_SLOT_DIR/BUILD\" && echo health $DEPLOY_BUILD >> /srv/app/hooks.log"]
window = "20s"
interval = "200ms"
[fleet]
app = "{APP}"
tier = "{tier}"
host-id = "{id}"
splay-max = "300ms"
{extra}"#,
        id = c.name,
    )
}

/// Everything one run owns. Field order is drop order after `Drop`
/// stopped the containers: servers, runtime, network, roots, temp files.
struct Ctx {
    hosts: Vec<RwLock<Container>>,
    consul: ConsulServer,
    artifacts: ArtifactServer,
    _rt: tokio::runtime::Runtime,
    _net: Net,
    _persistent: PersistentRoot,
    tmp: tempfile::TempDir,
    /// The host-side CLI (the deploy commander's `release` commands).
    bin: PathBuf,
    /// Built artifacts: build id -> (local path, url, artifact).
    builds: Mutex<Vec<(String, PathBuf, String, Artifact)>>,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        let mut all: Vec<Container> = self
            .hosts
            .drain(..)
            .map(|c| c.into_inner().unwrap_or_else(|p| p.into_inner()))
            .collect();
        stop_all(&mut all);
    }
}

impl Ctx {
    fn c(&self, i: usize) -> RwLockReadGuard<'_, Container> {
        self.hosts[i].read().unwrap_or_else(|p| p.into_inner())
    }

    /// Generates build `id` of `profile`, serves it; returns (path, url).
    fn build(&self, id: &str, profile: BuildProfile) -> (PathBuf, String) {
        let path = self.tmp.path().join(format!("{id}.tar.gz"));
        let a = buildgen::write_build(profile, 7, id, Format::TarGz, &path).unwrap();
        let url_path = format!("/b/{id}.tar.gz");
        self.artifacts.add(&url_path, std::fs::read(&path).unwrap());
        let url = self.artifacts.url(&url_path);
        self.builds
            .lock()
            .unwrap()
            .push((id.to_string(), path.clone(), url.clone(), a));
        (path, url)
    }

    fn build_path(&self, id: &str) -> (PathBuf, String) {
        let b = self.builds.lock().unwrap();
        let (_, p, u, _) = b.iter().find(|(b, ..)| b == id).unwrap();
        (p.clone(), u.clone())
    }

    /// `deploy-agent release <args> --app web --tier <tier>` from the host.
    fn release(&self, tier: &str, args: &[&str]) -> String {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("release")
            .args(args)
            .args(["--app", APP, "--tier", tier, "--consul", &self.consul.url()])
            .env_remove("CONSUL_HTTP_ADDR");
        let out = output_within(cmd, T).unwrap_or_else(|e| panic!("release {args:?}: {e}"));
        assert!(
            out.status.success(),
            "release {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn publish(&self, tier: &str, build: &str, percent: Option<&str>) {
        let (path, url) = self.build_path(build);
        let p = path.display().to_string();
        let mut args = vec!["publish", "--build", build, "--artifact", &p, "--url", &url];
        if let Some(pc) = percent {
            args.extend(["--percent", pc]);
        }
        self.release(tier, &args);
    }

    /// The build each container of `tier` must run under its manifest.
    fn expected(&self, i: usize) -> String {
        let key = format!("deploy/{APP}/{}", tier(i));
        let Some(e) = self.consul.get(&key) else {
            return String::new();
        };
        let m = Manifest::parse(&e.value, UrlPolicy::default()).unwrap();
        deploy_agent::fleet::effective(&m, &self.c(i).name)
            .1
            .map(|m| m.spec.build)
            .unwrap_or_default()
    }

    /// Waits until container `i` serves `build` (on disk and in status).
    fn wait_live(&self, i: usize, build: &str, limit: Duration) {
        let c = self.c(i);
        wait_for(&format!("{} serves {build}", c.name), limit, || {
            let disk = c.read("/srv/app/current/BUILD");
            let st = c.status();
            let hot = st
                .as_ref()
                .and_then(|s| s["hot"]["build"].as_str().map(str::to_string));
            let phase = st
                .as_ref()
                .and_then(|s| s["phase"].as_str().map(str::to_string));
            if disk == build
                && hot.as_deref() == Some(build)
                && matches!(phase.as_deref(), Some("done" | "idle"))
            {
                Ok(())
            } else {
                Err(format!(
                    "disk {disk:?}, status hot {hot:?} phase {phase:?}, last error {}",
                    st.as_ref().map_or(Value::Null, |s| s["last_error"].clone())
                ))
            }
        });
    }

    /// Waits until container `i`'s status is in `phase`; returns the report.
    /// On a timeout the panic carries the agent's journal tail.
    fn wait_phase(&self, i: usize, phase: &str, limit: Duration) -> Value {
        let c = self.c(i);
        let mut last = String::new();
        let found = poll_until(limit, Duration::from_millis(100), || {
            if let Some(st) = c.status() {
                if st["phase"] == phase {
                    return Ok(st);
                }
                last = st.to_string();
            }
            Err(())
        });
        found.unwrap_or_else(|()| {
            let journal = c.sh("journalctl -u deploy-agent -n 40 --no-pager -o cat");
            panic!(
                "{} in phase {phase}: not after {limit:?}; last status {last}\njournal:\n{journal}",
                c.name
            );
        })
    }
}

/// The unit's main pid inside the container and its restart count.
fn main_pid(c: &Container) -> (String, u64) {
    let v = c.unit_props("deploy-agent", &["MainPID", "NRestarts"]);
    (v[0].clone(), v[1].parse().unwrap_or(0))
}

/// Waits until the agent runs again under a new main pid, active, with its
/// status socket answering.
fn wait_back(c: &Container, old_pid: &str, limit: Duration) -> String {
    wait_for(&format!("{}: agent back", c.name), limit, || {
        let v = c.unit_props("deploy-agent", &["ActiveState", "SubState", "MainPID"]);
        if v[0] == "active" && v[1] == "running" && v[2] != old_pid && v[2] != "0" {
            c.status().ok_or("socket not answering yet")?;
            Ok(v[2].clone())
        } else {
            Err(format!("{v:?}"))
        }
    })
}

/// The MESSAGE fields of the agent's own journal entries (not systemd's).
fn agent_messages(entries: &[Value]) -> Vec<(String, i64)> {
    entries
        .iter()
        .filter(|e| e["SYSLOG_IDENTIFIER"] == "deploy-agent")
        .map(|e| {
            (
                e["MESSAGE"]
                    .as_str()
                    .unwrap_or("<non-text MESSAGE>")
                    .to_string(),
                e["PRIORITY"]
                    .as_str()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(-1),
            )
        })
        .collect()
}

/// Checks that the tree under `current` in container `c` is exactly the
/// build's archive: every regular file present with its size.
///
/// The slot is resolved once, first: the agent may flip `current` to the
/// other slot while this reads, and the slot it left stays intact.
fn assert_complete(c: &Container, builds: &[(String, PathBuf, String, Artifact)]) -> String {
    let link = std::fs::read_link(c.host_path("/srv/app/current")).unwrap();
    let slot = format!("/srv/app/{}", link.display());
    let build = c.read(&format!("{slot}/BUILD"));
    let (_, path, ..) = builds
        .iter()
        .find(|(b, ..)| *b == build)
        .unwrap_or_else(|| panic!("{}: current/BUILD names {build:?}", c.name));
    let f = std::fs::File::open(path).unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let root = c.host_path(&slot);
    let mut files = 0;
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let rel = e.path().unwrap().into_owned();
        let meta = std::fs::metadata(root.join(&rel))
            .unwrap_or_else(|err| panic!("{}: {} of {build}: {err}", c.name, rel.display()));
        assert_eq!(meta.len(), e.header().size().unwrap(), "{}", rel.display());
        files += 1;
    }
    assert!(files > 0);
    build
}

/// One scenario's outcome for the closing table.
struct Outcome {
    name: &'static str,
    secs: f64,
    result: Result<String, String>,
}

/// Writes a progress line to the real stderr, past libtest's capture: a
/// CI log then shows how far the suite got even if it is killed.
fn progress(line: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
}

/// The scenarios running now, for the suite watchdog's last words.
static RUNNING: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// The whole suite takes 1-5 minutes here (setup included). Past this, a
/// step is stuck: the watchdog names the running scenarios and aborts the
/// process (nspawn's PDEATHSIG then shuts the containers down), so CI
/// reports a failure instead of hanging until its own limit.
const SUITE_LIMIT: Duration = Duration::from_secs(25 * 60);

fn start_watchdog() {
    std::thread::spawn(|| {
        std::thread::sleep(SUITE_LIMIT);
        let running = RUNNING.lock().map(|r| r.join(", ")).unwrap_or_default();
        progress(&format!(
            "[containers] WATCHDOG: still running after {SUITE_LIMIT:?} \
             (scenarios: [{running}]); aborting"
        ));
        std::process::abort();
    });
}

fn scenario(name: &'static str, f: impl FnOnce() -> String) -> Outcome {
    progress(&format!("[containers] scenario: {name}"));
    if let Ok(mut r) = RUNNING.lock() {
        r.push(name);
    }
    let start = Instant::now();
    let result = std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into())
    });
    let secs = start.elapsed().as_secs_f64();
    if let Ok(mut r) = RUNNING.lock() {
        r.retain(|n| *n != name);
    }
    match &result {
        Ok(note) => progress(&format!("[containers] PASS {name} ({secs:.1} s) {note}")),
        Err(e) => progress(&format!("[containers] FAIL {name} ({secs:.1} s): {e}")),
    }
    Outcome { name, secs, result }
}

#[test]
fn hosts_as_real_containers() {
    let started = Instant::now();
    start_watchdog();
    if let Some(why) = unsupported() {
        assert!(
            !required(),
            "container suite required but cannot run: {why}"
        );
        precondition(Some(why));
        return;
    }
    let prepared = image().and_then(|i| package().map(|d| (i, d)));
    let (image, deb) = match prepared {
        Ok(v) => v,
        Err(why) => {
            assert!(!required(), "container suite required: {why}");
            precondition(Some(why));
            return;
        }
    };
    let deb_bytes = std::fs::metadata(&deb).unwrap().len();
    progress(&format!(
        "[containers] package {} ({:.1} MB), at {:.1} s",
        deb.display(),
        deb_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    ));
    let Some(ctx) = setup(&image, &deb) else {
        return;
    };
    let setup_secs = started.elapsed().as_secs_f64();

    let mut outcomes = vec![
        scenario("install, enable --now, first deploy live", || {
            install_and_first_deploy(&ctx)
        }),
        scenario("staged rollout over 10 containers", || staged_rollout(&ctx)),
    ];
    // The four single-container scenarios use their own tiers (Consul keys)
    // and run side by side.
    let parallel: Vec<Outcome> = std::thread::scope(|s| {
        let hs = [
            s.spawn(|| vec![scenario("systemctl reload: changed and invalid config", || reload(&ctx))]),
            s.spawn(|| {
                vec![
                    scenario("restart and watchdog kill during a download", || {
                        restart_during_download(&ctx)
                    }),
                    scenario(
                        "operator hold and rollback survive restart and watchdog (issue 11)",
                        || hold_survives(&ctx),
                    ),
                ]
            }),
            s.spawn(|| {
                vec![scenario(
                    "drain names the worker's pids; restart and watchdog during the drain; hooks and health in the sandbox",
                    || drain(&ctx),
                )]
            }),
            s.spawn(|| vec![scenario("reboot in the middle of an unpack", || reboot(&ctx))]),
        ];
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    outcomes.extend(parallel);
    outcomes.push(scenario("systemd-analyze security", || security(&ctx)));
    outcomes.push(scenario("log format under journald", || log_format(&ctx)));
    outcomes.push(scenario("package upgrade, remove and purge", || {
        package_lifecycle(&ctx)
    }));

    let total = started.elapsed().as_secs_f64();
    drop(ctx);
    // Written to the real stderr, past libtest's capture, so that CI logs
    // carry the figures even when the test passes.
    let mut summary = format!(
        "\n[containers] {HOSTS} containers, package {:.1} MB, setup {setup_secs:.0} s, \
         scenarios done at {total:.0} s, with teardown {:.0} s\n",
        deb_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    for o in &outcomes {
        summary += &match &o.result {
            Ok(note) => format!("  PASS {:>5.1} s  {}  {note}\n", o.secs, o.name),
            Err(e) => format!("  FAIL {:>5.1} s  {}: {e}\n", o.secs, o.name),
        };
    }
    progress(summary.trim_end());
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.result.is_err())
        .map(|o| o.name)
        .collect();
    assert!(failed.is_empty(), "failed scenarios: {failed:?}");
}

/// Network, servers, containers booted and the package installed; `None`
/// (after saying why) when nspawn cannot boot here and the suite is not
/// required.
fn setup(image: &Path, deb: &Path) -> Option<Ctx> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let net = Net::create("dac", 19, HOSTS);
    let gw = net.gateway();
    let (consul, artifacts) = rt.block_on(async {
        let consul = ConsulServer::start(ConsulServerConfig {
            addr: Some(SocketAddr::from((gw, 0))),
            ..ConsulServerConfig::default()
        })
        .await
        .unwrap();
        let artifacts = ArtifactServer::start_at(SocketAddr::from((gw, 0)))
            .await
            .unwrap();
        (consul, artifacts)
    });
    // On disk, not tmpfs: the persistent root's upper dir lives here too.
    let runs = deploy_agent_tests::containers::repo().join("target/containers");
    std::fs::create_dir_all(&runs).unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&runs)
        .unwrap();
    let share = tmp.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::copy(deb, share.join("deploy-agent.deb")).unwrap();
    std::fs::write(share.join("worker.py"), WORKER_PY).unwrap();
    let persistent = PersistentRoot::create(image, &tmp.path().join("reboot-root"));
    let bin = deploy_agent_tests::agent_bin();

    let boot_start = Instant::now();
    let mut hosts = Vec::new();
    for i in 0..HOSTS {
        let rootfs = if i == REBOOT {
            RootFs::Persistent(persistent.root.clone())
        } else {
            RootFs::Volatile(image.to_path_buf())
        };
        let name = format!("c{i:02}");
        let console = tmp.path().join(format!("{name}.console"));
        hosts.push(RwLock::new(Container::boot(
            &name,
            i,
            &net.namespaces[i],
            rootfs,
            &share,
            &console,
        )));
    }
    let ctx = Ctx {
        hosts,
        consul,
        artifacts,
        _rt: rt,
        _net: net,
        _persistent: persistent,
        tmp,
        bin,
        builds: Mutex::new(Vec::new()),
    };
    let booted: Vec<Result<(), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..HOSTS)
            .map(|i| {
                let ctx = &ctx;
                s.spawn(move || ctx.c(i).wait_booted(Duration::from_secs(120)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    if let Some(Err(why)) = booted.iter().find(|r| r.is_err()) {
        assert!(!required(), "nspawn cannot boot here: {why}");
        precondition(Some(format!("nspawn cannot boot here: {why}")));
        return None;
    }
    progress(&format!(
        "[containers] {HOSTS} containers booted concurrently in {:.1} s",
        boot_start.elapsed().as_secs_f64()
    ));
    Some(ctx)
}

/// dpkg -i, the checks on what the package installed, the config, and
/// `systemctl enable --now` on every container (concurrently); b1 published
/// to every tier goes live everywhere; the unit shows the agent's Status=.
fn install_and_first_deploy(ctx: &Ctx) -> String {
    let consul = ctx.consul.url();
    let install_start = Instant::now();
    std::thread::scope(|s| {
        for i in 0..HOSTS {
            let consul = &consul;
            s.spawn(move || {
                let c = ctx.c(i);
                let out = c.sh_ok("dpkg -i /share/deploy-agent.deb 2>&1");
                // Installed, not started: the operator edits the config first.
                assert!(out.contains("systemctl enable --now deploy-agent"), "{out}");
                let state =
                    c.sh("systemctl is-enabled deploy-agent; systemctl is-active deploy-agent");
                assert!(
                    state.contains("disabled") && state.contains("inactive"),
                    "{state}"
                );
                c.sh_ok("getent group deploy-ops && test -d /srv/app");
                if i == 0 {
                    // The package as installed: config validates, docs exist.
                    let check = c.sh_ok("deploy-agent check-config");
                    assert!(
                        check.contains("/etc/deploy-agent/config.toml: ok"),
                        "{check}"
                    );
                    c.sh_ok(
                        "test -x /usr/bin/deploy-agent \
                         && test -f /lib/systemd/system/deploy-agent.service \
                         && test -f /usr/share/man/man8/deploy-agent.8.gz \
                         && test -f /usr/share/man/man8/deploy-agent-status.8.gz \
                         && test -f /usr/share/bash-completion/completions/deploy-agent \
                         && test -f /usr/share/zsh/vendor-completions/_deploy-agent \
                         && test -f /usr/share/fish/vendor_completions.d/deploy-agent.fish \
                         && test -f /usr/share/doc/deploy-agent/README.md \
                         && test -f /usr/share/doc/deploy-agent/copyright",
                    );
                    let mode = c.sh_ok("stat -c '%a %U:%G' /etc/deploy-agent/config.toml");
                    assert_eq!(mode.trim(), "640 root:deploy-ops");
                    let v = c.sh_ok("deploy-agent --version");
                    assert!(v.contains("commit ") && v.contains("built "), "{v}");
                }
                c.write(
                    "/etc/deploy-agent/config.toml",
                    &agent_config(&c, consul, tier(i), ""),
                );
                c.write("/etc/systemd/system/web-worker.service", WORKER_UNIT);
                if i == RESTART || i == DRAIN {
                    c.write(
                        "/etc/systemd/system/deploy-agent.service.d/test-watchdog.conf",
                        FAST_WATCHDOG,
                    );
                }
                c.sh_ok("systemctl daemon-reload && deploy-agent check-config >/dev/null");
                c.sh_ok("systemctl enable --now deploy-agent 2>&1");
            });
        }
    });
    let install_secs = install_start.elapsed().as_secs_f64();

    ctx.build("b1", BuildProfile::TINY);
    for t in ["production", "reload", "restart", "drain", "reboot"] {
        ctx.publish(t, "b1", None);
    }
    std::thread::scope(|s| {
        for i in 0..HOSTS {
            s.spawn(move || {
                ctx.wait_live(i, "b1", T);
                // The worker starts once there is a build to serve. Not in
                // the restart container: it deploys four builds in a row
                // and would wait on the worker at the third.
                if i != RESTART {
                    ctx.c(i).sh_ok("systemctl start web-worker");
                }
            });
        }
    });
    let c = ctx.c(0);
    let [active, sub, status] = <[String; 3]>::try_from(
        c.unit_props("deploy-agent", &["ActiveState", "SubState", "StatusText"]),
    )
    .unwrap();
    assert_eq!((active.as_str(), sub.as_str()), ("active", "running"));
    assert!(!status.is_empty(), "no Status= line from the agent");
    let shown = c.sh("systemctl status deploy-agent --no-pager");
    assert!(shown.contains("active (running)"), "{shown}");
    assert!(shown.contains("Status: \""), "{shown}");
    let st = c.status().unwrap();
    assert_eq!(st["hot"]["build"], "b1");
    let journal = agent_messages(&c.journal("deploy-agent"));
    assert!(
        journal.iter().any(|(m, _)| m.contains("b1")),
        "journal does not mention b1: {journal:?}"
    );
    let files = assert_complete(&c, &ctx.builds.lock().unwrap());
    format!("dpkg -i + enable --now on {HOSTS} in {install_secs:.1} s; Status=\"{status}\"; current={files}")
}

fn staged_rollout(ctx: &Ctx) -> String {
    ctx.build("b2", BuildProfile::TINY);
    let rollout: Vec<usize> = (0..ROLLOUT).collect();
    let mut steps = Vec::new();
    for pct in ["30", "60", "100"] {
        if pct == "30" {
            ctx.publish("production", "b2", Some(pct));
        } else {
            ctx.release("production", &["promote", "--percent", pct]);
        }
        let want: Vec<String> = rollout.iter().map(|&i| ctx.expected(i)).collect();
        std::thread::scope(|s| {
            for &i in &rollout {
                let want = &want;
                s.spawn(move || ctx.wait_live(i, &want[i], T));
            }
        });
        let on_new: BTreeSet<usize> = rollout
            .iter()
            .copied()
            .filter(|&i| want[i] == "b2")
            .collect();
        steps.push(format!("{pct}%: {} on b2", on_new.len()));
    }
    for &i in &rollout {
        assert_eq!(ctx.c(i).read("/srv/app/current/BUILD"), "b2");
    }
    steps.join(", ")
}

fn reload(ctx: &Ctx) -> String {
    let i = RELOAD;
    let c = ctx.c(i);
    let consul = ctx.consul.url();
    ctx.build("r-b2", BuildProfile::TINY);
    ctx.publish("reload2", "r-b2", None);
    let (pid, _) = main_pid(&c);
    // A changed config: another tier, so another key and build.
    c.write(
        "/etc/deploy-agent/config.toml",
        &agent_config(&c, &consul, "reload2", ""),
    );
    c.sh_ok("systemctl reload deploy-agent 2>&1");
    ctx.wait_live(i, "r-b2", T);
    let st = c.status().unwrap();
    assert_eq!(st["consul"]["key"], "deploy/web/reload2", "{st}");
    assert_eq!(main_pid(&c).0, pid, "a reload must not restart the process");
    let msgs = agent_messages(&c.journal("deploy-agent"));
    assert!(
        msgs.iter()
            .any(|(m, _)| m.contains("trigger=SIGHUP") || m.contains("trigger=\"SIGHUP\"")),
        "no SIGHUP reload in the journal: {msgs:?}"
    );

    // An invalid config: refused, the running one kept, the error in status.
    c.write(
        "/etc/deploy-agent/config.toml",
        &agent_config(&c, &consul, "reload2", "bogus-key = 1\n"),
    );
    c.sh_ok("systemctl reload deploy-agent 2>&1");
    let err = wait_for("reload error in status", T, || {
        let st = c.status().ok_or("no status")?;
        let m = st["last_error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if m.contains("config reload rejected") && m.contains("bogus-key") {
            Ok(m)
        } else {
            Err(format!("last_error {m:?}"))
        }
    });
    let v = c.unit_props("deploy-agent", &["ActiveState", "MainPID"]);
    assert_eq!(v, ["active".to_string(), pid.clone()]);
    let st = c.status().unwrap();
    assert_eq!(st["consul"]["key"], "deploy/web/reload2", "old config kept");
    let msgs = agent_messages(&c.journal("deploy-agent"));
    let rejected = msgs
        .iter()
        .find(|(m, _)| m.contains("new config rejected"))
        .unwrap_or_else(|| panic!("no rejection in the journal: {msgs:?}"));
    assert_eq!(
        rejected.1, 3,
        "the rejection is logged at priority err: {rejected:?}"
    );
    // Back to a valid config for the log checks later.
    c.write(
        "/etc/deploy-agent/config.toml",
        &agent_config(&c, &consul, "reload2", ""),
    );
    c.sh_ok("systemctl reload deploy-agent");
    format!(
        "reload exit 0; invalid config kept the old one: {}",
        err.lines().next().unwrap_or_default()
    )
}

/// Publishes `build` to `tier` trickled, and waits until container `i`
/// is downloading it with some bytes done.
fn start_slow_download(ctx: &Ctx, i: usize, tier: &str, build: &str) -> Value {
    let (file, url) = ctx.build(build, BuildProfile::TINY);
    let path = url
        .split_once("/b/")
        .map(|(_, p)| format!("/b/{p}"))
        .unwrap();
    // About 15 s for the whole artifact: long enough to restart or stop
    // the agent in the middle, short enough that a trickling response
    // still in flight after `clear_faults` ends soon.
    let size = std::fs::metadata(&file).unwrap().len();
    ctx.artifacts.set_fault(
        FaultRule::always(Fault::Trickle {
            bytes_per_sec: (size / 15).max(4096),
        })
        .on_path(path),
    );
    ctx.publish(tier, build, None);
    let c = ctx.c(i);
    wait_for(&format!("{} downloading {build}", c.name), T, || {
        let st = c.status().ok_or("no status")?;
        let done = st["progress"]["bytes_done"].as_u64().unwrap_or(0);
        if st["phase"] == "downloading" && done > 0 {
            Ok(st)
        } else {
            Err(format!("phase {} bytes {done}", st["phase"]))
        }
    })
}

fn sigstop_agent(c: &Container) {
    c.sh_ok("kill -STOP \"$(systemctl show -p MainPID --value deploy-agent)\"");
}

fn restart_during_download(ctx: &Ctx) -> String {
    let i = RESTART;
    let c = ctx.c(i);
    let mut notes = Vec::new();
    let watchdog = c.unit_props("deploy-agent", &["WatchdogUSec"]);
    notes.push(format!("WatchdogSec (test drop-in) {}", watchdog[0]));

    // systemctl restart in the middle of a download.
    let st = start_slow_download(ctx, i, "restart", "s2");
    let (pid, _) = main_pid(&c);
    c.sh_ok("systemctl restart deploy-agent");
    wait_back(&c, &pid, T);
    let again = ctx.wait_phase(i, "downloading", T);
    notes.push(format!(
        "restart at {} bytes, downloading again ({} bytes)",
        st["progress"]["bytes_done"], again["progress"]["bytes_done"]
    ));
    ctx.artifacts.clear_faults();
    ctx.wait_live(i, "s2", T);

    // The watchdog kills a SIGSTOPped agent in the middle of a download.
    start_slow_download(ctx, i, "restart", "s3");
    let (pid, restarts) = main_pid(&c);
    sigstop_agent(&c);
    let t0 = Instant::now();
    wait_back(&c, &pid, Duration::from_secs(60));
    let (_, restarts_after) = main_pid(&c);
    assert!(
        restarts_after > restarts,
        "NRestarts {restarts} -> {restarts_after}"
    );
    let journal = c.sh("journalctl -u deploy-agent --no-pager -o cat | grep -i watchdog || true");
    assert!(
        journal.to_lowercase().contains("watchdog timeout"),
        "{journal}"
    );
    notes.push(format!(
        "watchdog restart after {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    // The restarted agent resumes from the kept partial, so what is left
    // may finish before the first status poll: seeing it downloading again
    // or already serving s3 both show the resume.
    wait_for(&format!("{} resumes s3", c.name), T, || {
        let st = c.status().ok_or("no status")?;
        if st["phase"] == "downloading" || st["hot"]["build"] == "s3" {
            Ok(())
        } else {
            Err(format!("phase {} hot {}", st["phase"], st["hot"]["build"]))
        }
    });
    ctx.artifacts.clear_faults();
    ctx.wait_live(i, "s3", T);

    notes.join("; ")
}

/// Issue 11 (the lead's, in main): the hold and an operator rollback are
/// persisted, so a restart or a watchdog kill does not undo them.
fn hold_survives(ctx: &Ctx) -> String {
    let i = RESTART;
    let c = ctx.c(i);
    // An operator hold survives a restart and a watchdog kill.
    c.sh_ok("deploy-agent hold --reason 'container test hold'");
    let held = |what: &str| {
        let st = c.status().unwrap();
        assert_eq!(st["hold"]["held"], true, "hold lost after {what}: {st}");
        assert_eq!(st["hold"]["reason"], "container test hold", "{st}");
    };
    held("hold");
    let (pid, _) = main_pid(&c);
    c.sh_ok("systemctl restart deploy-agent");
    wait_back(&c, &pid, T);
    held("systemctl restart");
    let (pid, _) = main_pid(&c);
    sigstop_agent(&c);
    wait_back(&c, &pid, Duration::from_secs(60));
    held("a watchdog kill");
    // Still held: a new build is not deployed.
    ctx.build("s4", BuildProfile::TINY);
    ctx.publish("restart", "s4", None);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.read("/srv/app/current/BUILD"),
        "s3",
        "deployed while held"
    );
    c.sh_ok("deploy-agent resume");
    ctx.wait_live(i, "s4", T);

    // An operator rollback (to s3 in the cold slot) survives both too.
    c.sh_ok("deploy-agent rollback");
    ctx.wait_live(i, "s3", T);
    let (pid, _) = main_pid(&c);
    c.sh_ok("systemctl restart deploy-agent");
    wait_back(&c, &pid, T);
    let (pid, _) = main_pid(&c);
    sigstop_agent(&c);
    wait_back(&c, &pid, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.read("/srv/app/current/BUILD"),
        "s3",
        "the operator rollback was undone by a restart"
    );
    "hold and rollback survived a restart and a watchdog kill".into()
}

/// The stand-in worker's pids, from inside the container (no procps
/// there; `work[e]r` keeps the scanning shell itself out of the match).
fn worker_pids(c: &Container) -> BTreeSet<i64> {
    c.sh_ok(
        "for d in /proc/[0-9]*; do tr '\\0' ' ' < $d/cmdline 2>/dev/null \
         | grep -q 'python3 -u /share/work[e]r.py' && echo ${d#/proc/}; done; true",
    )
    .split_whitespace()
    .filter_map(|p| p.parse().ok())
    .collect()
}

/// Waits until the agent waits for the cold slot naming exactly `pids`.
fn wait_drain_holders(ctx: &Ctx, i: usize, pids: &BTreeSet<i64>) -> Value {
    let c = ctx.c(i);
    wait_for(&format!("{} names the worker pids", c.name), T, || {
        let st = c.status().ok_or("no status")?;
        let named: BTreeSet<i64> = st["drain_holders"]
            .as_array()
            .map(|a| a.iter().filter_map(|h| h["pid"].as_i64()).collect())
            .unwrap_or_default();
        if st["phase"] == "waiting-for-cold-slot" && &named == pids {
            Ok(st)
        } else {
            Err(format!("phase {} holders {named:?}", st["phase"]))
        }
    })
}

fn drain(ctx: &Ctx) -> String {
    let i = DRAIN;
    let c = ctx.c(i);
    // d2 goes into the free cold slot; the worker stays on b1's slot,
    // which is now the cold one.
    ctx.build("d2", BuildProfile::TINY);
    ctx.publish("drain", "d2", None);
    ctx.wait_live(i, "d2", T);
    let workers = worker_pids(&c);
    assert_eq!(workers.len(), 2, "{workers:?}");
    // d3 needs that slot: the agent waits and names the worker's pids.
    ctx.build("d3", BuildProfile::TINY);
    ctx.publish("drain", "d3", None);
    let st = wait_drain_holders(ctx, i, &workers);
    let how: Vec<String> = st["drain_holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["how"].as_str().unwrap_or_default().to_string())
        .collect();
    let status_text = c.unit_props("deploy-agent", &["StatusText"]).remove(0);

    // Restart and watchdog kill in the middle of the drain: it resumes.
    let (pid, _) = main_pid(&c);
    c.sh_ok("systemctl restart deploy-agent");
    wait_back(&c, &pid, T);
    wait_drain_holders(ctx, i, &workers);
    let (pid, _) = main_pid(&c);
    sigstop_agent(&c);
    wait_back(&c, &pid, Duration::from_secs(60));
    wait_drain_holders(ctx, i, &workers);
    assert_eq!(c.read("/srv/app/current/BUILD"), "d2");

    // The worker moves to the live build: the cold slot is free, d3 deploys.
    c.sh_ok("systemctl reload web-worker");
    ctx.wait_live(i, "d3", T);
    // The hooks and the health command ran inside the sandbox.
    let log = c.read("/srv/app/hooks.log");
    for want in ["pre-flip d3", "post-flip d3", "health d3"] {
        assert!(log.contains(want), "hooks.log lacks {want:?}:\n{log}");
    }
    format!(
        "holders {workers:?} ({}), Status=\"{status_text}\"; hooks.log ok",
        how.join(", ")
    )
}

fn reboot(ctx: &Ctx) -> String {
    let i = REBOOT;
    // Two builds of ~4,000 files, generated side by side.
    std::thread::scope(|s| {
        s.spawn(|| ctx.build("g2", BuildProfile::SMALL));
        s.spawn(|| ctx.build("g3", BuildProfile::SMALL));
    });
    let mut notes = Vec::new();
    // A clean poweroff (systemd stops the agent with SIGTERM), then a
    // forced one (`-ff`: no service is stopped, every process is killed
    // at once, like pulling the plug on the container's processes).
    for (build, how) in [
        ("g2", "systemctl poweroff --no-block"),
        ("g3", "systemctl poweroff -ff"),
    ] {
        let (path, url, total) = {
            let b = ctx.builds.lock().unwrap();
            let (_, p, u, a) = b.iter().find(|(b, ..)| b == build).unwrap();
            (p.clone(), u.clone(), a.entries)
        };
        let before = ctx.c(i).read("/srv/app/current/BUILD");
        // The agent unpacks while it downloads (phase `downloading`, the
        // entry count in status grows); `unpacking` is only the fsync and
        // the ready-marker. A trickled download (~20 s) makes the writing
        // of entries slow enough to stop in the middle of it.
        let size = std::fs::metadata(&path).unwrap().len();
        let url_path = url
            .split_once("/b/")
            .map(|(_, p)| format!("/b/{p}"))
            .unwrap();
        ctx.artifacts.set_fault(
            FaultRule::always(Fault::Trickle {
                bytes_per_sec: (size / 20).max(4096),
            })
            .on_path(url_path),
        );
        // Inside the container, a loop polls the status socket with curl
        // and powers off once a third of the entries are written; it
        // prints the status it saw.
        // It gives up after two minutes (the trickle takes ~20 s) and
        // prints what it saw last instead of powering off.
        let watcher = format!(
            "end=$(($(date +%s) + 120)); \
             while :; do s=$(curl -s --max-time 2 --unix-socket /run/deploy-agent/agent.sock http://agent/v1/status); \
             n=$(echo \"$s\" | sed -n 's/.*\"entries\":\\([0-9]*\\).*/\\1/p'); \
             case \"$s\" in *'\"build\":\"{build}\"'*) [ \"${{n:-0}}\" -gt {third} ] && break;; esac; \
             [ \"$(date +%s)\" -gt \"$end\" ] && {{ echo \"gave up; last status: $s\"; exit 3; }}; \
             sleep 0.05; done; echo \"$s\"; {how}",
            third = total / 3,
        );
        let at = std::thread::scope(|s| {
            let seen = s.spawn(|| {
                let c = ctx.c(i);
                c.exec(&["/bin/sh", "-c", &watcher])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_else(|e| e.to_string())
            });
            std::thread::sleep(Duration::from_millis(300));
            ctx.publish("reboot", build, None);
            seen.join().unwrap()
        });
        let at: Value = serde_json::from_str(at.lines().next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("watcher saw {at:?}: {e}"));
        let at_entries = at["progress"]["entries"].as_u64().unwrap_or(0);
        {
            let mut c = ctx.hosts[i].write().unwrap();
            c.poweroff(&[], Duration::from_secs(60));
            ctx.artifacts.clear_faults();
            c.boot_again();
            c.wait_booted(Duration::from_secs(120)).unwrap();
        }
        let c = ctx.c(i);
        // Right after boot: `current` is a whole build, the one before.
        let first = assert_complete(&c, &ctx.builds.lock().unwrap());
        assert_eq!(first, before, "current changed across the reboot");
        let enabled = c.sh("systemctl is-enabled deploy-agent");
        assert_eq!(enabled.trim(), "enabled");
        drop(c);
        ctx.wait_live(i, build, Duration::from_secs(180));
        assert_complete(&ctx.c(i), &ctx.builds.lock().unwrap());
        assert!(
            at_entries > 0 && at_entries < total,
            "not in the middle: {at_entries} of {total}"
        );
        notes.push(format!(
            "`{how}` at {at_entries} of {total} entries written (phase {}): after boot current={first} (complete), then {build} live and complete",
            at["phase"]
        ));
    }
    notes.join("; ")
}

/// Upgrades and removal through dpkg on a running host: a reinstall with a
/// valid config restarts the agent; with an invalid one it is not
/// restarted and dpkg says why; `dpkg -r` stops and disables it and leaves
/// the live build serving; `dpkg -P` removes the config.
fn package_lifecycle(ctx: &Ctx) -> String {
    let i = ROLLOUT - 1;
    let c = ctx.c(i);
    let consul = ctx.consul.url();
    let (pid, _) = main_pid(&c);
    let out = c.sh_ok("dpkg -i /share/deploy-agent.deb 2>&1");
    let new_pid = wait_back(&c, &pid, T);
    assert!(!out.contains("does not validate"), "{out}");

    c.write(
        "/etc/deploy-agent/config.toml",
        &agent_config(&c, &consul, tier(i), "bogus-key = 1\n"),
    );
    let out = c.sh_ok("dpkg -i /share/deploy-agent.deb 2>&1");
    assert!(out.contains("does not validate"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(main_pid(&c).0, new_pid, "restarted with an invalid config");

    c.sh_ok("dpkg -r deploy-agent 2>&1");
    let state = c.sh("systemctl is-enabled deploy-agent; systemctl is-active deploy-agent");
    assert!(
        !state.contains("enabled\n") && state.contains("inactive"),
        "{state}"
    );
    assert_eq!(
        c.read("/srv/app/current/BUILD"),
        "b2",
        "removal touched the live build"
    );
    assert!(
        c.host_path("/etc/deploy-agent/config.toml").exists(),
        "conffile kept on remove"
    );
    c.sh_ok("dpkg -P deploy-agent 2>&1");
    assert!(
        !c.host_path("/etc/deploy-agent/config.toml").exists(),
        "purge keeps the config"
    );
    assert!(c.host_path("/srv/app/current/BUILD").exists());
    "reinstall restarts (valid config), refuses (invalid), remove keeps the live build, purge drops the config".into()
}

fn security(ctx: &Ctx) -> String {
    let c = ctx.c(0);
    let out = c.sh("systemd-analyze security deploy-agent --no-pager 2>&1");
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line:\n{out}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    eprintln!("[containers] {}", line.trim());
    assert!(
        score <= EXPOSURE_BEFORE,
        "exposure rose: {score} > {EXPOSURE_BEFORE}"
    );
    line.trim().to_string()
}

fn log_format(ctx: &Ctx) -> String {
    let mut seen = BTreeSet::new();
    let mut n = 0;
    for i in [0, RELOAD] {
        let c = ctx.c(i);
        let entries = c.journal("deploy-agent");
        for e in entries
            .iter()
            .filter(|e| e["SYSLOG_IDENTIFIER"] == "deploy-agent")
        {
            n += 1;
            let msg = e["MESSAGE"]
                .as_str()
                .unwrap_or_else(|| panic!("MESSAGE is not text (binary/ANSI?): {e}"));
            assert!(!msg.contains('\u{1b}'), "ANSI escape in {msg:?}");
            assert!(
                !msg.starts_with('<'),
                "priority prefix not consumed: {msg:?}"
            );
            let prio: u8 = e["PRIORITY"].as_str().unwrap().parse().unwrap();
            // The level word agrees with the journal priority.
            for (word, p) in [("ERROR", 3), ("WARN", 4), ("INFO", 6), ("DEBUG", 7)] {
                if msg.starts_with(word) {
                    assert_eq!(prio, p, "{msg}");
                }
            }
            assert_eq!(e["_SYSTEMD_UNIT"], "deploy-agent.service");
            seen.insert(prio);
        }
        let msgs = agent_messages(&entries);
        assert!(
            msgs.iter().any(|(m, _)| m.contains("build=")),
            "no structured build= field: {msgs:?}"
        );
    }
    assert!(
        seen.contains(&6) && seen.contains(&3),
        "priorities seen: {seen:?}"
    );
    format!("{n} agent entries, priorities {seen:?}, no ANSI")
}
