//! What the agent knows right now, shared between the main loop, the
//! deploy (as its [`Observer`]) and the status socket: the desired state,
//! the phase and progress, the last error, and the agent state machine
//! whose every change is persisted in `.deploy/agent.json` before it is
//! acted on. Everything else here lives in memory only and is rebuilt from
//! the deploy root, the state file and the watch after a restart.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tracing::warn;

use crate::clock::now_secs;
use crate::control::{AgentEvent, AgentState, Control};
use crate::deploy::{DeployRecord, ErrorRecord, Observer};
use crate::error::Result;
use crate::status::model::{HistoryEntry, HistoryKind, Source};

/// How many deploy records of this process the agent keeps in memory.
pub const HISTORY_LEN: usize = 50;
/// The desired state as last received.
#[derive(Debug, Clone, Serialize)]
pub struct Desired {
    pub build: String,
    pub sha256: String,
    pub deploy_id: Option<String>,
    pub source: Source,
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

/// LiveStatus, lock-protected agent status. Short critical sections only.
#[derive(Debug, Default)]
pub struct LiveStatus {
    inner: Mutex<StatusInner>,
    /// Where `.deploy/agent.json` lives.
    root_path: PathBuf,
    /// systemd's `STATUS=` line follows the phase.
    notifier: Option<crate::daemon::notify::Notifier>,
    /// Rollout decision, freeze and host reports.
    member: Option<Arc<crate::fleet::host::member::Member>>,
}

impl LiveStatus {
    /// Empty status for the agent whose deploy root is `root_path`.
    pub fn new(
        root_path: PathBuf,
        notifier: Option<crate::daemon::notify::Notifier>,
        member: Option<Arc<crate::fleet::host::member::Member>>,
    ) -> Self {
        LiveStatus {
            inner: Mutex::default(),
            root_path,
            notifier,
            member,
        }
    }

    /// A copy of everything.
    pub fn snapshot(&self) -> StatusInner {
        self.lock().clone()
    }

    /// This host's fleet membership.
    pub fn member(&self) -> Option<&Arc<crate::fleet::host::member::Member>> {
        self.member.as_ref()
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The agent's state now.
    pub fn state(&self) -> AgentState {
        self.lock().control.state.clone()
    }

    pub(super) fn frozen(&self) -> bool {
        self.lock().control.frozen
    }

    /// A copy of the running (or last) deploy's record only.
    pub(super) fn deploy_record(&self) -> Option<DeployRecord> {
        self.lock().deploy.clone()
    }

    /// Records an error that stops progress; it belongs to the desired
    /// build, if one is known.
    pub(super) fn error(&self, message: String) {
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
    pub(super) fn apply(&self, event: AgentEvent, entry: Option<HistoryEntry>) -> Result<()> {
        let (control, durable) = {
            let mut g = self.lock();
            let durable = g.control.apply(&event, now_secs())?;
            if let Some(e) = entry {
                g.control.push_history(e);
            }
            (g.control.clone(), durable)
        };
        crate::control::save(&self.root_path, &control, durable)
    }

    /// [`LiveStatus::apply`] for events that are not answered to anyone (a
    /// deploy's end, a retry, the freeze as read from Consul): none of them
    /// is intent that only this file holds, so a failure to persist is
    /// logged, and does not replace the error that matters in status (on
    /// a full disk that is the deploy's ENOSPC, not this file's).
    pub(super) fn apply_logged(&self, event: AgentEvent, entry: Option<HistoryEntry>) {
        if let Err(e) = self.apply(event, entry) {
            warn!(error = %e, "agent state not persisted");
        }
    }

    pub(super) fn finished(&self, rec: DeployRecord) {
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
        from_delta: r.from_delta,
        integrity: r.integrity_note(),
        ..HistoryEntry::default()
    }
}

/// The history entry of an operator action.
pub(super) fn action_entry(
    kind: HistoryKind,
    uid: u32,
    build: &str,
    reason: Option<String>,
) -> HistoryEntry {
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

impl Observer for LiveStatus {
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
