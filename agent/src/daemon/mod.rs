//! The long-running agent: feeds manifests from the watch into deploys.
//!
//! The main loop is: receive an event (watch, deploy end, retry timer,
//! freeze, operator command) -> apply it to the agent's state machine
//! (`control.rs`) -> act (start, cancel or leave the deploy). One deploy
//! runs at a time. A newer manifest cancels the running deploy at its next
//! safe point and starts the new one; a manifest naming the hot build does
//! nothing; one naming the cold slot's build flips without a download. A
//! failed deploy is retried with backoff while it stays the desired state.
//! Everything the agent knows is in [`Shared`], which the status socket
//! reads.
//!
//! If the process dies, nothing here is lost that matters: operator and
//! commander intent (hold, pinned rollback, freeze) and the history are
//! persisted in `.deploy/agent.json` before a command is answered; the
//! deploy root recovers itself on the next start, the watch hands over the
//! desired state again, and the deploy resumes from the cached partial
//! download.

pub mod notify;
pub mod report;
pub mod state;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use swapper::DeployRoot;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::artifact::fetch::{ArtifactCache, FetchSettings};
use crate::clock::now_secs;
use crate::config::Config;
use crate::consul::{ConsulClient, ConsulSettings};
use crate::daemon::report::AgentView;
use crate::daemon::state::{AgentEvent, AgentState, Control};
use crate::deploy::{DeployRecord, Deployer, ErrorRecord, Observer, Outcome};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, UrlPolicy};
use crate::pacing::{Backoff, BackoffState};
use crate::progress::Progress;
use crate::source::consul::{WatchEvent, WatchStats};
use crate::status::model::{HistoryEntry, HistoryKind};
use crate::status::{Command, CommandRequest, Metrics, SocketSettings, StatusServer};

/// How many deploy records of this process the agent keeps in memory.
pub const HISTORY_LEN: usize = 50;
/// First retry delay of a failed deploy; doubles up to [`RETRY_MAX`],
/// jittered into [d/2, d] so a fleet that failed together does not retry
/// together.
pub const RETRY_INITIAL: Duration = Duration::from_secs(5);
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// How long shutdown waits for the running deploy to reach a safe point.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// How soon the freeze is read again when it could not be confirmed
/// before acting on a tier change (Consul unreachable).
pub const FREEZE_RECHECK: Duration = Duration::from_secs(5);

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

/// What the agent knows, for the status socket, the demo and tests.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StatusInner {
    pub desired: Option<Desired>,
    /// The running deploy, or the last one.
    pub deploy: Option<DeployRecord>,
    /// The deploys this process ran, with every detail (the persisted,
    /// operator-facing history is `control.history`).
    pub history: VecDeque<DeployRecord>,
    /// The agent's state machine, the freeze as last seen, and the
    /// persisted history.
    pub control: Control,
    pub last_error: Option<ErrorRecord>,
    pub holders: Vec<swapper::drain::Holder>,
    pub nothing_published: bool,
}

/// Shared, lock-protected agent status. Short critical sections only.
#[derive(Debug, Default)]
pub struct Shared {
    inner: Mutex<StatusInner>,
    /// Where `.deploy/agent.json` lives.
    root_path: PathBuf,
    /// systemd's `STATUS=` line follows the phase.
    notifier: Option<crate::daemon::notify::Notifier>,
    /// Rollout decision, freeze and host reports.
    member: Option<Arc<crate::fleet::host::member::Member>>,
}

impl Shared {
    /// A copy of everything.
    pub fn snapshot(&self) -> StatusInner {
        self.lock().clone()
    }

