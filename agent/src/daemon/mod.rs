//! The long-running agent: feeds manifests from the watch into deploys.
//!
//! The main loop is: receive an event (watch, deploy end, retry timer,
//! freeze, operator command) -> apply it to the agent's state machine
//! (`control.rs`) -> act (start, cancel or leave the deploy). One deploy
//! runs at a time. A newer manifest cancels the running deploy at its next
//! safe point and starts the new one; a manifest naming the hot build does
//! nothing; one naming the cold slot's build flips without a download. A
//! failed deploy is retried with backoff while it stays the desired state.
//! Everything the agent knows is in [`live::LiveStatus`], which the status
//! socket reads; the loop itself is `main_loop`.
//!
//! If the process dies, nothing here is lost that matters: operator and
//! commander intent (hold, pinned rollback, freeze) and the history are
//! persisted in `.deploy/agent.json` before a command is answered; the
//! deploy root recovers itself on the next start, the watch hands over the
//! desired state again, and the deploy resumes from the cached partial
//! download.

pub mod live;
mod main_loop;

pub use main_loop::{FREEZE_RECHECK, RETRY_INITIAL, RETRY_MAX, SHUTDOWN_GRACE};
pub mod notify;
pub mod report;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use swapper::DeployRoot;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::artifact::{ArtifactCache, FetchSettings};
use crate::config::{consul_settings, Config};
use crate::consul::{ConsulClient, ConsulSettings};
use crate::control::AgentState;
use crate::daemon::report::AgentView;
use crate::deploy::Deployer;
use crate::error::{Error, Result};
use crate::manifest::UrlPolicy;
use crate::progress::Progress;
use crate::source::consul::{WatchEvent, WatchStats};
use crate::status::model::{Source, SourceKind};
use crate::status::{CommandRequest, Metrics, SocketSettings, StatusServer};
use live::LiveStatus;
use main_loop::MainLoop;

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
    pub shared: Arc<LiveStatus>,
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

impl Agent {
    /// Opens (and recovers) the deploy root, starts the watch and the main
    /// loop. Returns once the agent is ready (recovery done).
    pub async fn start(
        config: Config,
        opts: RunOptions,
        shutdown: CancellationToken,
    ) -> Result<Agent> {
        let root = open_deploy_root(config.deploy_root.clone()).await?;
        let (deployer, trust) = build_deployer(&config, root)?;
        let tracker = TaskTracker::new();
        let notifier = opts
            .notify
            .then(crate::daemon::notify::Notifier::from_env)
            .filter(|n| n.is_enabled());
        let member = start_member(&config, &opts, &deployer, &tracker, &shutdown)?;
        let shared = recover_status(&deployer, notifier.clone(), member.clone());
        let metrics = Arc::new(Metrics::new());
        if let Some((build, slot)) = served(&deployer) {
            metrics.set_build(&build, slot.dir_name());
        }
        let watch_stats = Arc::new(WatchStats::new());
        let (tx, rx) = mpsc::channel(8);
        let source = start_source(
            &config,
            &opts,
            deployer.guard.state().applied_modify_index,
            SourceTasks {
                tracker: &tracker,
                tx,
                stats: watch_stats.clone(),
                shutdown: &shutdown,
            },
        )?;
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let status_task = if opts.status_socket {
            let view = Arc::new(AgentView::new(
                shared.clone(),
                deployer.clone(),
                config.source.key.is_some().then(|| watch_stats.clone()),
                metrics.clone(),
            ));
            let settings = SocketSettings::from(config.status.clone());
            Some(StatusServer::start(settings, view, cmd_tx.clone(), shutdown.clone()).await?)
        } else {
            None
        };
        let main = MainLoop {
            deployer: deployer.clone(),
            shared: shared.clone(),
            source,
            policy: UrlPolicy {
                allow_file: config.download.allow_file_urls || config.source.file.is_some(),
            },
            trust,
            retry_initial: opts.retry_initial,
            metrics: metrics.clone(),
            notifier: notifier.clone(),
            member,
        };
        tracker.spawn(crate::deploy::watch_slots(
            deployer.clone(),
            shutdown.clone(),
        ));
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

/// Opens the deploy root (swapper recovers it: temp files, a torn flip, a
/// missing `current`) and logs what recovery did, as values.
async fn open_deploy_root(path: PathBuf) -> Result<DeployRoot> {
    let (root, report) = tokio::task::spawn_blocking(move || DeployRoot::open(path))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    // An unmarked slot on a root with no build yet is simply empty, not
    // damage: only name invalid slots when a build was live.
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
        // Left by a crash between a claim and the purge; off the critical
        // path like every purge.
        let p = root.path().to_path_buf();
        tokio::task::spawn_blocking(move || swapper::purge_trash(&p));
    }
    Ok(root)
}

/// The deployer (everything one deploy needs) and the manifest signing
/// keys, from the config.
fn build_deployer(
    config: &Config,
    root: DeployRoot,
) -> Result<(Arc<Deployer>, crate::sign::TrustedKeys)> {
    let root_path = root.path().to_path_buf();
    let fetch = FetchSettings::from_config(&config.download, config.source.file.is_some());
    let client = fetch
        .client()
        .map_err(|e| Error::Internal(format!("cannot build the HTTP client: {e}")))?;
    let store = crate::store::Store::from_config(&config.store, client.clone())?;
    store.check()?;
    let fetch = fetch.with_store(Arc::new(store));
    let cache = ArtifactCache::new(config.cache_dir(), config.download.cache_keep)?;
    let trust = crate::sign::TrustedKeys::parse(&config.signing.public_keys).map_err(|e| {
        Error::ConfigInvalid {
            path: PathBuf::from("[signing]"),
            message: e,
        }
    })?;
    let deployer = Arc::new(Deployer {
        slots_seen: Arc::new(Mutex::new(crate::deploy::SlotsSeen::of(&root))),
        root: Arc::new(Mutex::new(root)),
        guard: Arc::new(crate::deploy::guard::Guard::open(&root_path)),
        root_path,
        config: config.clone(),
        client,
        cache,
        progress: Arc::new(Progress::default()),
        fetch,
        flip_gate: std::sync::OnceLock::new(),
        reuse: std::sync::OnceLock::new(),
        checks: Mutex::default(),
        live_sink: std::sync::OnceLock::new(),
        check_now: tokio::sync::Notify::new(),
    });
    Ok((deployer, trust))
}

/// Starts this host's fleet membership (rollout decision, freeze watch,
/// host reports) and, when a freeze key is watched, makes it the gate every
/// flip passes.
fn start_member(
    config: &Config,
    opts: &RunOptions,
    deployer: &Deployer,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Arc<crate::fleet::host::member::Member>> {
    let consul = match (&opts.consul, &config.source.key) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(_)) => Some(consul_settings(config)?),
        (None, None) => None,
    };
    let served = crate::fleet::host::member::served_build(deployer);
    let member = crate::fleet::host::member::Member::start(
        config,
        consul.as_ref(),
        served,
        tracker,
        shutdown.clone(),
    )?;
    let sink: Arc<dyn crate::deploy::LiveCheckSink> = member.clone();
    // The only `set` of a fresh OnceLock: it cannot fail.
    let _ = deployer.live_sink.set(sink);
    if member.watches_freeze() {
        let gate: Arc<dyn crate::deploy::FlipGate> = member.clone();
        // The only `set` of a fresh OnceLock: it cannot fail.
        let _ = deployer.flip_gate.set(gate);
    }
    Ok(member)
}

