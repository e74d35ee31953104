//! A harness that runs the real agent (library) against the in-process
//! Consul-compatible and artifact servers on loopback.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use deploy_agent::config::Config;
use deploy_agent::consul::ConsulSettings;
use deploy_agent::daemon::live::StatusInner;
use deploy_agent::daemon::{Agent, RunOptions};
use deploy_agent::deploy::{DeployRecord, Outcome};
use deploy_agent::manifest::Format;
use deploy_agent::pacing::{Backoff, RateLimit};
use testkit::buildgen::{self, Artifact, BuildProfile};
use testkit::testserver::artifact::ArtifactServer;
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig};
use tokio_util::sync::CancellationToken;

pub const KEY: &str = "deploy/app/production";

/// Servers, a deploy root and a running agent.
#[allow(missing_debug_implementations)] // a test fixture, never printed
pub struct Harness {
    pub consul: ConsulServer,
    pub artifacts: ArtifactServer,
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub agent: Option<Agent>,
    pub shutdown: CancellationToken,
    pub config: Config,
}

/// Consul settings for tests: short waits, fast buckets, no splay.
pub fn fast_consul(url: &str) -> ConsulSettings {
    ConsulSettings {
        address: url.to_string(),
        wait: Duration::from_secs(5),
        first_request_splay: Duration::ZERO,
        timeout_margin: Duration::from_secs(2),
        rate: RateLimit {
            burst: 4,
            refill_interval: Duration::from_millis(50),
        },
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(400),
        },
        forbidden_retry: Duration::from_millis(500),
        ..ConsulSettings::default()
    }
}

impl Harness {
    /// Starts the servers; the agent starts with [`Harness::start_agent`].
    pub async fn new(tune: impl FnOnce(&mut Config)) -> Harness {
        let consul = ConsulServer::start(ConsulServerConfig::default())
            .await
            .unwrap();
        let artifacts = ArtifactServer::start().await.unwrap();
        let tmp = crate::fast_tempdir();
        let root = tmp.path().join("srv/app");
        let mut config = Config::for_consul_key(root.clone(), KEY, &consul.url());
        config.status.socket = Some(tmp.path().join("agent.sock"));
        config.download.read_timeout = Duration::from_secs(2);
        config.download.retries = 2;
        config.drain.cold_deadline = Duration::from_secs(2);
        tune(&mut config);
        Harness {
            consul,
            artifacts,
            tmp,
            root,
            agent: None,
            shutdown: CancellationToken::new(),
            config,
        }
    }

    pub async fn start_agent(&mut self) {
        self.start_agent_consul(fast_consul(&self.consul.url()))
            .await;
    }

    /// Servers and a running agent with build `good` live: where the fault
    /// matrix tests start. The agent's Consul settings are
    /// `consul(address)` ([`fast_consul`] for most).
    pub async fn live(consul: impl FnOnce(&str) -> ConsulSettings) -> Harness {
        capture_logs();
        let mut h = Harness::new(|_| {}).await;
        h.start_agent_consul(consul(&h.consul.url())).await;
        let (m, _) = h.build("good");
        h.publish(&m);
        h.wait_live("good", Duration::from_secs(60)).await;
        h
    }

    pub async fn stop_agent(&mut self) {
        self.shutdown.cancel();
        if let Some(a) = self.agent.take() {
            tokio::time::timeout(Duration::from_secs(30), a.task)
                .await
                .expect("agent stops within 30 s")
                .unwrap()
                .unwrap();
        }
    }

    /// Generates build `id` (tiny profile), serves it and returns its manifest.
    pub fn build(&self, id: &str) -> (String, Artifact) {
        self.build_with(id, BuildProfile::TINY, Format::TarGz)
    }

