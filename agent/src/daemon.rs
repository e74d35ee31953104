//! The long-running agent: feeds manifests from the watch into deploys.
//!
//! One deploy runs at a time. A newer manifest cancels the running deploy
//! at its next safe point and starts the new one; a manifest naming the hot
//! build does nothing; one naming the cold slot's build flips without a
//! download. A failed deploy is retried with backoff while it stays the
//! desired state. Everything the agent knows is in [`Shared`], which the
//! status socket reads.
//!
//! If the process dies, nothing here is lost that matters: the deploy root
//! recovers itself on the next start, the watch hands over the desired
//! state again, and the deploy resumes from the cached partial download.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use swapper::DeployRoot;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::deploy::{now_secs, DeployRecord, Deployer, ErrorRecord, Observer, Outcome};
use crate::error::{Error, Result};
use crate::fetch::{ArtifactCache, FetchSettings};
use crate::manifest::{Manifest, UrlPolicy};
use crate::progress::Progress;
use crate::report::AgentView;
use crate::status::{Command, CommandRequest, Metrics, SocketSettings, StatusServer};
use crate::watch::consul::{ConsulClient, ConsulSettings, WatchEvent, WatchStats};

/// How many finished deploys the agent remembers.
pub const HISTORY_LEN: usize = 50;
/// First retry delay of a failed deploy; doubles up to [`RETRY_MAX`].
pub const RETRY_INITIAL: Duration = Duration::from_secs(5);
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// How long shutdown waits for the running deploy to reach a safe point.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// The desired state as last received.
#[derive(Debug, Clone, Serialize)]
pub struct Desired {
    pub build: String,
    pub sha256: String,
    pub deploy_id: Option<String>,
    /// `consul:<address>/<key>` or `file:<path>`.
    pub source: String,
    pub modify_index: u64,
    pub received_at: u64,
}

/// An operator hold.
#[derive(Debug, Clone, Serialize)]
pub struct Hold {
    pub reason: String,
    pub since: u64,
    /// The operator's uid, from the socket peer credentials.
    pub by_uid: Option<u32>,
}

/// What the agent knows, for the status socket, the demo and tests.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StatusInner {
    pub desired: Option<Desired>,
    /// The running deploy, or the last one.
    pub deploy: Option<DeployRecord>,
    pub history: VecDeque<DeployRecord>,
    pub last_error: Option<ErrorRecord>,
    pub holders: Vec<swapper::drain::Holder>,
    pub hold: Option<Hold>,
    pub nothing_published: bool,
}

/// Shared, lock-protected agent status. Short critical sections only.
#[derive(Debug, Default)]
pub struct Shared {
    inner: Mutex<StatusInner>,
    /// systemd's `STATUS=` line follows the phase.
    notifier: Option<crate::notify::Notifier>,
    /// Rollout decision, freeze and host reports.
    member: Option<Arc<crate::fleet::member::Member>>,
}

impl Shared {
    /// A copy of everything.
    pub fn snapshot(&self) -> StatusInner {
        self.lock().clone()
    }

    /// This host's fleet membership.
    pub fn member(&self) -> Option<&Arc<crate::fleet::member::Member>> {
        self.member.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the running (or last) deploy's record only.
    fn deploy_record(&self) -> Option<DeployRecord> {
        self.lock().deploy.clone()
    }

    fn error(&self, message: String) {
        self.lock().last_error = Some(ErrorRecord {
            message,
            at: now_secs(),
        });
    }

    fn finished(&self, rec: DeployRecord) {
        let mut g = self.lock();
        if let Some(e) = &rec.error {
            g.last_error = Some(e.clone());
        }
        g.history.push_back(rec);
        while g.history.len() > HISTORY_LEN {
            g.history.pop_front();
        }
    }
}

impl Observer for Shared {
    fn record(&self, rec: &DeployRecord) {
        self.lock().deploy = Some(rec.clone());
        if let Some(m) = &self.member {
            m.observe(rec);
        }
        if let Some(n) = &self.notifier {
            let _ = n.status(&format!("{} {}", rec.phase.as_str(), rec.build));
        }
    }