/// The agent's live status as recovered from disk: the persisted agent
/// state (intent survives restarts) and the last deploy record.
fn recover_status(
    deployer: &Deployer,
    notifier: Option<crate::daemon::notify::Notifier>,
    member: Arc<crate::fleet::host::member::Member>,
) -> Arc<LiveStatus> {
    let (mut control, control_error) = crate::control::load(&deployer.root_path);
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
    let shared = Arc::new(LiveStatus::new(
        deployer.root_path.clone(),
        notifier,
        Some(member),
    ));
    shared.lock().control = control;
    if let Some(e) = control_error {
        error!(error = %e, "agent state file");
        shared.error(e.to_string());
    }
    if let Some(mut rec) = crate::deploy::load_record(&deployer.root_path) {
        if rec.phase.is_active() {
            // The process that ran it is gone. Until this agent starts a
            // deploy again (it resumes the desired build unless held or
            // frozen), the record is history, not a deploy in progress: a
            // held agent must not show `downloading` forever.
            rec.phase = crate::deploy::Phase::Failed;
            rec.phase_since = crate::clock::now_secs();
            rec.outcome.get_or_insert(crate::deploy::Outcome::Cancelled);
        }
        shared.lock().deploy = Some(rec);
    }
    shared
}

/// The build the hot slot serves, per its marker, and the slot.
fn served(deployer: &Deployer) -> Option<(String, swapper::Slot)> {
    let slots = deployer.slots();
    let (hot, marker) = slots.served()?;
    Some((marker.build.build_id.clone(), hot))
}

/// What a desired-state source task needs from the agent.
struct SourceTasks<'a> {
    tracker: &'a TaskTracker,
    tx: mpsc::Sender<WatchEvent>,
    stats: Arc<WatchStats>,
    shutdown: &'a CancellationToken,
}

/// Starts the task that watches the desired state (the Consul key, or the
/// local file) and names it.
fn start_source(
    config: &Config,
    opts: &RunOptions,
    applied_modify_index: u64,
    t: SourceTasks<'_>,
) -> Result<Source> {
    match (&config.source.key, &config.source.file) {
        (Some(key), _) => {
            let settings = match opts.consul.clone() {
                Some(s) => s,
                None => consul_settings(config)?,
            };
            let client = ConsulClient::new(&settings)?;
            let location = format!("{}/{}", client.address(), key);
            // Rule 12 across restarts: a value older than the one acted on
            // before is re-read in default mode first.
            t.tracker.spawn(crate::source::consul::watch_key_from(
                client,
                key.clone(),
                t.tx,
                t.stats,
                t.shutdown.clone(),
                applied_modify_index,
            ));
            Ok(Source {
                kind: SourceKind::Consul,
                location,
            })
        }
        (None, Some(path)) => {
            t.tracker.spawn(crate::source::file::watch_file(
                path.clone(),
                t.tx,
                t.shutdown.clone(),
            ));
            Ok(Source {
                kind: SourceKind::File,
                location: path.display().to_string(),
            })
        }
        (None, None) => Err(Error::Internal(
            "config has no source (checked at load)".into(),
        )),
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