    pub fn build_with(
        &self,
        id: &str,
        profile: BuildProfile,
        format: Format,
    ) -> (String, Artifact) {
        let path = self.tmp.path().join(format!("{id}.{}", format.as_str()));
        let a = buildgen::write_build(profile, 7, id, format, &path).unwrap();
        let url_path = format!("/b/{id}.{}", format.as_str());
        self.artifacts.add(&url_path, std::fs::read(&path).unwrap());
        let m = buildgen::manifest_json(id, &self.artifacts.url(&url_path), &a, format);
        (m, a)
    }

    /// Builds, publishes and waits for each of `ids` in turn (tiny
    /// profile): the hot slot then holds the last, the cold one the one
    /// before. Returns their artifacts.
    pub async fn deploy_in_turn(&self, ids: &[&str], limit: Duration) -> Vec<Artifact> {
        let mut artifacts = Vec::new();
        for id in ids {
            let (m, a) = self.build(id);
            self.publish(&m);
            self.wait_live(id, limit).await;
            artifacts.push(a);
        }
        artifacts
    }

    pub fn url_path(id: &str) -> String {
        format!("/b/{id}.tar.gz")
    }

    pub fn publish(&self, manifest: &str) {
        self.consul.put(KEY, manifest.as_bytes());
    }

    pub fn status(&self) -> StatusInner {
        self.agent.as_ref().unwrap().shared.snapshot()
    }

    /// The build id `current` serves (its BUILD file), or "" if none.
    pub fn served(&self) -> String {
        crate::process::served(&self.root)
    }

    /// Waits for the `nth` finished deploy (1-based) and returns it.
    pub async fn wait_history(&self, nth: usize, limit: Duration) -> DeployRecord {
        crate::wait_until_async(&format!("deploy #{nth}"), limit, || async {
            let s = self.status();
            match s.history.get(nth - 1) {
                Some(r) => Ok(r.clone()),
                None => Err(format!("status: {s:#?}")),
            }
        })
        .await
    }

    /// Waits until `build` is served, with a deploy record of success.
    pub async fn wait_live(&self, build: &str, limit: Duration) -> DeployRecord {
        crate::wait_until_async(&format!("{build} live"), limit, || async {
            let s = self.status();
            // The last finished deploy must be this build's: an older
            // record of the same build (deployed before, now being rolled
            // back to) must not count while the new deploy is still running.
            let done = s.history.back().filter(|r| {
                r.build == build
                    && matches!(r.outcome, Some(Outcome::Success | Outcome::RolledBack))
            });
            match done {
                Some(r) if self.served() == build => Ok(r.clone()),
                _ => Err(format!("serving {:?}; status: {s:#?}", self.served())),
            }
        })
        .await
    }

    /// Waits until the agent reports an error containing `needle`.
    pub async fn wait_error(&self, needle: &str, limit: Duration) -> String {
        crate::wait_until_async(
            &format!("an error containing {needle:?}"),
            limit,
            || async {
                let s = self.status();
                match &s.last_error {
                    Some(e) if e.message.contains(needle) => Ok(e.message.clone()),
                    _ => Err(format!("status: {s:#?}")),
                }
            },
        )
        .await
    }

    /// Entries left in the cache directory that are not complete artifacts.
    pub fn cache_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.root.join(".deploy/cache"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

// ---- fault matrix helpers (tests/faults_*.rs) ----

/// Everything the agent logged in this test process (all tests of one
/// binary share it; messages carry build ids, so tests look for their own).
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned()
}

/// Installs (once) a global tracing subscriber writing into a buffer, so a
/// test can assert the error an operator would see in the journal.
pub fn capture_logs() {
    use std::sync::OnceLock;
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let buf = log_buffer().clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(buf.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(sub);
    });
}

fn log_buffer() -> &'static std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| Arc::new(Mutex::new(Vec::new())))
}

struct LogWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.0.lock().unwrap();
        // Bounded: a test that loops on errors must not eat the memory.
        if g.len() < 64 << 20 {
            g.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// (a) Reads `<root>/current/BUILD` in a tight loop on its own thread and
/// records every read that is not `expect` (ENOENT included).
#[allow(missing_debug_implementations)] // a test fixture, never printed
pub struct ServeWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(u64, Vec<String>)>,
    expect: String,
}