    fn holders(&self, holders: &[swapper::drain::Holder]) {
        self.lock().holders = holders.to_vec();
    }
}

/// Knobs that tests and the demo set; production uses the defaults.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Replaces the Consul settings derived from config and environment.
    pub consul: Option<ConsulSettings>,
    pub retry_initial: Duration,
    /// Serve the status socket (`[status]` in the config).
    pub status_socket: bool,
    /// Talk to systemd (`NOTIFY_SOCKET`).
    pub notify: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            consul: None,
            retry_initial: RETRY_INITIAL,
            status_socket: true,
            notify: true,
        }
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    pub shared: Arc<Shared>,
    pub deployer: Arc<Deployer>,
    pub watch_stats: Arc<WatchStats>,
    pub metrics: Arc<Metrics>,
    pub commands: mpsc::Sender<CommandRequest>,
    pub started: Instant,
    pub task: JoinHandle<Result<()>>,
    /// The status socket's task, when serving one.
    pub status_task: Option<JoinHandle<()>>,
}

/// Builds the Consul settings from the config, then the environment
/// (`CONSUL_HTTP_ADDR` and friends override the file, as in every Consul
/// tool).
pub fn consul_settings(cfg: &Config) -> Result<ConsulSettings> {
    let c = &cfg.consul;
    let mut s = ConsulSettings {
        address: c.address.clone(),
        token: c.token.clone(),
        ca_cert: c.ca_cert.clone(),
        client_cert: c.client_cert.clone(),
        client_key: c.client_key.clone(),
        tls_server_name: c.tls_server_name.clone(),
        ssl_verify: c.ssl_verify,
        datacenter: c.datacenter.clone(),
        wait: c.wait,
        max_stale: c.max_stale,
        ..ConsulSettings::default()
    };
    if let Some(f) = &c.token_file {
        let t = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
        s.token = Some(t.trim().to_string());
    }
    if let Some(d) = c.first_request_splay {
        s.first_request_splay = d;
    }
    if let Some(b) = c.rate_burst {
        s.rate.burst = b.max(1);
    }
    if let Some(i) = c.rate_interval {
        s.rate.refill_interval = i;
    }
    s.from_env()
}