    /// This host's fleet membership.
    pub fn member(&self) -> Option<&Arc<crate::fleet::host::member::Member>> {
        self.member.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The agent's state now.
    pub fn state(&self) -> AgentState {
        self.lock().control.state.clone()
    }

    fn frozen(&self) -> bool {
        self.lock().control.frozen
    }

    /// A copy of the running (or last) deploy's record only.
    fn deploy_record(&self) -> Option<DeployRecord> {
        self.lock().deploy.clone()
    }

    /// Records an error that stops progress; it belongs to the desired
    /// build, if one is known.
    fn error(&self, message: String) {
        let mut g = self.lock();
        let build = g.desired.as_ref().map(|d| d.build.clone());
        g.last_error = Some(ErrorRecord {
            message: crate::redact::message(&message),
            at: now_secs(),
            build,
        });
    }

    /// Applies `event` to the agent's state machine and persists the
    /// result (with fsync when it is intent), then adds `entry` to the
    /// history. Called from the main loop only, so writes never reorder.
    /// A state file that cannot be written is an error for the caller to
    /// report; the state in memory has moved on regardless.
    fn apply(&self, event: AgentEvent, entry: Option<HistoryEntry>) -> Result<()> {
        let (control, durable) = {
            let mut g = self.lock();
            let durable = g.control.apply(&event, now_secs())?;
            if let Some(e) = entry {
                g.control.push_history(e);
            }
            (g.control.clone(), durable)
        };
        crate::daemon::state::save(&self.root_path, &control, durable)
    }

    /// [`Shared::apply`] for events that are not answered to anyone (a
    /// deploy's end, a retry, the freeze as read from Consul): none of them
    /// is intent that only this file holds, so a failure to persist is
    /// logged, and does not replace the error that matters in status (on
    /// a full disk that is the deploy's ENOSPC, not this file's).
    fn apply_logged(&self, event: AgentEvent, entry: Option<HistoryEntry>) {
        if let Err(e) = self.apply(event, entry) {
            warn!(error = %e, "agent state not persisted");
        }
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

/// The history entry of a finished deploy.
pub fn deploy_entry(r: &DeployRecord) -> HistoryEntry {
    HistoryEntry {
        id: format!("{}-{}", r.started_at, r.build),
        kind: HistoryKind::Deploy,
        build: r.build.clone(),
        started_unix: r.started_at,
        finished_unix: r.finished_at,
        outcome: r.outcome,
        error: r.error.as_ref().map(|e| e.message.clone()),
        phase_ms: r.phase_ms.clone(),
        ..HistoryEntry::default()
    }
}

/// The history entry of an operator action.
fn action_entry(kind: HistoryKind, uid: u32, build: &str, reason: Option<String>) -> HistoryEntry {
    let now = now_secs();
    HistoryEntry {
        id: format!(
            "{now}-{}",
            serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        ),
        kind,
        by_uid: Some(uid),
        reason,
        build: build.to_string(),
        started_unix: now,
        finished_unix: Some(now),
        ..HistoryEntry::default()
    }
}

impl Observer for Shared {
    fn record(&self, rec: &DeployRecord) {
        {
            let mut g = self.lock();
            g.deploy = Some(rec.clone());
            if rec.phase.is_active() {
                // In memory only: the deploy record on disk has the phase.
                let _ = g
                    .control
                    .apply(&AgentEvent::PhaseChanged(rec.phase), now_secs());
            }
        }
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
    /// The watches, the freeze watch and the report writer of this
    /// generation: a reload waits for them, so an old writer never
    /// publishes after the new one started.
    pub tracker: TaskTracker,
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
    // Read now (a missing file fails the start) and again by the client
    // whenever it changes.
    s.token_file = c.token_file.clone();
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
        // Values, not a Debug dump. An unmarked slot on a root with no build
        // yet is simply empty, not damage: only name invalid slots when a
        // build was live.
        let invalid: Vec<&str> = report.invalid_slots.iter().map(|s| s.dir_name()).collect();
        info!(
            root = %root.path().display(),
            hot = root.hot().map(|s| s.dir_name()).unwrap_or("none"),
            removed_temp = report.removed_temp.len(),
            unmarked_slots = %if root.hot().is_some() { invalid.join(",") } else { String::new() },
            state_repaired = report.state_repaired,
            current_restored = report.current_restored.map(|s| s.dir_name()).unwrap_or(""),
            adopted = report.adopted.as_deref().unwrap_or(""),
            trash_entries = report.trash_entries,
            "deploy root ready"
        );
        if report.trash_entries > 0 {
            // Left by a crash between a claim and the purge; off the
            // critical path like every purge.
            let p = root.path().to_path_buf();
            tokio::task::spawn_blocking(move || swapper::purge_trash(&p));
        }
        let root_path = root.path().to_path_buf();
        let fetch = FetchSettings::from_config(&config.download, config.source.file.is_some());
        let client = fetch
            .client()
            .map_err(|e| Error::Internal(format!("cannot build the HTTP client: {e}")))?;
        let cache = ArtifactCache::new(config.cache_dir(), config.download.cache_keep)?;
        let guard = Arc::new(crate::deploy::guard::Guard::open(&root_path));
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
            flip_gate: std::sync::OnceLock::new(),
        });
        let tracker = TaskTracker::new();
        let notifier = opts
            .notify
            .then(crate::daemon::notify::Notifier::from_env)
            .filter(|n| n.is_enabled());
        let member = {
            let consul = match (&opts.consul, &config.source.key) {
                (Some(s), _) => Some(s.clone()),
                (None, Some(_)) => Some(consul_settings(&config)?),
                (None, None) => None,
            };
            let served = crate::fleet::host::member::served_build(&deployer.root);
            crate::fleet::host::member::Member::start(
                &config,
                consul.as_ref(),
                served,
                &tracker,
                shutdown.clone(),
            )?
        };
        if member.watches_freeze() {
            let gate: Arc<dyn crate::deploy::FlipGate> = member.clone();
            // The only `set` of a fresh OnceLock: it cannot fail.
            let _ = deployer.flip_gate.set(gate);
        }
        let (mut control, control_error) = crate::daemon::state::load(&deployer.root_path);
        if control.frozen && !member.watches_freeze() {
            // No freeze key any more (config changed): nothing can lift it.
            control.frozen = false;
            if matches!(control.state, AgentState::Frozen { .. }) {
                control.state = AgentState::Idle;
            }
        }
        info!(
            state = control.state.as_str(),
            frozen = control.frozen,
            "agent state recovered"
        );
        let shared = Arc::new(Shared {
            notifier: notifier.clone(),
            member: Some(member.clone()),
            root_path: deployer.root_path.clone(),
            ..Shared::default()
        });
        shared.lock().control = control;
        if let Some(e) = control_error {
            error!(error = %e, "agent state file");
            shared.error(e.to_string());
        }
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
                tracker.spawn(crate::source::consul::watch_key_from(
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
                tracker.spawn(crate::source::file::watch_file(
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
            tracker,
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
    notifier: Option<crate::daemon::notify::Notifier>,
    member: Arc<crate::fleet::host::member::Member>,
}

struct Running {
    identity: String,
    cancel: CancellationToken,
    handle: JoinHandle<(Option<Outcome>, Option<Error>)>,
}

/// What the main loop remembers between events besides the agent state.
struct Loop {
    /// The newest accepted desired state.
    desired: Option<Manifest>,
    /// Identity of the desired state last brought to an end (live, rolled
    /// back or quarantined): not started again unless forced.
    applied: Option<String>,
    running: Option<Running>,
    /// The tokio instant of `retry-wait`'s `at`.
    retry_at: Option<tokio::time::Instant>,
    retry: BackoffState,
    attempt: u32,
    /// The freeze could not be confirmed; read it again at this instant.
    recheck_at: Option<tokio::time::Instant>,
    /// `redeploy`: run the desired build again even if it is live.
    force_next: bool,
    watchdog: tokio::time::Interval,
}

/// One thing the main loop reacts to.
enum LoopEvent {
    Watchdog,
    Shutdown,
    Watch(Option<WatchEvent>),
    DeployEnded(std::result::Result<(Option<Outcome>, Option<Error>), tokio::task::JoinError>),
    RetryDue,
    FreezeRecheck,
    Freeze(bool),
    Command(Option<CommandRequest>),
}

async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl MainLoop {
    async fn run(
        self,
        mut rx: mpsc::Receiver<WatchEvent>,
        mut cmds: mpsc::Receiver<CommandRequest>,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let mut l = Loop {
            desired: None,
            applied: None,
            running: None,
            retry_at: None,
            retry: BackoffState::new(Backoff {
                initial: self.retry_initial,
                max: RETRY_MAX,
            }),
            attempt: 0,
            recheck_at: None,
            force_next: false,
            // Pinged from this loop, so a wedged loop stops the pings and
            // systemd restarts the agent.
            watchdog: tokio::time::interval(
                crate::daemon::notify::watchdog_interval().unwrap_or(Duration::from_secs(3600)),
            ),
        };
        loop {
            let event = tokio::select! {
                _ = l.watchdog.tick() => LoopEvent::Watchdog,
                _ = shutdown.cancelled() => LoopEvent::Shutdown,
                ev = rx.recv() => LoopEvent::Watch(ev),
                res = async {
                    match l.running.as_mut() {
                        Some(r) => (&mut r.handle).await,
                        None => std::future::pending().await,
                    }
                } => LoopEvent::DeployEnded(res),
                _ = until(l.retry_at) => LoopEvent::RetryDue,
                _ = until(l.recheck_at) => LoopEvent::FreezeRecheck,
                frozen = self.member.freeze_changed() => LoopEvent::Freeze(frozen),
                req = cmds.recv() => LoopEvent::Command(req),
            };
            let start_now = match event {
                LoopEvent::Shutdown => {
                    self.shutdown(&mut l).await;
                    return Ok(());
                }
                ev => self.on_event(ev, &mut l, &shutdown).await,
            };
            if start_now {
                self.start_desired(&mut l, &shutdown).await;
            }
        }
    }

    /// Applies one event; returns whether the desired state should be
    /// (re)applied now.
    async fn on_event(&self, event: LoopEvent, l: &mut Loop, shutdown: &CancellationToken) -> bool {
        match event {
            LoopEvent::Shutdown => false,
            LoopEvent::Watchdog => {
                if let Some(n) = &self.notifier {
                    let _ = n.watchdog();
                }
                false
            }
            LoopEvent::Watch(None) => {
                // The watch only stops on shutdown.
                shutdown.cancelled().await;
                false
            }
            LoopEvent::Watch(Some(ev)) => self.on_watch(ev, l).await,
            LoopEvent::DeployEnded(res) => {
                self.on_deploy_ended(res, l);
                false
            }
            LoopEvent::RetryDue => {
                l.retry_at = None;
                self.shared.apply_logged(AgentEvent::RetryDue, None);
                true
            }
            LoopEvent::FreezeRecheck => {
                l.recheck_at = None;
                true
            }
            LoopEvent::Freeze(frozen) => self.on_freeze(frozen, l),
            LoopEvent::Command(None) => false,
            LoopEvent::Command(Some(req)) => {
                info!(
                    command = req.command.name(),
                    uid = req.peer.uid,
                    pid = req.peer.pid,
                    "operator command"
                );
                let (answer, start) = self.command(req.command, req.peer.uid, l).await;
                let _ = req.reply.send(answer.map(serde_json::Value::String));
                start
            }
        }
    }

    async fn shutdown(&self, l: &mut Loop) {
        if let Some(n) = &self.notifier {
            let _ = n.stopping();
        }
        if let Some(r) = l.running.take() {
            info!("shutdown: stopping the running deploy at its next safe point");
            r.cancel.cancel();
            if tokio::time::timeout(SHUTDOWN_GRACE, self.join_pinging(r.handle, &mut l.watchdog))
                .await
                .is_err()
            {
                warn!("deploy did not reach a safe point in time; its slot stays unmarked");
            }
        }
    }

    /// A new value (or a 404) from the watch.
    async fn on_watch(&self, ev: WatchEvent, l: &mut Loop) -> bool {
        let (value, modify_index) = match ev {
            WatchEvent::Missing => {
                info!(source = %self.source, "nothing published; keep serving the current build");
                self.shared.lock().nothing_published = true;
                return false;
            }
            WatchEvent::Value {
                value,
                modify_index,
            } => (value, modify_index),
            WatchEvent::Rejected { reason } => {
                let err = Error::ManifestSource {
                    source_name: self.source.clone(),
                    reason,
                };
                error!(error = %err, "manifest rejected");
                self.shared.error(err.to_string());
                return false;
            }
        };
        self.shared.lock().nothing_published = false;
        let m = match crate::sign::verify(&value, &self.trust)
            .and_then(|()| Manifest::parse(&value, self.policy))
        {
            Ok(m) => m,
            Err(e) => {
                let err = Error::Manifest {
                    source_name: self.source.clone(),
                    error: e,
                };
                error!(error = %err, "manifest rejected");
                self.shared.error(err.to_string());
                return false;
            }
        };
        let Some(m) = self.member.choose(m, modify_index) else {
            return false;
        };
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
        let same = l.desired.as_ref().map(Manifest::identity) == Some(m.identity());
        l.desired = Some(m);
        if !same {
            l.retry.reset();
            l.attempt = 0;
        }
        // Before acting on a tier change, read the freeze in the same
        // consistent view: a `release freeze` that returned before this
        // change was written is seen here, whatever its own watch is doing.
        if !same && self.member.watches_freeze() {
            match self.member.confirm_freeze().await {
                Ok(frozen) => {
                    if frozen != self.shared.frozen() {
                        self.on_freeze(frozen, l);
                    }
                }
                Err(e) => {
                    warn!(error = %e, retry_in_s = FREEZE_RECHECK.as_secs(), "cannot confirm the fleet freeze; not acting on the change yet");
                    self.shared.error(format!(
                        "cannot confirm the fleet freeze before deploying: {e}"
                    ));
                    l.recheck_at = Some(tokio::time::Instant::now() + FREEZE_RECHECK);
                    return false;
                }
            }
        }
        !same || (l.applied.is_none() && l.running.is_none() && l.retry_at.is_none())
    }

    /// The freeze changed (watch or confirmation read).
    fn on_freeze(&self, frozen: bool, l: &mut Loop) -> bool {
        let event = if frozen {
            AgentEvent::Freeze
        } else {
            AgentEvent::Unfreeze
        };
        self.shared.apply_logged(event, None);
        if frozen {
            // A freeze stops new flips: cancel the running deploy at its
            // next safe point (never mid-flip) and drop a pending retry.
            if let Some(r) = l.running.as_ref() {
                r.cancel.cancel();
            }
            l.retry_at = None;
        }
        !frozen
    }

    /// The running deploy's task ended.
    fn on_deploy_ended(
        &self,
        res: std::result::Result<(Option<Outcome>, Option<Error>), tokio::task::JoinError>,
        l: &mut Loop,
    ) {
        let r = l.running.take();
        let (outcome, err) = res.unwrap_or_else(|e| {
            (
                Some(Outcome::Failed),
                Some(Error::Internal(format!("deploy task panicked: {e}"))),
            )
        });
        let mut entry = None;
        if let (Some(_), Some(rec)) = (outcome, self.shared.deploy_record()) {
            // `None` is "already live": no deploy ran, nothing to count.
            crate::daemon::report::count_deploy(&self.metrics, &rec, rec.slot);
            entry = Some(deploy_entry(&rec));
            self.shared.finished(rec);
        }
        let mut retry = None;
        match outcome {
            None | Some(Outcome::Success | Outcome::RolledBack) => {
                l.applied = r.map(|r| r.identity);
                l.retry.reset();
                l.attempt = 0;
            }
            Some(Outcome::Failed) => {
                // A freeze that could not be read at the flip is Consul's
                // hiccup, not the build's failure: retry at the freeze
                // re-check pace, without growing the backoff (which would
                // push convergence after a few short outages to minutes).
                let transient = matches!(err, Some(Error::FreezeUnconfirmed { .. }));
                if let Some(e) = err {
                    self.shared.error(e.to_string());
                }
                l.attempt += 1;
                // A freeze that cannot be read is re-checked at its own pace
                // without growing the deploy backoff.
                let delay = if transient {
                    FREEZE_RECHECK.min(l.retry.current())
                } else {
                    l.retry.next_delay(&mut rand::thread_rng())
                };
                let at = now_secs() + delay.as_secs();
                retry = Some((at, l.attempt));
                info!(
                    retry_in_ms = delay.as_millis() as u64,
                    attempt = l.attempt,
                    "will retry the deploy"
                );
                l.retry_at = Some(tokio::time::Instant::now() + delay);
            }
            Some(Outcome::HealthFailed) => {
                // Quarantined and (normally) rolled back: no retry until
                // a new build or `redeploy`.
                l.applied = r.map(|r| r.identity);
            }
            Some(Outcome::Cancelled) => {}
        }
        self.shared
            .apply_logged(AgentEvent::DeployEnded { outcome, retry }, entry);
        if !matches!(self.shared.state(), AgentState::RetryWait { .. }) {
            l.retry_at = None;
        }
    }

    /// Starts (or keeps) the deploy of the desired state if the agent's
    /// state allows it.
    async fn start_desired(&self, l: &mut Loop, shutdown: &CancellationToken) {
        match self.shared.state() {
            AgentState::Idle => {}
            // A running deploy may be replaced by a newer desired state.
            AgentState::Deploying { .. } => {}
            AgentState::RetryWait { .. } | AgentState::Held { .. } | AgentState::Frozen { .. } => {
                return
            }
        }
        let Some(m) = l.desired.clone() else { return };
        let identity = m.identity();
        if !l.force_next && l.applied.as_deref() == Some(identity.as_str()) && l.running.is_none() {
            return;
        }
        if !l.force_next {
            if let Some(q) = self.deployer.guard.quarantined(&m) {
                let err = Error::Quarantined {
                    build: q.build,
                    reason: q.reason,
                };
                warn!(build = %m.spec.build, error = %err, "not deploying a quarantined build");
                self.shared.error(err.to_string());
                if l.running.is_none() {
                    l.applied = Some(identity);
                }
                return;
            }
        }
        if let Some(r) = l.running.take() {
            if r.identity == identity && !l.force_next {
                l.running = Some(r);
                return;
            }
            info!(old = %r.identity, new = %identity, "newer manifest: cancelling the running deploy");
            r.cancel.cancel();
            let res = self.join_pinging(r.handle, &mut l.watchdog).await;
            self.on_deploy_ended(res, l);
            if !matches!(
                self.shared.state(),
                AgentState::Idle | AgentState::RetryWait { .. }
            ) {
                return;
            }
        }
        if let Err(e) = self.shared.apply(
            AgentEvent::DeployStarted {
                build: m.spec.build.clone(),
            },
            None,
        ) {
            warn!(error = %e, "agent state");
        }
        l.retry_at = None;
        let cancel = shutdown.child_token();
        let deployer = self.deployer.clone();
        let obs: Arc<dyn Observer> = self.shared.clone();
        // A new `deploy_id` for the build that is live is a deliberate
        // redeploy (rule 18): run it again rather than call it live. The
        // last deploy's record (persisted) says which id went live, so a
        // restart does not redeploy.
        let new_id = m.deploy_id.is_some()
            && self
                .shared
                .deploy_record()
                .is_some_and(|r| r.build == m.spec.build && r.deploy_id != m.deploy_id);
        if new_id {
            info!(build = %m.spec.build, deploy_id = m.deploy_id.as_deref().unwrap_or(""), "new deploy id: deploying the build again");
        }
        let force = std::mem::take(&mut l.force_next) || new_id;
        let c = cancel.clone();
        let handle = tokio::spawn(async move { deployer.execute(&m, force, c, obs).await });
        l.running = Some(Running {
            identity,
            cancel,
            handle,
        });
    }

    /// Waits for a cancelled deploy to reach its safe point (a hook may take
    /// up to its timeout) while still pinging systemd's watchdog, which
    /// would otherwise kill a healthy agent that is only waiting.
    async fn join_pinging(
        &self,
        mut handle: JoinHandle<(Option<Outcome>, Option<Error>)>,
        watchdog: &mut tokio::time::Interval,
    ) -> std::result::Result<(Option<Outcome>, Option<Error>), tokio::task::JoinError> {
        loop {
            tokio::select! {
                r = &mut handle => return r,
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
    /// desired state should be (re)applied now. Intent is persisted (with
    /// fsync) before the answer goes out; when it cannot be, the answer
    /// says the hold will not survive a restart.
    async fn command(
        &self,
        cmd: Command,
        uid: u32,
        l: &mut Loop,
    ) -> (std::result::Result<String, String>, bool) {
        // Hold and resume record the build live at the time; the other
        // commands record the build they act on.
        let served =
            || crate::fleet::host::member::served_build(&self.deployer.root).unwrap_or_default();
        match cmd {
            Command::Hold { reason } => {
                let entry = action_entry(HistoryKind::Hold, uid, &served(), Some(reason.clone()));
                let persisted = self.shared.apply(
                    AgentEvent::Hold {
                        by_uid: Some(uid),
                        reason: reason.clone(),
                    },
                    Some(entry),
                );
                if let Some(r) = l.running.as_ref() {
                    r.cancel.cancel();
                }
                l.retry_at = None;
                info!(reason = %reason, "hold: not acting on new manifests");
                (
                    Ok(with_persist(format!("held: {reason}"), persisted)),
                    false,
                )
            }
            Command::Resume => {
                if !self.shared.state().is_held() {
                    return (Ok("not held".into()), false);
                }
                let entry = action_entry(HistoryKind::Resume, uid, &served(), None);
                let persisted = self.shared.apply(AgentEvent::Resume, Some(entry));
                // Apply the desired state again: what is live may have
                // changed under the hold (an operator rollback). A build
                // that is live costs nothing ("already live").
                l.applied = None;
                info!("resumed");
                (
                    Ok(with_persist(self.resumed_answer("resumed"), persisted)),
                    true,
                )
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
                let build = l
                    .desired
                    .as_ref()
                    .map(|m| m.spec.build.clone())
                    .unwrap_or_default();
                let entry = action_entry(HistoryKind::Redeploy, uid, &build, None);
                let persisted = self.shared.apply(AgentEvent::Redeploy, Some(entry));
                l.force_next = true;
                l.applied = None;
                l.retry_at = None;
                (
                    Ok(with_persist(
                        self.resumed_answer("redeploying the desired build"),
                        persisted,
                    )),
                    true,
                )
            }
            Command::Rollback => self.rollback(uid, l).await,
        }
    }

    /// What `resume` and `redeploy` answer: the freeze still applies.
    fn resumed_answer(&self, what: &str) -> String {
        if self.shared.frozen() {
            format!("{what}; the fleet is frozen: nothing deploys until `release unfreeze`")
        } else {
            what.to_string()
        }
    }

    /// `deploy-agent rollback`: flip to the cold slot's build and hold
    /// there (pinned) until `resume` or `redeploy`.
    async fn rollback(
        &self,
        uid: u32,
        l: &mut Loop,
    ) -> (std::result::Result<String, String>, bool) {
        if l.running.is_some() {
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
        let rep = match r {
            Ok(Ok(rep)) => rep,
            Ok(Err(e)) => return (Err(e.to_string()), false),
            Err(e) => return (Err(e.to_string()), false),
        };
        let entry = action_entry(
            HistoryKind::Rollback,
            uid,
            &rep.build_id,
            Some(format!("flipped to {} ({})", rep.build_id, rep.to)),
        );
        // Hold there (persisted first) so neither the watch nor a restart
        // undoes the operator's rollback.
        let persisted = self.shared.apply(
            AgentEvent::RolledBack {
                by_uid: Some(uid),
                build: rep.build_id.clone(),
            },
            Some(entry),
        );
        l.retry_at = None;
        // What is live is no longer what was applied: once the hold is
        // lifted (resume, redeploy) the desired build must deploy again.
        l.applied = None;
        self.metrics.set_build(&rep.build_id, rep.to.dir_name());
        self.member.served(&rep.build_id);
        let answer = format!(
            "rolled back to {} ({}); holding until resume",
            rep.build_id, rep.to
        );
        (Ok(with_persist(answer, persisted)), false)
    }
}

/// Appends a warning to an answer whose intent could not be persisted.
fn with_persist(answer: String, persisted: Result<()>) -> String {
    match persisted {
        Ok(()) => answer,
        Err(e) => {
            error!(error = %e, "operator intent not persisted");
            format!("{answer} (WARNING: not persisted, a restart would lose it: {e})")
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
    let notifier = crate::daemon::notify::Notifier::from_env();
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
                    // The reload sources only stop at shutdown: a closed
                    // channel is not a reload request.
                    let Some(why) = why else {
                        shutdown.cancelled().await;
                        break None;
                    };
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
        // The old generation's watches and report writer end before the
        // new one starts, so an old writer never publishes after it.
        agent.tracker.close();
        agent.tracker.wait().await;
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
    tokio::spawn(crate::source::file::watch_file(
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
