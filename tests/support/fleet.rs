//! A fleet on one machine for the fleet tests and the fleet benchmark: N
//! real `deploy-agent run` processes, each in its own network namespace
//! (a veth to a bridge in the root namespace) and mount namespace (`ip
//! netns exec` makes one) with its own deploy root on tmpfs, plus one
//! Consul-compatible server and one artifact server in this process, bound
//! to the bridge's address.
//!
//! Every address lives on the bridge and inside the namespaces made here
//! (198.18.0.0/15, the range reserved for benchmarking networks); [`Fleet`]
//! tears all of it down on drop, panics included.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use deploy_agent::fleet::host::hostreport::HostRecord;
use deploy_agent::manifest::Format;
use testkit::buildgen::{self, Artifact, BuildProfile};
use testkit::testserver::artifact::ArtifactServer;
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig};

pub const APP: &str = "web";
pub const TIER: &str = "production";
/// The build generator's seed of every [`Fleet::build`]: a build made
/// elsewhere with it and the same id has the same bytes.
pub const BUILD_SEED: u64 = 11;

/// Why the fleet cannot run here, if it cannot (not root, no `ip`).
pub fn unsupported() -> Option<String> {
    if !crate::disk::is_root() {
        return Some("not root: network namespaces need CAP_NET_ADMIN".into());
    }
    let ip = Command::new("ip").arg("-V").output();
    if !ip.is_ok_and(|o| o.status.success()) {
        return Some("`ip` (iproute2) is missing".into());
    }
    None
}

use crate::netns::{must, run, Net};

/// One fleet host in its own network and mount namespace (unlike
/// [`crate::host::Host`], a plain process): its namespace, deploy root and
/// agent process.
#[derive(Debug)]
pub struct NsHost {
    pub id: String,
    pub ns: String,
    pub veth: String,
    pub dir: PathBuf,
    pub root: PathBuf,
    pub child: Option<Child>,
    /// A small tmpfs mounted as the deploy root (the disk-full host).
    pub small_disk: bool,
}

impl NsHost {
    /// The build `current` serves ("" when none).
    pub fn served(&self) -> String {
        crate::process::served(&self.root)
    }

    /// Cuts the host's link (the veth's bridge side goes down).
    pub fn cut(&self) {
        must(&["ip", "link", "set", &self.veth, "down"]);
    }

    pub fn restore(&self) {
        must(&["ip", "link", "set", &self.veth, "up"]);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            // Up to 10 s to exit, then killed.
            let _ = crate::poll_until(Duration::from_secs(10), crate::POLL, || {
                match c.try_wait() {
                    Ok(Some(_)) => Ok(()),
                    _ => Err(()),
                }
            });
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.small_disk {
            let _ = run(&["umount", "-l", &self.root.display().to_string()]);
            self.small_disk = false;
        }
    }
}

/// Knobs of a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub hosts: usize,
    pub splay_max: Duration,
    /// Hosts whose deploy root is a tmpfs of this many MiB.
    pub small_disks: Vec<(usize, u64)>,
    pub profile: BuildProfile,
}

/// The whole fleet. Field order is drop order: agents stop first, then the
/// servers, then the network goes away.
#[allow(missing_debug_implementations)] // a test fixture, never printed
pub struct Fleet {
    pub hosts: Vec<NsHost>,
    pub consul: ConsulServer,
    pub artifacts: Option<ArtifactServer>,
    pub artifact_addr: SocketAddr,
    pub net: Net,
    pub tmp: tempfile::TempDir,
    pub bin: PathBuf,
    /// Every artifact served, to re-add after an artifact-server restart.
    files: Vec<(String, Vec<u8>)>,
    profile: BuildProfile,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            h.stop();
        }
    }
}

impl Fleet {
    /// Creates the network, the servers and starts every agent.
    pub async fn start(opts: FleetOptions) -> Fleet {
        let bin = tokio::task::spawn_blocking(crate::agent_bin).await.unwrap();
        let net = Net::create("daf", 18, opts.hosts);
        let gw = net.gateway();
        let consul = ConsulServer::start(ConsulServerConfig {
            addr: Some(SocketAddr::from((gw, 0))),
            ..ConsulServerConfig::default()
        })
        .await
        .unwrap();
        let artifacts = ArtifactServer::start_at(SocketAddr::from((gw, 0)))
            .await
            .unwrap();
        let artifact_addr: SocketAddr = artifacts
            .url("/")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        let tmp = crate::fast_tempdir();
        let mut hosts = Vec::new();
        for i in 0..opts.hosts {
            let id = format!("host-{i:03}");
            let dir = tmp.path().join(&id);
            let root = dir.join("root");
            std::fs::create_dir_all(&root).unwrap();
            let small = opts.small_disks.iter().find(|(h, _)| *h == i);
            if let Some((_, mib)) = small {
                let size = format!("size={mib}m");
                must(&[
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    &size,
                    "tmpfs",
                    &root.display().to_string(),
                ]);
            }
            let config = format!(
                r#"deploy-root = "{root}"
[consul]
address = "{consul}"
wait = "60s"
rate-interval = "200ms"
[download]
connect-timeout = "1s"
read-timeout = "3s"
retries = 2
[drain]
cold-deadline = "2s"
[status]
socket = "{dir}/agent.sock"
[fleet]
app = "{APP}"
tier = "{TIER}"
host-id = "{id}"
splay-max = "{splay}ms"
"#,
                root = root.display(),
                consul = consul.url(),
                dir = dir.display(),
                splay = opts.splay_max.as_millis(),
            );
            std::fs::write(dir.join("config.toml"), config).unwrap();
            hosts.push(NsHost {
                id,
                ns: net.namespaces[i].clone(),
                veth: net.veths[i].clone(),
                dir,
                root,
                child: None,
                small_disk: small.is_some(),
            });
        }
        let mut fleet = Fleet {
            hosts,
            consul,
            artifacts: Some(artifacts),
            artifact_addr,
            net,
            tmp,
            bin,
            files: Vec::new(),
            profile: opts.profile,
        };
        for i in 0..fleet.hosts.len() {
            fleet.spawn(i);
        }
        fleet
    }