impl ServeWatch {
    pub fn start(root: &std::path::Path, expect: &str) -> ServeWatch {
        ServeWatch::start_any(root, &[expect])
    }

    /// Like [`ServeWatch::start`], accepting any of `builds` (a flip in
    /// the window): still never ENOENT nor a half-written build.
    pub fn start_any(root: &std::path::Path, builds: &[&str]) -> ServeWatch {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let path = root.join("current/BUILD");
        let want: Vec<String> = builds.iter().map(|b| b.to_string()).collect();
        let expect = want.join("|");
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut reads, mut bad) = (0u64, Vec::new());
            while !s.load(Ordering::Relaxed) {
                match std::fs::read_to_string(&path) {
                    Ok(b) if want.contains(&b) => {}
                    Ok(b) => bad.push(format!("read {b:?}")),
                    Err(e) => bad.push(format!("{e}")),
                }
                reads += 1;
                if bad.len() > 20 {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            (reads, bad)
        });
        ServeWatch {
            stop,
            handle,
            expect,
        }
    }

    /// Stops the reader; panics if any read did not see the expected build.
    pub fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (reads, bad) = self.handle.join().unwrap();
        assert!(
            bad.is_empty(),
            "current/BUILD did not always serve {:?}: {bad:?}",
            self.expect
        );
        assert!(reads > 0);
        reads
    }
}

impl Harness {
    /// The agent's current deploy is not in flight.
    pub fn deploy_idle(&self) -> bool {
        self.status().deploy.is_none_or(|d| !d.phase.is_active())
    }

    /// (b) Waits (up to `limit`) until the deploy root holds nothing that
    /// grows the disk: an empty trash, at most `cache_keep` complete
    /// artifacts, no partial of `discarded_sha` (a build whose digest
    /// failed), no temp files, and no ready-marker naming `bad_build`.
    pub async fn assert_no_leftovers(
        &self,
        bad_build: Option<&str>,
        discarded_sha: Option<&str>,
        limit: Duration,
    ) {
        crate::wait_until_async("leftovers", limit, || async {
            let problems = self.leftovers(bad_build, discarded_sha);
            if problems.is_empty() {
                Ok(())
            } else {
                Err(format!("{problems:?}; cache {:?}", self.cache_entries()))
            }
        })
        .await;
    }

    /// What [`Harness::assert_no_leftovers`] complains about, now.
    pub fn leftovers(&self, bad_build: Option<&str>, discarded_sha: Option<&str>) -> Vec<String> {
        let mut problems = Vec::new();
        let cache = self.config.cache_dir();
        let entries = self.cache_entries_in(&cache);
        let complete = entries
            .iter()
            .filter(|e| e.len() == 64 && !e.contains('.'))
            .count();
        if complete > self.config.download.cache_keep {
            problems.push(format!(
                "{complete} complete artifacts > cache-keep {}",
                self.config.download.cache_keep
            ));
        }
        for e in &entries {
            let (stem, ext) = e.split_once('.').unwrap_or((e, ""));
            if discarded_sha.is_some_and(|s| s.eq_ignore_ascii_case(stem)) && !ext.is_empty() {
                problems.push(format!("partial of a failed digest kept: {e}"));
            }
            if !matches!(ext, "" | "partial" | "progress") {
                problems.push(format!("stray cache file: {e}"));
            }
        }
        let partials = entries.iter().filter(|e| e.ends_with(".partial")).count();
        if partials > 1 {
            problems.push(format!("{partials} partial downloads"));
        }
        let trash = self.root.join(".deploy/trash");
        let in_trash = std::fs::read_dir(&trash).map(|d| d.count()).unwrap_or(0);
        if in_trash > 0 {
            problems.push(format!("{in_trash} entries in the trash"));
        }
        if let Some(bad) = bad_build {
            for m in ["slot-a.ready", "slot-b.ready"] {
                let text =
                    std::fs::read_to_string(self.root.join(".deploy").join(m)).unwrap_or_default();
                if text.contains(&format!("\"{bad}\"")) {
                    problems.push(format!("{m} names the bad build {bad}: {text}"));
                }
            }
        }
        problems
    }

