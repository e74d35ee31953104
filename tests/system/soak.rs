//! The self-healing soak (issue "No host ever wedges"): the real agent
//! process with its shipped settings, a deploy root on a small tmpfs, a
//! seeded random stream of builds of varied size, file count, format and
//! compressibility, and random faults: the disk filled from outside and
//! freed, artifact 503s, truncated and stalled downloads, Consul outages,
//! SIGKILL of the agent, and publishes that arrive mid-deploy.
//!
//! After every step, and all along while the host settles:
//! - `current` is a complete, marked build;
//! - the agent's own disk use stays within two slots + `cache-keep`
//!   artifacts + one partial download;
//! - once the step's fault is cleared, the desired build goes live within
//!   `HEAL_BOUND` with no operator action;
//! - a failure that stops progress is visible in `status` while it lasts.
//!
//! Needs root (tmpfs); prints why it skips otherwise. `SOAK_SEED` replays a
//! run, `SOAK_STEPS` sets its length (30 by default).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use deploy_agent::manifest::Format;
use deploy_agent_tests::disk::{fill, Tmpfs};
use deploy_agent_tests::fast_tempdir;
use deploy_agent_tests::process::{status_json as status, Proc};
use deploy_agent_tests::{needs_root, poll_until_async, precondition};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::buildgen::{self, Artifact, BuildProfile};
use testkit::testserver::artifact::{ArtifactServer, Fault, FaultRule};
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig, Fault as ConsulFault};

const KEY: &str = "deploy/app/production";
/// From "fault cleared" to "desired build live": the deploy retry backoff
/// after several failures (5 s doubling, capped by the step's length), the
/// watch's backoff after an outage, its first-request splay after a
/// restart, plus the deploy itself on a loaded 2-core machine.
const HEAL_BOUND: Duration = Duration::from_secs(90);
const FS_MB: u64 = 96;
const BUILDS: usize = 8;

struct Build {
    id: String,
    manifest: String,
    art: Artifact,
}

fn make_builds(rng: &mut StdRng, dir: &Path, art: &ArtifactServer) -> Vec<Build> {
    (0..BUILDS)
        .map(|i| {
            let id = format!("s{i}");
            let profile = BuildProfile {
                sources: rng.gen_range(3..400),
                assets: rng.gen_range(0..4),
                binaries: 0,
                per_dir: rng.gen_range(10..100),
            };
            let format = [Format::Tar, Format::TarGz, Format::TarZst][rng.gen_range(0..3)];
            let path = dir.join(format!("{id}.{}", format.as_str()));
            let a = buildgen::write_build(profile, rng.gen(), &id, format, &path).unwrap();
            let url = format!("/{id}.{}", format.as_str());
            art.add(&url, std::fs::read(&path).unwrap());
            let manifest = buildgen::manifest_json(&id, &art.url(&url), &a, format);
            Build {
                id,
                manifest,
                art: a,
            }
        })
        .collect()
}

struct Soak {
    seed: u64,
    fs: PathBuf,
    root: PathBuf,
    sock: PathBuf,
    config: PathBuf,
    consul: ConsulServer,
    art: ArtifactServer,
    builds: Vec<Build>,
    proc: Option<Proc>,
    desired: usize,
    /// Bytes the agent may occupy: two slots, `cache-keep` (2) artifacts
    /// and one partial, with the filesystem's per-file rounding.
    disk_bound: u64,
    faults: usize,
    longest_heal: Duration,
    log: Vec<String>,
}