    fn spawn(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        let log = std::fs::File::create(h.dir.join("agent.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .arg(&self.bin)
            .args(["--log-format", "text", "run", "--config"])
            .arg(h.dir.join("config.toml"))
            .env_remove("CONSUL_HTTP_ADDR")
            .env_remove("CONSUL_HTTP_TOKEN")
            .env_remove("NOTIFY_SOCKET")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        h.child = Some(child);
    }

    /// Generates build `id`, serves it, returns (local artifact path, url, artifact).
    pub fn build(&mut self, id: &str) -> (PathBuf, String, Artifact) {
        self.build_changing(id, 0.1)
    }

    /// [`Fleet::build`] where `changed` (0 to 1) of the sources differ
    /// between two build ids (`buildgen::write_build_changing`; `build`
    /// uses 0.1): with 0.005 two builds differ in about 1% of their files,
    /// as for delta deploys.
    pub fn build_changing(&mut self, id: &str, changed: f64) -> (PathBuf, String, Artifact) {
        let path = self.tmp.path().join(format!("{id}.tar.gz"));
        let a = buildgen::write_build_changing(
            self.profile,
            BUILD_SEED,
            id,
            Format::TarGz,
            &path,
            changed,
        )
        .unwrap();
        let url = self.serve(&format!("/b/{id}.tar.gz"), &path);
        (path, url, a)
    }

    /// Serves the file at `path` as `url_path` (again after an
    /// artifact-server restart); returns its URL.
    pub fn serve(&mut self, url_path: &str, path: &Path) -> String {
        let bytes = std::fs::read(path).unwrap();
        self.artifacts().add(url_path, bytes.clone());
        self.files.push((url_path.to_string(), bytes));
        self.artifacts().url(url_path)
    }

    pub fn artifacts(&self) -> &ArtifactServer {
        self.artifacts.as_ref().expect("artifact server is up")
    }

    /// Takes the artifact server down (connections refused).
    pub fn artifacts_down(&mut self) {
        self.artifacts = None;
    }

    /// Brings it back on the same address with the same files.
    pub async fn artifacts_up(&mut self) {
        let mut tries = 0;
        let s = loop {
            match ArtifactServer::start_at(self.artifact_addr).await {
                Ok(s) => break s,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.artifact_addr),
            }
        };
        for (p, b) in &self.files {
            s.add(p, b.clone());
        }
        self.artifacts = Some(s);
    }

    /// Host `i`'s report in Consul.
    pub fn report(&self, i: usize) -> Option<HostRecord> {
        let key = format!("deploy-hosts/{APP}/{}", self.hosts[i].id);
        let e = self.consul.get(&key)?;
        serde_json::from_slice(&e.value).ok()
    }

    /// Runs `deploy-agent <args> --app web --tier production --consul ...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = Command::new(&self.bin)
            .args(args)
            .args(["--app", APP, "--tier", TIER, "--consul", &self.consul.url()])
            .env_remove("CONSUL_HTTP_ADDR")
            .output()
            .unwrap();
        out
    }

    /// Like [`Fleet::cli`], asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "deploy-agent {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `ok(host index)` holds for every host in `which`.
    pub async fn wait_hosts(
        &self,
        which: &[usize],
        what: &str,
        limit: Duration,
        ok: impl Fn(usize) -> bool,
    ) {
        let start = Instant::now();
        let waited = crate::poll_until_async(limit, Duration::from_millis(50), || async {
            for h in &self.hosts {
                if let Some(c) = h.child.as_ref() {
                    let dead = std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
                        .map_or(true, |s| s.contains(") Z "));
                    if dead {
                        let log =
                            std::fs::read_to_string(h.dir.join("agent.log")).unwrap_or_default();
                        panic!("{what}: the agent of {} exited:\n{log}", h.id);
                    }
                }
            }
            let missing: Vec<usize> = which.iter().copied().filter(|i| !ok(*i)).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(missing)
            }
        })
        .await;
        match waited {
            Ok(()) => eprintln!("[fleet] {what}: {:.1} s", start.elapsed().as_secs_f64()),
            Err(missing) => {
                let detail: Vec<String> = missing
                    .iter()
                    .take(5)
                    .map(|i| {
                        let log = std::fs::read_to_string(self.hosts[*i].dir.join("agent.log"))
                            .unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(8).collect();
                        format!(
                            "{} serves {:?}, report {:?}\n  log tail: {}",
                            self.hosts[*i].id,
                            self.hosts[*i].served(),
                            self.report(*i),
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
                        )
                    })
                    .collect();
                panic!(
                    "{what}: {} hosts not there after {limit:?}:\n{}",
                    missing.len(),
                    detail.join("\n")
                );
            }
        }
    }

    pub fn all(&self) -> Vec<usize> {
        (0..self.hosts.len()).collect()
    }
}