    fn cache_entries_in(&self, dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// (c) The error is in status (what the socket shows) and in the log.
    pub async fn assert_error_visible(&self, needle: &str, limit: Duration) -> String {
        let msg = self.wait_error(needle, limit).await;
        // The whole message: it names this test's build or server port, so
        // another test's log line cannot satisfy it.
        let what = format!("status shows {msg:?} but the log never says so");
        crate::wait_until_async(&what, limit, || async {
            if captured_logs().contains(&msg) {
                Ok(())
            } else {
                Err("not in the captured log".to_string())
            }
        })
        .await;
        msg
    }

    /// (d) A fresh good build deploys after the fault.
    pub async fn assert_next_good_deploys(&self, id: &str, limit: Duration) {
        let (m, _) = self.build(id);
        self.publish(&m);
        self.wait_live(id, limit).await;
    }

    /// Runs one fault case end to end: with `good` live, publishes `bad`
    /// (whose fault the caller set up), and checks (a) `good` serves
    /// throughout, (b) no leftovers, (c) `needle` in status and log, then
    /// calls `heal` and checks (d) `next` deploys, and (b) again.
    pub async fn fault_case(
        &self,
        bad_manifest: &str,
        bad_build: &str,
        discarded_sha: Option<&str>,
        needle: &str,
        heal: impl FnOnce(&Harness),
        next: &str,
    ) -> String {
        let limit = Duration::from_secs(60);
        let good = self.served();
        assert!(!good.is_empty(), "a build must be live before the fault");
        let watch = ServeWatch::start(&self.root, &good);
        self.publish(bad_manifest);
        let msg = self.assert_error_visible(needle, limit).await;
        // Let the agent retry a failing deploy a few times first: each
        // attempt must clean up after the previous one, not pile up.
        // Up to `limit`, then on either way.
        let start = Instant::now();
        let _ = crate::poll_until_async(limit, crate::POLL, || async {
            let failed = self
                .status()
                .history
                .iter()
                .filter(|r| r.build == bad_build && r.outcome == Some(Outcome::Failed))
                .count();
            let refused_early = failed == 0 && start.elapsed() > Duration::from_secs(1);
            if failed >= 3 || refused_early {
                Ok(())
            } else {
                Err(())
            }
        })
        .await;
        self.assert_no_leftovers(Some(bad_build), discarded_sha, limit)
            .await;
        let reads = watch.finish();
        assert!(reads > 0, "the serve watch ran");
        heal(self);
        self.assert_next_good_deploys(next, limit).await;
        // Healed, the bad build may legitimately have deployed before
        // `next` (it is then the rollback build in the cold slot).
        self.assert_no_leftovers(None, discarded_sha, limit).await;
        msg
    }
}

impl Harness {
    /// Starts the agent with these Consul settings instead of
    /// [`fast_consul`] (to assert the watch's rate limit).
    pub async fn start_agent_consul(&mut self, consul: ConsulSettings) {
        self.shutdown = CancellationToken::new();
        let agent = Agent::start(
            self.config.clone(),
            RunOptions {
                consul: Some(consul),
                retry_initial: Duration::from_millis(300),
                status_socket: true,
                notify: false,
            },
            self.shutdown.clone(),
        )
        .await
        .unwrap();
        self.agent = Some(agent);
    }

    /// The watch's last error (what the status socket shows under `watch`).
    pub fn watch_error(&self) -> Option<String> {
        self.agent
            .as_ref()
            .unwrap()
            .watch_stats
            .snapshot()
            .last_error
    }
}