impl Soak {
    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(10).collect();
        let log = self.proc.as_ref().map(Proc::log).unwrap_or_default();
        let log_tail: String = log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
        panic!(
            "seed {s} (replay: SOAK_SEED={s} cargo test -p deploy-agent --test system soak): {what}\nlast steps (newest first): {tail:#?}\nagent log (newest first):\n{log_tail}",
            s = self.seed
        );
    }

    fn served(&self) -> String {
        std::fs::read_to_string(self.root.join("current/BUILD")).unwrap_or_default()
    }

    fn start(&mut self) {
        self.proc = Some(Proc::start(&self.config, None));
    }

    /// The invariants that hold at every instant.
    fn check_now(&self) {
        let served = self.served();
        if !served.is_empty() && !self.builds.iter().any(|b| b.id == served) {
            self.fail(format!("current is not a complete build: {served:?}"));
        }
    }

    /// The agent's own disk use, once it has settled (its off-critical-path
    /// purges done).
    fn check_disk(&self) {
        let used = swapper::fsutil::disk_usage(&self.root);
        if used > self.disk_bound {
            let cache: Vec<String> = std::fs::read_dir(self.root.join(".deploy/cache"))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            self.fail(format!(
                "the agent uses {used} bytes, over its bound of {} (cache: {cache:?})",
                self.disk_bound
            ));
        }
    }

    fn publish(&mut self, i: usize) {
        self.desired = i;
        self.consul.put(KEY, self.builds[i].manifest.clone());
    }

    /// Keeps a fault in place for `hold`, checking that a failure that
    /// stops progress shows in status meanwhile.
    async fn hold_fault(&mut self, hold: Duration, what: &str) {
        let until = Instant::now() + hold;
        let mut shown = false;
        while Instant::now() < until {
            self.check_now();
            if let Some(v) = status(&self.sock) {
                let err = !v["last_error"].is_null();
                let busy = matches!(v["state"]["state"].as_str(), Some("deploying"));
                // Right after a restart the watch waits its first-request
                // splay (5 s shipped) before it reads the key: no failure,
                // and status shows the watch has no answer yet (index 0). (SOAK_SEED
                // 7771345671076171797: a 3.3 s artifact outage fell wholly
                // inside that splay.)
                let splay = v["consul"]["last_index"].as_u64().unwrap_or(0) == 0;
                shown |= err || busy || splay || self.served() == self.builds[self.desired].id;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !shown && hold >= Duration::from_secs(3) && self.proc.is_some() {
            self.fail(format!(
                "{what}: {hold:?} without progress and nothing in status"
            ));
        }
    }

    /// From the moment the faults are cleared: the desired build goes live
    /// within `HEAL_BOUND`.
    async fn heal(&mut self) {
        let start = Instant::now();
        let want = self.builds[self.desired].id.clone();
        let healed = poll_until_async(HEAL_BOUND, Duration::from_millis(100), || async {
            if self.served() == want {
                return Ok(());
            }
            self.check_now();
            Err(())
        })
        .await;
        if healed.is_err() {
            let v = status(&self.sock);
            self.fail(format!(
                "{want} not live {HEAL_BOUND:?} after the faults cleared: {v:#?}"
            ));
        }
        let took = start.elapsed();
        self.longest_heal = self.longest_heal.max(took);
        // Let the purge that follows a deploy finish, then measure.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        self.check_disk();
    }

    async fn step(&mut self, rng: &mut StdRng, n: usize) {
        let b = rng.gen_range(0..self.builds.len());
        let hold = Duration::from_millis(rng.gen_range(1000..5000));
        let what = match rng.gen_range(0..100) {
            0..=24 => {
                self.publish(b);
                format!("publish {}", self.builds[b].id)
            }
            25..=34 => {
                // Two publishes in a row: the second arrives mid-deploy.
                self.publish(b);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
                let c = rng.gen_range(0..self.builds.len());
                self.publish(c);
                format!(
                    "publish {} then {} mid-deploy",
                    self.builds[b].id, self.builds[c].id
                )
            }
            35..=49 => {
                self.faults += 1;
                let filler = fill(&self.fs);
                self.publish(b);
                self.hold_fault(hold, "disk full").await;
                std::fs::remove_file(&filler).unwrap();
                format!(
                    "disk filled from outside for {hold:?}, publish {}",
                    self.builds[b].id
                )
            }
            50..=64 => {
                self.faults += 1;
                let fault = match rng.gen_range(0..3) {
                    0 => Fault::Unavailable,
                    1 => Fault::Truncate {
                        after: rng.gen_range(100..50_000),
                    },
                    _ => Fault::Stall {
                        after: rng.gen_range(0..20_000),
                        duration: Duration::from_millis(rng.gen_range(200..2000)),
                    },
                };
                let desc = format!("{fault:?}");
                self.art.set_fault(FaultRule::always(fault));
                self.publish(b);
                self.hold_fault(hold, &desc).await;
                self.art.clear_faults();
                format!(
                    "artifact {desc} for {hold:?}, publish {}",
                    self.builds[b].id
                )
            }
            65..=79 => {
                self.faults += 1;
                self.consul.set_fault(ConsulFault::Status(500));
                self.hold_fault(hold, "Consul 500").await;
                self.publish(b);
                self.consul.set_fault(ConsulFault::None);
                format!(
                    "Consul outage {hold:?}, publish {} as it ends",
                    self.builds[b].id
                )
            }
            _ => {
                self.faults += 1;
                self.publish(b);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await;
                let p = self.proc.as_mut().unwrap();
                p.signal(Signal::SIGKILL);
                p.wait_exit(Duration::from_secs(30));
                self.check_now();
                self.start();
                format!("publish {} and SIGKILL the agent", self.builds[b].id)
            }
        };
        self.log.push(format!("{n}: {what}"));
        self.heal().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_heals_every_fault_without_a_human() {
    if !precondition(needs_root("the soak mounts a small tmpfs")) {
        return;
    }
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let steps: usize = std::env::var("SOAK_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    println!("soak: seed {seed}, {steps} steps (replay: SOAK_SEED={seed} cargo test -p deploy-agent --test system soak)");
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = fast_tempdir();
    let dir = tmp.path();
    let fs = dir.join("fs");
    let _mount = Tmpfs::mount(&fs, FS_MB);
    let root = fs.join("srv/app");
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let art = ArtifactServer::start().await.unwrap();
    let builds = make_builds(&mut rng, dir, &art);
    let mut unpacked: Vec<u64> = builds
        .iter()
        .map(|b| b.art.unpacked_bytes + b.art.entries * 4096)
        .collect();
    let mut sizes: Vec<u64> = builds.iter().map(|b| b.art.size + 4096).collect();
    unpacked.sort_unstable_by(|a, b| b.cmp(a));
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    // Two slots, two cached artifacts, one partial, plus the metadata.
    let disk_bound = unpacked[0] + unpacked[1] + sizes[0] + sizes[1] + sizes[2] + (1 << 20);
    let sock = dir.join("agent.sock");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "deploy-root = \"{}\"\n[source]\nkey = \"{KEY}\"\n[consul]\naddress = \"{}\"\n[status]\nsocket = \"{}\"\n",
            root.display(),
            consul.url(),
            sock.display()
        ),
    )
    .unwrap();
    let mut s = Soak {
        seed,
        fs,
        root,
        sock,
        config,
        consul,
        art,
        builds,
        proc: None,
        desired: 0,
        disk_bound,
        faults: 0,
        longest_heal: Duration::ZERO,
        log: Vec::new(),
    };
    s.start();
    s.publish(0);
    s.heal().await;
    let t0 = Instant::now();
    for n in 0..steps {
        s.step(&mut rng, n).await;
    }
    println!(
        "soak: seed {seed}: {steps} steps, {} faults, in {:.0} s; longest from fault cleared to desired build live: {:.1} s (bound {:?}); disk bound {} bytes held",
        s.faults,
        t0.elapsed().as_secs_f64(),
        s.longest_heal.as_secs_f64(),
        HEAL_BOUND,
        s.disk_bound
    );
}
