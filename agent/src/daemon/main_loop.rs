//! The main loop: receive an event (watch, deploy end, retry timer, freeze,
//! operator command), apply it to the agent's state machine
//! (`daemon::state`), then act: start, cancel or leave the deploy. One
//! deploy runs at a time. The loop holds nothing that a restart must
//! recover: intent and history are persisted by [`LiveStatus`] before a
//! command is answered, and a cancelled deploy resumes from its partial
//! download.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::live::{action_entry, deploy_entry, Desired, LiveStatus};
use crate::clock::now_secs;
use crate::control::{AgentEvent, AgentState};
use crate::deploy::{Deployer, Observer, Outcome};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, UrlPolicy};
use crate::pacing::{Backoff, BackoffState};
use crate::source::consul::WatchEvent;
use crate::status::model::HistoryKind;
use crate::status::model::{Source, SourceKind};
use crate::status::{Command, CommandRequest, Metrics};

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

pub(super) struct MainLoop {
    pub(super) deployer: Arc<Deployer>,
    pub(super) shared: Arc<LiveStatus>,
    pub(super) source: Source,
    pub(super) policy: UrlPolicy,
    /// Manifest signing keys; empty = signatures not required.
    pub(super) trust: crate::sign::TrustedKeys,
    pub(super) retry_initial: Duration,
    pub(super) metrics: Arc<Metrics>,
    pub(super) notifier: Option<crate::daemon::notify::Notifier>,
    pub(super) member: Arc<crate::fleet::host::member::Member>,
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
    pub(super) async fn run(
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
                // A cancelled deploy that ends with nothing holding the
                // agent (the hold or freeze that cancelled it was lifted
                // meanwhile) leaves the desired build still to apply;
                // `start_desired` decides from the state, so ask it.
                true
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
                    source_name: self.source.to_string(),
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
                    source_name: self.source.to_string(),
                    error: e,
                };
                error!(error = %err, "manifest rejected");
                self.shared.error(err.to_string());
                return false;
            }
        };
        let Some(m) = self.member.choose(m, modify_index) else {
            // The newest decision names nothing to deploy: an older
            // desired state must not be started later on its behalf.
            l.desired = None;
            return false;
        };
        info!(build = %m.spec.build, modify_index, "desired state received");
        self.shared.lock().desired = Some(Desired {
            build: m.spec.build.clone(),
            sha256: m.spec.sha256.to_string(),
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
        if shutdown.is_cancelled() {
            return;
        }
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
            // A deploy already told to stop (by a hold or a freeze lifted
            // since) is not running for this manifest any more: it ends
            // `cancelled` at its safe point, so wait for it and start
            // again rather than keep it as the live attempt.
            if r.identity == identity && !l.force_next && !r.cancel.is_cancelled() {
                l.running = Some(r);
                return;
            }
            info!(old = %r.identity, new = %identity, "replacing the running deploy: newer manifest, redeploy or cancelled");
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
        let from_consul = self.source.kind == SourceKind::Consul;
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
            || crate::fleet::host::member::served_build(&self.deployer).unwrap_or_default();
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
            Command::Verify { full } => (self.verify(full).await, false),
        }
    }

    /// `deploy-agent verify [--full]`: checks the live slot against its
    /// record now. Answers an error (the command exits non-zero) naming
    /// every path that differs.
    async fn verify(&self, full: bool) -> std::result::Result<String, String> {
        let hot = self.deployer.slots().hot();
        let Some(hot) = hot else {
            return Err("nothing is live: no slot to verify".into());
        };
        let check = match self.deployer.check_slot(hot, full).await {
            Ok(Some(c)) => c,
            Ok(None) => return Err(format!("{hot} holds no marked build")),
            Err(e) => return Err(e.to_string()),
        };
        crate::integrity::slot::verify_answer(hot.dir_name(), &check)
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
        // Never flip to a slot that is not exactly its build (issue 20):
        // the operator is told what differs and how to rebuild it.
        let cold = self.deployer.slots().cold();
        if let Err(e) = self.deployer.check_before_flip(cold).await {
            self.shared.error(e.to_string());
            return (Err(e.to_string()), false);
        }
        let left_behind = self.deployer.live_drift();
        let (root, seen) = (self.deployer.root.clone(), self.deployer.slots_seen.clone());
        let r = tokio::task::spawn_blocking(move || {
            crate::deploy::SlotsSeen::change(&root, &seen, |r| r.rollback())
        })
        .await;
        let rep = match r {
            Ok(Ok(rep)) => rep,
            Ok(Err(e)) => return (Err(e.to_string()), false),
            Err(e) => return (Err(e.to_string()), false),
        };
        let mut entry = action_entry(
            HistoryKind::Rollback,
            uid,
            &rep.build_id,
            Some(format!("flipped to {} ({})", rep.build_id, rep.to)),
        );
        entry.integrity = left_behind.map(|c| c.left_behind_note());
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
        self.deployer.check_now.notify_one();
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
