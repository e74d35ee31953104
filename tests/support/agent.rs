//! A harness that runs the real agent (library) against the in-process
//! Consul-compatible and artifact servers on loopback.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use deploy_agent::buildgen::{self, Artifact, BuildProfile};
use deploy_agent::config::{Config, ConsulConfig, SourceConfig};
use deploy_agent::daemon::{Agent, RunOptions, StatusInner};
use deploy_agent::deploy::{DeployRecord, Outcome};
use deploy_agent::manifest::Format;
use deploy_agent::testserver::artifact::ArtifactServer;
use deploy_agent::testserver::consul::{ConsulServer, ConsulServerConfig};
use deploy_agent::watch::consul::{Backoff, ConsulSettings, RateLimit};
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
        let mut config = Config {
            deploy_root: root.clone(),
            cache_dir: None,
            source: SourceConfig {
                key: Some(KEY.into()),
                file: None,
            },
            consul: ConsulConfig {
                address: consul.url(),
                ..ConsulConfig::default()
            },
            download: Default::default(),
            unpack: Default::default(),
            drain: Default::default(),
            hooks: Default::default(),
            fleet: Default::default(),
            status: deploy_agent::status::StatusConfig {
                socket: Some(tmp.path().join("agent.sock")),
                ..Default::default()
            },
        };
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
        self.shutdown = CancellationToken::new();
        let agent = Agent::start(
            self.config.clone(),
            RunOptions {
                consul: Some(fast_consul(&self.consul.url())),
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
        std::fs::read_to_string(self.root.join("current/BUILD")).unwrap_or_default()
    }

    /// Waits for the `nth` finished deploy (1-based) and returns it.
    pub async fn wait_history(&self, nth: usize, limit: Duration) -> DeployRecord {
        let start = Instant::now();
        loop {
            let s = self.status();
            if s.history.len() >= nth {
                return s.history[nth - 1].clone();
            }
            assert!(
                start.elapsed() < limit,
                "no deploy #{nth} after {limit:?}; status: {s:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `build` is served, with a deploy record of success.
    pub async fn wait_live(&self, build: &str, limit: Duration) -> DeployRecord {
        let start = Instant::now();
        loop {
            let s = self.status();
            if self.served() == build {
                if let Some(r) = s.history.iter().rev().find(|r| {
                    r.build == build
                        && matches!(r.outcome, Some(Outcome::Success | Outcome::RolledBack))
                }) {
                    return r.clone();
                }
            }
            assert!(
                start.elapsed() < limit,
                "{build} not live after {limit:?} (serving {:?}); status: {s:#?}",
                self.served()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the agent reports an error containing `needle`.
    pub async fn wait_error(&self, needle: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let s = self.status();
            if let Some(e) = &s.last_error {
                if e.message.contains(needle) {
                    return e.message.clone();
                }
            }
            assert!(
                start.elapsed() < limit,
                "no error containing {needle:?} after {limit:?}; status: {s:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