impl Agent {
    /// Opens (and recovers) the deploy root, starts the watch and the main
    /// loop. Returns once the agent is ready (recovery done).
    pub async fn start(
        config: Config,
        opts: RunOptions,
        shutdown: CancellationToken,
    ) -> Result<Agent> {
        let root_path = config.deploy_root.clone();
        let (root, report) = tokio::task::spawn_blocking({
            let p = root_path.clone();
            move || DeployRoot::open(p)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        info!(root = %root.path().display(), hot = ?root.hot(), recovery = ?report, "deploy root ready");
        if report.trash_entries > 0 {
            // Left by a crash between a claim and the purge; off the
            // critical path like every purge.
            let p = root.path().to_path_buf();
            tokio::task::spawn_blocking(move || swapper::purge_trash(&p));
        }
        let root_path = root.path().to_path_buf();
        let fetch = FetchSettings {
            parallel_ranges: config.download.parallel_ranges,
            connect_timeout: config.download.connect_timeout,
            read_timeout: config.download.read_timeout,
            retries_per_range: config.download.retries,
            bandwidth_limit: config.download.bandwidth_limit,
            allow_file_urls: config.download.allow_file_urls || config.source.file.is_some(),
            ..FetchSettings::default()
        };
        let client = fetch
            .client()
            .map_err(|e| Error::Internal(format!("cannot build the HTTP client: {e}")))?;
        let cache = ArtifactCache::new(config.cache_dir(), config.download.cache_keep)?;
        let guard = Arc::new(crate::guard::Guard::open(&root_path));
        let trust = crate::sign::TrustedKeys::parse(&config.signing.public_keys).map_err(|e| {
            Error::Config(crate::config::ConfigError::Invalid {
                path: PathBuf::from("[signing]"),
                message: e,
            })
        })?;
        let deployer = Arc::new(Deployer {
            root: Arc::new(Mutex::new(root)),
            root_path,
            config: config.clone(),
            client,
            cache,
            progress: Arc::new(Progress::default()),
            fetch,
            guard: guard.clone(),
        });
        let notifier = opts
            .notify
            .then(crate::notify::Notifier::from_env)
            .filter(|n| n.is_enabled());
        let member = {
            let consul = match (&opts.consul, &config.source.key) {
                (Some(s), _) => Some(s.clone()),
                (None, Some(_)) => Some(consul_settings(&config)?),
                (None, None) => None,
            };
            let served = crate::fleet::member::served_build(&deployer.root);
            crate::fleet::member::Member::start(&config, consul.as_ref(), served, shutdown.clone())?
        };
        let shared = Arc::new(Shared {
            notifier: notifier.clone(),
            member: Some(member.clone()),
            ..Shared::default()
        });
        let metrics = Arc::new(Metrics::new());
        {
            let root = deployer.root.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hot) = root.hot() {
                if let Some(m) = root.marker(hot) {
                    metrics.set_build(&m.build.build_id, hot.dir_name());
                }
            }
        }
        if let Some(rec) = crate::deploy::load_record(&deployer.root_path) {
            shared.lock().deploy = Some(rec);
        }
        let watch_stats = Arc::new(WatchStats::new());
        let (tx, rx) = mpsc::channel(8);
        let source = match (&config.source.key, &config.source.file) {
            (Some(key), _) => {
                let settings = match opts.consul.clone() {
                    Some(s) => s,
                    None => consul_settings(&config)?,
                };
                let client = ConsulClient::new(&settings)?;
                let name = format!("consul:{}/{}", client.address(), key);
                // Rule 12 across restarts: a value older than the one
                // acted on before is re-read in default mode first.
                tokio::spawn(crate::watch::consul::watch_key_from(
                    client,
                    key.clone(),
                    tx,
                    watch_stats.clone(),
                    shutdown.clone(),
                    guard.state().applied_modify_index,
                ));
                name
            }
            (None, Some(path)) => {
                tokio::spawn(crate::watch::file::watch_file(
                    path.clone(),
                    tx,
                    shutdown.clone(),
                ));
                format!("file:{}", path.display())
            }
            (None, None) => {
                return Err(Error::Internal(
                    "config has no source (checked at load)".into(),
                ))
            }
        };
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let status_task = if opts.status_socket {
            let view = Arc::new(AgentView::new(
                shared.clone(),
                deployer.clone(),
                config.source.key.is_some().then(|| watch_stats.clone()),
                metrics.clone(),
            ));
            Some(
                StatusServer::start(
                    SocketSettings::from(config.status.clone()),
                    view,
                    cmd_tx.clone(),
                    shutdown.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        let policy = UrlPolicy {
            allow_file: config.download.allow_file_urls || config.source.file.is_some(),
        };
        let main = MainLoop {
            deployer: deployer.clone(),
            shared: shared.clone(),
            source,
            policy,
            trust,
            retry_initial: opts.retry_initial,
            metrics: metrics.clone(),
            notifier: notifier.clone(),
            member,
        };
        let task = tokio::spawn(main.run(rx, cmd_rx, shutdown));
        if let Some(n) = &notifier {
            let _ = n.ready("idle: recovered, watching for builds");
        }
        Ok(Agent {
            shared,
            deployer,
            watch_stats,
            metrics,
            commands: cmd_tx,
            started: Instant::now(),
            task,
            status_task,
        })
    }
}

struct MainLoop {
    deployer: Arc<Deployer>,
    shared: Arc<Shared>,
    source: String,
    policy: UrlPolicy,
    /// Manifest signing keys; empty = signatures not required.
    trust: crate::sign::TrustedKeys,
    retry_initial: Duration,
    metrics: Arc<Metrics>,
    notifier: Option<crate::notify::Notifier>,
    member: Arc<crate::fleet::member::Member>,
}

struct Running {
    identity: String,
    cancel: CancellationToken,
    handle: JoinHandle<(Outcome, Option<Error>)>,
}

impl MainLoop {
    async fn run(
        self,
        mut rx: mpsc::Receiver<WatchEvent>,
        mut cmds: mpsc::Receiver<CommandRequest>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let mut desired: Option<Manifest> = None;
        let mut applied: Option<String> = None;
        let mut running: Option<Running> = None;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut retry_delay = self.retry_initial;
        let mut force_next = false;
        // Pinged from this loop, so a wedged loop stops the pings and
        // systemd restarts the agent.
        let mut watchdog = tokio::time::interval(
            crate::notify::watchdog_interval().unwrap_or(Duration::from_secs(3600)),
        );
        loop {
            let start_now = tokio::select! {
                _ = watchdog.tick() => {
                    if let Some(n) = &self.notifier {
                        let _ = n.watchdog();
                    }
                    false
                }
                _ = shutdown.cancelled() => {
                    if let Some(n) = &self.notifier {
                        let _ = n.stopping();
                    }
                    if let Some(r) = running.take() {
                        info!("shutdown: stopping the running deploy at its next safe point");
                        r.cancel.cancel();
                        if tokio::time::timeout(SHUTDOWN_GRACE, self.join_pinging(r.handle, &mut watchdog)).await.is_err() {
                            warn!("deploy did not reach a safe point in time; its slot stays unmarked");
                        }
                    }
                    return Ok(());
                }
                ev = rx.recv() => match ev {
                    None => {
                        // The watch only stops on shutdown.
                        shutdown.cancelled().await;
                        continue;
                    }
                    Some(WatchEvent::Missing) => {
                        info!(source = %self.source, "nothing published; keep serving the current build");
                        self.shared.lock().nothing_published = true;
                        false
                    }
                    Some(WatchEvent::Value { value, modify_index }) => {
                        self.shared.lock().nothing_published = false;
                        match crate::sign::verify(&value, &self.trust).and_then(|()| Manifest::parse(&value, self.policy)) {
                            Err(e) => {
                                let err = Error::Manifest { source_name: self.source.clone(), error: e };
                                error!(error = %err, "manifest rejected");
                                self.shared.error(err.to_string());
                                false
                            }
                            Ok(m) => {
                                let Some(m) = self.member.choose(m, modify_index) else { continue };
                                info!(build = %m.spec.build, modify_index, "desired state received");
                                self.shared.lock().desired = Some(Desired {
                                    build: m.spec.build.clone(),
                                    sha256: m.spec.sha256.clone(),
                                    deploy_id: m.deploy_id.clone(),
                                    source: self.source.clone(),
                                    modify_index,
                                    received_at: now_secs(),
                                });
                                self.remember(&m, modify_index).await;
                                let same = desired.as_ref().map(Manifest::identity) == Some(m.identity());
                                desired = Some(m);
                                if !same {
                                    retry_delay = self.retry_initial;
                                    retry_at = None;
                                }
                                !same || (applied.is_none() && running.is_none() && retry_at.is_none())
                            }
                        }
                    }
                },
                res = async {
                    match running.as_mut() {
                        Some(r) => (&mut r.handle).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let r = running.take();
                    let (outcome, err) = res.unwrap_or_else(|e| (Outcome::Failed, Some(Error::Internal(format!("deploy task panicked: {e}")))));
                    if let Some(rec) = self.shared.deploy_record() {
                        let slot = rec.slot;
                        crate::report::count_deploy(&self.metrics, &rec, slot);
                        if outcome != Outcome::NoChange {
                            self.shared.finished(rec);
                        }
                    }
                    match outcome {
                        Outcome::Success | Outcome::RolledBack | Outcome::NoChange => {
                            applied = r.map(|r| r.identity);
                            retry_delay = self.retry_initial;
                            retry_at = None;
                        }
                        Outcome::Failed => {
                            if let Some(e) = err { self.shared.error(e.to_string()); }
                            retry_at = Some(tokio::time::Instant::now() + retry_delay);
                            info!(retry_in_ms = retry_delay.as_millis() as u64, "will retry the deploy");
                            retry_delay = (retry_delay * 2).min(RETRY_MAX);
                        }
                        Outcome::HealthFailed => {
                            // Quarantined and (normally) rolled back: no
                            // retry until a new build or `redeploy`.
                            applied = r.map(|r| r.identity);
                            retry_at = None;
                        }
                        Outcome::Cancelled => {}
                    }
                    false
                }
                _ = async {
                    match retry_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {
                    retry_at = None;
                    true
                }
                frozen = self.member.freeze_changed() => {
                    // A freeze stops new flips: cancel the running deploy at
                    // its next safe point (never mid-flip); unfreezing
                    // applies the desired state again.
                    if let (true, Some(r)) = (frozen, running.as_ref()) {
                        r.cancel.cancel();
                    }
                    !frozen
                }
                req = cmds.recv() => {
                    let Some(req) = req else { continue };
                    info!(command = req.command.name(), uid = req.peer.uid, pid = req.peer.pid, "operator command");
                    let (answer, start) = self.command(req.command, req.peer.uid, &mut running, &mut applied, &mut force_next).await;
                    let _ = req.reply.send(answer.map(serde_json::Value::String));
                    start
                }
            };
            if !start_now || self.shared.lock().hold.is_some() || self.member.frozen() {
                continue;
            }
            let Some(m) = desired.clone() else { continue };
            let identity = m.identity();
            if !force_next && applied.as_deref() == Some(identity.as_str()) && running.is_none() {
                continue;
            }
            if !force_next {
                if let Some(q) = self.deployer.guard.quarantined(&m) {
                    let err = Error::Quarantined {
                        build: q.build,
                        reason: q.reason,
                    };
                    warn!(build = %m.spec.build, error = %err, "not deploying a quarantined build");
                    self.shared.error(err.to_string());
                    if running.is_none() {
                        applied = Some(identity);
                    }
                    continue;
                }
            }
            if let Some(r) = running.take() {
                if r.identity == identity && !force_next {
                    running = Some(r);
                    continue;
                }
                info!(old = %r.identity, new = %identity, "newer manifest: cancelling the running deploy");
                r.cancel.cancel();
                self.join_pinging(r.handle, &mut watchdog).await;
                if let Some(rec) = self.shared.deploy_record() {
                    self.shared.finished(rec);
                }
            }
            let cancel = shutdown.child_token();
            let deployer = self.deployer.clone();
            let obs: Arc<dyn Observer> = self.shared.clone();
            let force = std::mem::take(&mut force_next);
            let c = cancel.clone();
            let handle = tokio::spawn(async move { deployer.execute(&m, force, c, obs).await });
            running = Some(Running {
                identity,
                cancel,
                handle,
            });
        }
    }

    /// Waits for a cancelled deploy to reach its safe point (a hook may take
    /// up to its timeout) while still pinging systemd's watchdog, which
    /// would otherwise kill a healthy agent that is only waiting.
    async fn join_pinging(
        &self,
        mut handle: JoinHandle<(Outcome, Option<Error>)>,
        watchdog: &mut tokio::time::Interval,
    ) {
        loop {
            tokio::select! {
                _ = &mut handle => return,
                _ = watchdog.tick() => {
                    if let Some(n) = &self.notifier {
                        let _ = n.watchdog();
                    }
                }
            }
        }
    }

    /// Remembers an accepted manifest: a different build lifts the
    /// quarantine, and a Consul `ModifyIndex` raises the applied one
    /// (rule 12). Both persisted; a failure to persist is logged only.
    async fn remember(&self, m: &Manifest, modify_index: u64) {
        let guard = self.deployer.guard.clone();
        let from_consul = self.source.starts_with("consul:");
        let m = m.clone();
        let r = tokio::task::spawn_blocking(move || {
            if let Some(q) = guard.lift(Some(&m))? {
                info!(quarantined = %q.build, build = %m.spec.build, "a different build is published; quarantine lifted");
            }
            if from_consul {
                guard.applied(modify_index)?;
            }
            Ok::<(), Error>(())
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot persist the guard state"),
            Err(e) => warn!(error = %e, "guard task failed"),
        }
    }

    /// Applies an operator command; returns the answer and whether the
    /// desired state should be (re)applied now.
    async fn command(
        &self,
        cmd: Command,
        uid: u32,
        running: &mut Option<Running>,
        applied: &mut Option<String>,
        force_next: &mut bool,
    ) -> (std::result::Result<String, String>, bool) {
        match cmd {
            Command::Hold { reason } => {
                self.shared.lock().hold = Some(Hold {
                    reason: reason.clone(),
                    since: now_secs(),
                    by_uid: Some(uid),
                });
                if let Some(r) = running.as_ref() {
                    r.cancel.cancel();
                }
                info!(reason = %reason, "hold: not acting on new manifests");
                (Ok(format!("held: {reason}")), false)
            }
            Command::Resume => {
                self.shared.lock().hold = None;
                info!("resumed");
                (Ok("resumed".into()), true)
            }
            Command::Redeploy => {
                let guard = self.deployer.guard.clone();
                match tokio::task::spawn_blocking(move || guard.lift(None)).await {
                    Ok(Ok(Some(q))) => {
                        info!(build = %q.build, "redeploy: quarantine lifted by the operator")
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => return (Err(format!("cannot lift the quarantine: {e}")), false),
                    Err(e) => return (Err(e.to_string()), false),
                }
                *force_next = true;
                *applied = None;
                (Ok("redeploying the desired build".into()), true)
            }
            Command::Rollback => {
                if running.is_some() {
                    return (
                        Err("a deploy is running; hold first, then roll back".into()),
                        false,
                    );
                }
                let root = self.deployer.root.clone();
                let r = tokio::task::spawn_blocking(move || {
                    root.lock().unwrap_or_else(|p| p.into_inner()).rollback()
                })
                .await;
                match r {
                    Ok(Ok(rep)) => {
                        // Stay on the rolled-back build until the desired
                        // state changes; hold so the watch does not undo it.
                        self.shared.lock().hold = Some(Hold {
                            reason: format!("operator rollback to {}", rep.build_id),
                            since: now_secs(),
                            by_uid: Some(uid),
                        });
                        self.metrics.set_build(&rep.build_id, rep.to.dir_name());
                        self.member.served(&rep.build_id);
                        (
                            Ok(format!(
                                "rolled back to {} ({}); holding until resume",
                                rep.build_id, rep.to
                            )),
                            false,
                        )
                    }
                    Ok(Err(e)) => (Err(e.to_string()), false),
                    Err(e) => (Err(e.to_string()), false),
                }
            }
        }
    }
}

/// Runs the agent until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let agent = Agent::start(config, RunOptions::default(), shutdown).await?;
    agent
        .task
        .await
        .map_err(|e| Error::Internal(format!("main loop panicked: {e}")))?
}

/// Runs the agent from the config file at `path` until `shutdown`,
/// reloading it on SIGHUP or when the file changes. A new config that does
/// not validate is logged and ignored: the agent keeps running on the old
/// one. A valid, different one restarts the agent's parts at a safe point
/// (a running deploy is cancelled there and resumes from its partial
/// download under the new config).
pub async fn run_with_reload(path: PathBuf, shutdown: CancellationToken) -> Result<()> {
    let mut config = Config::load(&path)?;
    let (reload_tx, mut reload_rx) = mpsc::channel::<&'static str>(4);
    spawn_reload_sources(&path, reload_tx, shutdown.clone())?;
    let notifier = crate::notify::Notifier::from_env();
    loop {
        let generation = shutdown.child_token();
        let mut agent =
            Agent::start(config.clone(), RunOptions::default(), generation.clone()).await?;
        let next = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                res = &mut agent.task => {
                    return res.map_err(|e| Error::Internal(format!("main loop panicked: {e}")))?;
                }
                why = reload_rx.recv() => {
                    let why = why.unwrap_or("reload");
                    match Config::load(&path) {
                        Err(e) => {
                            error!(error = %e, trigger = why, "new config rejected; keeping the running one");
                            agent.shared.error(format!("config reload rejected: {e}"));
                        }
                        Ok(c) if c == config => info!(trigger = why, "config unchanged"),
                        Ok(c) => {
                            info!(trigger = why, "config changed; restarting the agent's parts at a safe point");
                            let _ = notifier.reloading();
                            break Some(c);
                        }
                    }
                }
            }
        };
        generation.cancel();
        let _ = agent.task.await;
        if let Some(t) = agent.status_task.take() {
            let _ = t.await;
        }
        match next {
            Some(c) => config = c,
            None => return Ok(()),
        }
    }
}

/// SIGHUP and changes to the config file both ask for a reload.
fn spawn_reload_sources(
    path: &std::path::Path,
    tx: mpsc::Sender<&'static str>,
    shutdown: CancellationToken,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::io("SIGHUP", e))?;
    let t = tx.clone();
    let s = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = s.cancelled() => return,
                r = hup.recv() => {
                    if r.is_none() { return; }
                    let _ = t.try_send("SIGHUP");
                }
            }
        }
    });
    // Watch the file's content through the same watcher as manifest files:
    // it handles editors' rename-into-place and debounces.
    let (ftx, mut frx) = mpsc::channel(4);
    tokio::spawn(crate::watch::file::watch_file(
        path.to_path_buf(),
        ftx,
        shutdown.clone(),
    ));
    tokio::spawn(async move {
        let mut first = true;
        while let Some(_ev) = frx.recv().await {
            // The first event is the content at start, already loaded.
            if std::mem::take(&mut first) {
                continue;
            }
            let _ = tx.try_send("config file changed");
        }
    });
    Ok(())
}
