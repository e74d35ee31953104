//! A stateful randomized test of intent (issue "Control you can trust"):
//! real `deploy-agent run` processes with the shipped `[consul]` rates,
//! the project's Consul-compatible server, and a seeded random stream of
//! commander steps (publish, promote, freeze, unfreeze, release rollback),
//! operator steps (hold, resume, rollback, redeploy), SIGKILL + restart,
//! Consul outages and config reloads. After every step, while the hosts
//! settle, it checks:
//! - a held host never changes `current` until resume or redeploy;
//! - while the fleet is frozen no host flips because of the tier key
//!   (an operator rollback on the host still may);
//! - `current` is always a complete, marked build;
//! - a host that is neither held nor frozen converges to what its rollout
//!   decision names within `CONVERGE` (the documented bound);
//! - whenever a host knows it is not converged, its status says why.
//!
//! `INTENT_SEED` replays a run, `INTENT_STEPS` sets its length (200 by
//! default). The seed is printed at the start and in every failure.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use deploy_agent::fleet::commander::release::Release;
use deploy_agent::manifest::{BuildSpec, Manifest, UrlPolicy};
use deploy_agent_tests::host::{in_process_release, tiny_spec, Host};
use deploy_agent_tests::{fast_tempdir, poll_until_async};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::testserver::artifact::ArtifactServer;
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig, Fault};

/// How long a host that is neither held nor frozen may take to converge
/// after the last disturbance: the watch's first-request splay after a
/// restart (5 s), error backoff after an outage, the deploy retry (5 s,
/// doubling after real failures) and the 5 s freeze re-check, with room
/// for a loaded CI machine.
const CONVERGE: Duration = Duration::from_secs(60);
const BUILDS: [&str; 4] = ["b0", "b1", "b2", "b3"];
const HOSTS: usize = 2;

/// What the test knows of each host's intent.
#[derive(Debug, Clone, Default)]
struct HostModel {
    /// Held: `current` must stay at this build.
    held_at: Option<String>,
    /// Frozen fleet: `current` must stay at this build unless an operator
    /// rollback on this host moves it.
    frozen_at: Option<String>,
}

struct World {
    seed: u64,
    consul: ConsulServer,
    release: Release,
    specs: HashMap<&'static str, BuildSpec>,
    hosts: Vec<Host>,
    model: Vec<HostModel>,
    frozen: bool,
    log: Vec<String>,
}

impl World {
    fn fail(&self, what: String) -> ! {
        for h in &self.hosts {
            let log = h.proc.as_ref().map(|p| p.log()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "---- {} log tail ----\n{}",
                h.id,
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
        let tail: Vec<&String> = self.log.iter().rev().take(12).collect();
        panic!(
            "seed {} (replay: INTENT_SEED={} cargo test -p deploy-agent --test system intent_random): {what}\nlast steps (newest first): {tail:#?}",
            self.seed, self.seed
        );
    }

    /// The manifest published now, if any.
    async fn manifest(&self) -> Option<Manifest> {
        let r = self
            .release
            .client
            .get(&self.release.key, &Default::default())
            .await;
        let pair = r.ok()?.pair?;
        Manifest::parse(&pair.value, UrlPolicy { allow_file: true }).ok()
    }

    /// The build host `i`'s rollout decision names (`None`: any).
    fn decided(&self, m: &Manifest, i: usize) -> Option<String> {
        let (_, chosen) = deploy_agent::fleet::effective(m, &self.hosts[i].id);
        chosen.map(|c| c.spec.build)
    }

    /// Checks the invariants that hold at every instant.
    fn check_now(&self, i: usize) {
        let h = &self.hosts[i];
        let served = h.served();
        if !BUILDS.contains(&served.as_str()) && !served.is_empty() {
            self.fail(format!(
                "{}: current is not a complete build: {served:?}",
                h.id
            ));
        }
        if let Some(b) = &self.model[i].held_at {
            if &served != b {
                self.fail(format!("{}: held at {b} but serves {served}", h.id));
            }
        }
        if let Some(b) = &self.model[i].frozen_at {
            if &served != b {
                self.fail(format!("{}: frozen at {b} but flipped to {served}", h.id));
            }
        }
    }

    /// Waits until every host is converged or legitimately not (held,
    /// frozen), checking the invariants all along.
    async fn settle(&mut self) {
        let start = Instant::now();
        let m = self.manifest().await;
        // Since when each host has been unexplained: status can say
        // `idle` for the few milliseconds between recording a new desired
        // build and starting its deploy, so only a lasting silence counts.
        let mut silent: Vec<Option<Instant>> = vec![None; self.hosts.len()];
        let settled = poll_until_async(CONVERGE, Duration::from_millis(100), || {
            let mut all = true;
            for (i, silent_since) in silent.iter_mut().enumerate() {
                self.check_now(i);
                let h = &self.hosts[i];
                let want = m.as_ref().and_then(|m| self.decided(m, i));
                let pinned = self.model[i].held_at.is_some() || self.model[i].frozen_at.is_some();
                let served = h.served();
                let converged = pinned || want.as_ref().is_none_or(|w| *w == served);
                if converged {
                    continue;
                }
                all = false;
                let v = h.status();
                if v["hot"]["build"].as_str().unwrap_or("") != served && !served.is_empty() {
                    // Status reads the hot slot's ready-marker: `current`
                    // always points at a marked slot.
                    let again = h.served();
                    if v["hot"]["build"].as_str().unwrap_or("") != again {
                        self.fail(format!("{}: current {again} but marker says {v:#}", h.id));
                    }
                }
                // `served` was read before `status`: a deploy that ended in
                // between is converged, not unexplained.
                if want.as_ref().is_some_and(|w| *w == h.served()) {
                    continue;
                }
                let knows = v["desired"]["build"].as_str().is_some_and(|d| d != served);
                let state = v["state"]["state"].as_str().unwrap_or("");
                let explained = state != "idle" || !v["last_error"].is_null();
                // A reloaded or restarted agent waits up to the shipped
                // first-request splay before it reads the key again (rule 9:
                // a fleet-wide restart must not hit Consul at once).
                let splay = deploy_agent::consul::ConsulSettings::default().first_request_splay;
                if !knows || explained {
                    *silent_since = None;
                    continue;
                }
                let since = *silent_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(1)
                    && start.elapsed() > Duration::from_secs(3) + splay
                {
                    self.fail(format!(
                        "{}: not converged (serves {served}, wants {want:?}) and status says nothing: {v:#}",
                        h.id
                    ));
                }
            }
            std::future::ready(if all { Ok(()) } else { Err(()) })
        })
        .await;
        if settled.is_err() {
            let st: Vec<serde_json::Value> = self.hosts.iter().map(|h| h.status()).collect();
            self.fail(format!("not converged within {CONVERGE:?}: {st:#?}"));
        }
    }

    /// Waits for host `i` to have no deploy in flight (a deploy already
    /// flipping completes after a hold or a freeze) and returns what it
    /// serves then.
    async fn at_rest(&self, i: usize) -> String {
        let rest = poll_until_async(CONVERGE, Duration::from_millis(50), || async {
            let v = self.hosts[i].status();
            let phase = v["phase"].as_str().unwrap_or("idle");
            if matches!(phase, "idle" | "done" | "failed") {
                Ok(self.hosts[i].served())
            } else {
                Err(v)
            }
        })
        .await;
        rest.unwrap_or_else(|v| {
            self.fail(format!("{} never came to rest: {v:#}", self.hosts[i].id))
        })
    }

    async fn step(&mut self, rng: &mut StdRng, n: usize) {
        let i = rng.gen_range(0..self.hosts.len());
        let pick = rng.gen_range(0..100);
        let m = self.manifest().await;
        let what = match pick {
            0..=21 => {
                let b = BUILDS[rng.gen_range(0..BUILDS.len())];
                let pct = [100.0, 100.0, 50.0, 10.0][rng.gen_range(0..4)];
                let pct = (pct < 100.0 && m.is_some()).then_some(pct);
                match self.release.publish(&self.specs[b], pct).await {
                    Ok(_) => format!("publish {b} at {pct:?}"),
                    Err(e) => format!("publish {b}: {e}"),
                }
            }
            22..=31 => match self.release.promote(100.0).await {
                Ok(_) => "promote to 100".into(),
                Err(e) => format!("promote: {e}"),
            },
            32..=39 => match self.release.rollback().await {
                Ok(_) => "release rollback".into(),
                Err(e) => format!("release rollback: {e}"),
            },
            40..=47 if !self.frozen => {
                self.release.freeze("random", "test").await.unwrap();
                self.frozen = true;
                for j in 0..self.hosts.len() {
                    let at = self.at_rest(j).await;
                    self.model[j].frozen_at = Some(at);
                }
                "release freeze".into()
            }
            40..=47 => {
                self.release.unfreeze().await.unwrap();
                self.frozen = false;
                for mm in &mut self.model {
                    mm.frozen_at = None;
                }
                "release unfreeze".into()
            }
            48..=57 if self.model[i].held_at.is_none() => {
                let out = self.hosts[i].cli(&["hold", "--reason", "random"]);
                assert!(
                    out.status.success(),
                    "hold h{i}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let at = self.at_rest(i).await;
                self.model[i].held_at = Some(at);
                format!("hold h{i}")
            }
            48..=57 => {
                let out = self.hosts[i].cli(&["resume"]);
                assert!(
                    out.status.success(),
                    "resume h{i}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                self.model[i].held_at = None;
                format!("resume h{i}")
            }
            58..=65 => {
                let out = self.hosts[i].cli(&["rollback"]);
                if out.status.success() {
                    let at = self.hosts[i].served();
                    self.model[i].held_at = Some(at.clone());
                    if self.model[i].frozen_at.is_some() {
                        self.model[i].frozen_at = Some(at);
                    }
                    format!("rollback h{i}")
                } else {
                    format!(
                        "rollback h{i} refused: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                }
            }
            66..=71 => {
                let out = self.hosts[i].cli(&["redeploy"]);
                assert!(
                    out.status.success(),
                    "redeploy h{i}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                self.model[i].held_at = None;
                format!("redeploy h{i}")
            }
            72..=81 => {
                let h = &mut self.hosts[i];
                h.proc().signal(Signal::SIGKILL);
                h.proc.as_mut().unwrap().wait_exit(CONVERGE);
                h.start();
                // Wait for the socket before going on.
                let _ = h.status();
                format!("SIGKILL + restart h{i}")
            }
            82..=89 => {
                let ms = rng.gen_range(300..2500);
                self.consul.set_fault(Fault::Status(500));
                let until = Instant::now() + Duration::from_millis(ms);
                while Instant::now() < until {
                    for j in 0..self.hosts.len() {
                        self.check_now(j);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                self.consul.set_fault(Fault::None);
                format!("Consul outage {ms} ms")
            }
            _ => {
                let h = &self.hosts[i];
                let extra = format!("[hooks]\ntimeout = \"{}s\"", 30 + n % 30);
                h.write_config(&h.id, &self.consul.url(), &extra);
                h.proc().signal(Signal::SIGHUP);
                format!("reload h{i}")
            }
        };
        self.log.push(format!("{n}: {what}"));
        self.settle().await;
    }
}

fn build_artifacts(dir: &Path, art: &ArtifactServer) -> HashMap<&'static str, BuildSpec> {
    BUILDS
        .iter()
        .map(|b| (*b, tiny_spec(art, dir, b)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_intent_steps_keep_every_promise() {
    let seed: u64 = std::env::var("INTENT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let steps: usize = std::env::var("INTENT_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    println!("intent_random: seed {seed}, {steps} steps (replay: INTENT_SEED={seed} cargo test -p deploy-agent --test system intent_random)");
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = fast_tempdir();
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let art = ArtifactServer::start().await.unwrap();
    let specs = build_artifacts(tmp.path(), &art);
    let release = in_process_release(&consul);
    let mut hosts: Vec<Host> = (0..HOSTS)
        .map(|i| Host::new(tmp.path(), &format!("h{i}"), &consul.url(), ""))
        .collect();
    for h in &mut hosts {
        h.start();
    }
    let mut w = World {
        seed,
        consul,
        release,
        specs,
        hosts,
        model: vec![HostModel::default(); HOSTS],
        frozen: false,
        log: Vec::new(),
    };
    w.release.publish(&w.specs["b0"], None).await.unwrap();
    w.settle().await;
    let t0 = Instant::now();
    for n in 0..steps {
        w.step(&mut rng, n).await;
    }
    // Lift every intent: everyone converges.
    if w.frozen {
        w.release.unfreeze().await.unwrap();
        w.frozen = false;
        for m in &mut w.model {
            m.frozen_at = None;
        }
    }
    for i in 0..HOSTS {
        assert!(w.hosts[i].cli(&["resume"]).status.success());
        w.model[i].held_at = None;
    }
    w.settle().await;
    println!(
        "intent_random: seed {seed}: {steps} steps in {:.0} s, every invariant held",
        t0.elapsed().as_secs_f64()
    );
}
