//! The agent's own state machine, beside the per-deploy one in `deploy.rs`:
//! whether the agent may start a deploy, and why not.
//!
//! ```text
//!            ┌──────── deploy-started ────────┐
//!            │                                v
//!          idle <──── deploy-ended ────── deploying(phase)
//!          ^  ^ ╲                           │ deploy-ended (failed)
//!  retry-due│  │  ╲ freeze                  v
//!          retry-wait{at}   ╲──────────> frozen  (commander: `release freeze`)
//!                                           │ unfreeze -> idle
//!  any ── hold / operator rollback ──> held{by, reason, pinned}
//!  held ── resume / redeploy ──> idle (or frozen while the fleet is frozen)
//! ```
//!
//! Two kinds of intent live here and nothing but an explicit command undoes
//! them: the operator's hold (and the build an operator rollback pinned),
//! and the commander's freeze. [`transition`] is the one transition
//! function; an unlisted (state, event) pair is an error, not a no-op.
//!
//! Persisted atomically in `.deploy/agent.json` with the last
//! [`HISTORY_LEN`] history entries (deploys and operator actions). Intent
//! changes are written with fsync before the command is answered, so a
//! hold survives SIGKILL, a watchdog restart, a reboot and any reload. If
//! the process dies mid-deploy, the file says `deploying` or `retry-wait`;
//! the next start turns both into `idle` (the watch hands the desired
//! state over again and the deploy resumes from its partial download).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::deploy::{Outcome, Phase};
use crate::error::{Error, Result};

/// How many history entries (deploys and operator actions) are kept.
pub const HISTORY_LEN: usize = 50;

/// What the agent is doing, or why it is not deploying.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum AgentState {
    /// Serving; will act on the next desired state.
    #[default]
    Idle,
    /// A deploy is running (`phase` is the per-deploy state machine's).
    Deploying { build: String, phase: Phase },
    /// The last deploy failed; the same desired state is tried again at
    /// `at_unix` (exponential backoff, `attempt` counts from 1).
    RetryWait {
        build: String,
        at_unix: u64,
        attempt: u32,
    },
    /// An operator hold: no deploy starts until `resume` or `redeploy`.
    /// `pinned` is the build an operator rollback put live.
    Held {
        by_uid: Option<u32>,
        reason: String,
        since_unix: u64,
        pinned: Option<String>,
    },
    /// The commander froze the fleet: no deploy starts because of the tier
    /// key until `release unfreeze`.
    Frozen { since_unix: u64 },
}

impl AgentState {
    /// The kebab-case name shown in status and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            AgentState::Idle => "idle",
            AgentState::Deploying { .. } => "deploying",
            AgentState::RetryWait { .. } => "retry-wait",
            AgentState::Held { .. } => "held",
            AgentState::Frozen { .. } => "frozen",
        }
    }

    /// Whether an operator hold is in place.
    pub fn is_held(&self) -> bool {
        matches!(self, AgentState::Held { .. })
    }
}

/// What moves the agent from one state to the next.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// The main loop started a deploy of `build`.
    DeployStarted { build: String },
    /// The running deploy entered `phase`.
    PhaseChanged(Phase),
    /// The running deploy ended. `retry` is `(at_unix, attempt)` when it
    /// failed and will be tried again.
    DeployEnded {
        outcome: Option<Outcome>,
        retry: Option<(u64, u32)>,
    },
    /// The retry time of `retry-wait` came.
    RetryDue,
    /// `deploy-agent hold`.
    Hold { by_uid: Option<u32>, reason: String },
    /// `deploy-agent rollback` flipped to `build`; the agent holds there.
    RolledBack { by_uid: Option<u32>, build: String },
    /// `deploy-agent resume`.
    Resume,
    /// `deploy-agent redeploy`.
    Redeploy,
    /// The fleet freeze appeared (`release freeze`).
    Freeze,
    /// The fleet freeze went away (`release unfreeze`).
    Unfreeze,
}

impl AgentEvent {
    /// Whether this event records intent (persisted with fsync).
    fn is_intent(&self) -> bool {
        matches!(
            self,
            AgentEvent::Hold { .. }
                | AgentEvent::RolledBack { .. }
                | AgentEvent::Resume
                | AgentEvent::Redeploy
                | AgentEvent::Freeze
                | AgentEvent::Unfreeze
        )
    }
}

/// The agent's control state: the state machine's state, the last freeze
/// seen, and the history. This is what `.deploy/agent.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Control {
    pub state: AgentState,
    /// The commander's freeze as last seen; kept apart from `state` so a
    /// hold lifted while frozen lands in `frozen`, not `idle`.
    pub frozen: bool,
    /// Newest last.
    pub history: VecDeque<HistoryEntry>,
}

/// The one transition function: the next (state, frozen) for `event`.
pub fn transition(c: &Control, event: &AgentEvent, now: u64) -> Result<(AgentState, bool)> {
    use AgentEvent as E;
    use AgentState as S;
    let frozen = match event {
        E::Freeze => true,
        E::Unfreeze => false,
        _ => c.frozen,
    };
    // Where the agent rests when nothing runs and nobody holds it.
    let rest = || {
        if frozen {
            S::Frozen { since_unix: now }
        } else {
            S::Idle
        }
    };
    let next = match (&c.state, event) {
        // Intent first: a hold (or an operator rollback) wins from any
        // state; a deploy still finishing its verification keeps running
        // under it, and its end does not lift it.
        (S::Held { pinned, .. }, E::Hold { by_uid, reason }) => S::Held {
            by_uid: *by_uid,
            reason: reason.clone(),
            since_unix: now,
            pinned: pinned.clone(),
        },
        (_, E::Hold { by_uid, reason }) => S::Held {
            by_uid: *by_uid,
            reason: reason.clone(),
            since_unix: now,
            pinned: None,
        },
        (S::Deploying { .. }, E::RolledBack { .. }) => {
            return Err(refused(&c.state, event));
        }
        (_, E::RolledBack { by_uid, build }) => S::Held {
            by_uid: *by_uid,
            reason: format!("operator rollback to {build}"),
            since_unix: now,
            pinned: Some(build.clone()),
        },
        (S::Held { .. }, E::Resume | E::Redeploy) => rest(),
        (S::Held { .. }, E::PhaseChanged(_) | E::DeployEnded { .. }) => c.state.clone(),
        (S::Held { .. }, E::Freeze | E::Unfreeze) => c.state.clone(),

        // The freeze: a running deploy is cancelled at its next safe point
        // and its end lands in `frozen`.
        (S::Frozen { .. }, E::Unfreeze) => S::Idle,
        (S::Frozen { .. }, E::Freeze | E::Resume | E::Redeploy) => c.state.clone(),
        (S::Frozen { .. }, E::PhaseChanged(_) | E::DeployEnded { .. }) => c.state.clone(),
        (S::Idle | S::RetryWait { .. }, E::Freeze) => rest(),
        (S::Deploying { .. }, E::Freeze | E::Unfreeze) => c.state.clone(),
        (S::Idle | S::RetryWait { .. }, E::Unfreeze | E::Resume) => c.state.clone(),

        // Deploys.
        (S::Idle | S::RetryWait { .. }, E::DeployStarted { build }) => S::Deploying {
            build: build.clone(),
            phase: Phase::WaitingForColdSlot,
        },
        (S::Deploying { build, .. }, E::PhaseChanged(p)) => S::Deploying {
            build: build.clone(),
            phase: *p,
        },
        (S::Deploying { build, .. }, E::DeployEnded { retry, .. }) => match retry {
            Some((at, attempt)) if !frozen => S::RetryWait {
                build: build.clone(),
                at_unix: *at,
                attempt: *attempt,
            },
            _ => rest(),
        },
        (S::Deploying { .. }, E::Resume | E::Redeploy) => c.state.clone(),
        (S::RetryWait { .. }, E::RetryDue | E::Redeploy) => S::Idle,
        // A hold or freeze cancelled the running deploy and was lifted
        // before the deploy reached its safe point (a pre-flip hook runs
        // to its end): the deploy's last steps land in `idle`, and the
        // main loop starts the desired build again.
        (S::Idle, E::PhaseChanged(_) | E::DeployEnded { .. }) => S::Idle,
        (S::Idle, E::Redeploy) => S::Idle,
        (s, e) => return Err(refused(s, e)),
    };
    Ok((next, frozen))
}

fn refused(state: &AgentState, event: &AgentEvent) -> Error {
    Error::Transition {
        phase: format!("agent {}", state.as_str()),
        event: format!("{event:?}"),
    }
}

impl Control {
    /// Applies `event` in memory; returns whether the change is intent
    /// (to be persisted with fsync before answering).
    pub fn apply(&mut self, event: &AgentEvent, now: u64) -> Result<bool> {
        let (state, frozen) = transition(self, event, now)?;
        if state != self.state || frozen != self.frozen {
            tracing::info!(
                from = self.state.as_str(),
                to = state.as_str(),
                frozen,
                "agent state"
            );
        }
        self.state = state;
        self.frozen = frozen;
        Ok(event.is_intent())
    }

    /// Adds a history entry in memory, dropping the oldest past the limit.
    pub fn push_history(&mut self, entry: HistoryEntry) {
        self.history.push_back(entry);
        while self.history.len() > HISTORY_LEN {
            self.history.pop_front();
        }
    }

    /// The state to start from after a restart: intent (held, frozen) is
    /// kept; a deploy or retry that was running is not (the watch hands
    /// the desired state over again).
    pub fn recovered(mut self) -> Control {
        if matches!(
            self.state,
            AgentState::Deploying { .. } | AgentState::RetryWait { .. }
        ) {
            self.state = if self.frozen {
                AgentState::Frozen {
                    since_unix: crate::clock::now_secs(),
                }
            } else {
                AgentState::Idle
            };
        }
        self
    }
}

/// Where a deploy root keeps the agent's control state.
pub fn control_path(root: &Path) -> PathBuf {
    root.join(".deploy/agent.json")
}

/// Reads the persisted control state; a missing file is a fresh agent.
/// A file that does not parse cannot tell whether an operator hold was in
/// place, so the agent starts held (the safe side: it keeps serving what
/// is live) and says why; the file is kept aside for the operator. Atomic
/// writes make this a disk fault, never a crash artefact.
pub fn load(root: &Path) -> (Control, Option<Error>) {
    let path = control_path(root);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Control::default(), None),
        Err(e) => return (unknown_intent(), Some(Error::io(&path, e))),
    };
    match serde_json::from_slice::<Control>(&bytes) {
        Ok(c) => (c.recovered(), None),
        Err(e) => {
            let aside = path.with_extension("json.corrupt");
            let _ = std::fs::rename(&path, &aside);
            let err = Error::StateFile {
                path,
                message: format!(
                    "{e}; kept as {}. The agent holds until an operator checks \
                     and runs `deploy-agent resume`",
                    aside.display()
                ),
            };
            (unknown_intent(), Some(err))
        }
    }
}

fn unknown_intent() -> Control {
    Control {
        state: AgentState::Held {
            by_uid: None,
            reason: "the agent's state file was unreadable; resume when no hold is wanted".into(),
            since_unix: crate::clock::now_secs(),
            pinned: None,
        },
        ..Control::default()
    }
}

/// Writes the control state: atomically always, durably (fsync) when
/// `durable` (intent).
pub fn save(root: &Path, c: &Control, durable: bool) -> Result<()> {
    let path = control_path(root);
    let bytes = serde_json::to_vec_pretty(c).map_err(|e| Error::StateFile {
        path: path.clone(),
        message: format!("cannot encode: {e}"),
    })?;
    let r = if durable {
        swapper::fsutil::write_atomic(&path, &bytes)
    } else {
        swapper::fsutil::replace_atomic(&path, &bytes)
    };
    r.map_err(|e| Error::StateFile {
        path,
        message: e.to_string(),
    })
}

/// What a history entry records.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum HistoryKind {
    /// A deploy (finished, or cancelled).
    #[default]
    Deploy,
    /// `deploy-agent hold`.
    Hold,
    /// `deploy-agent resume`.
    Resume,
    /// `deploy-agent rollback` (the build it flipped to is `build`).
    Rollback,
    /// `deploy-agent redeploy`.
    Redeploy,
}

/// One finished deploy or operator action, for `GET /v1/history`.
/// Persisted with the agent state, so history survives restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HistoryEntry {
    /// Daemon-assigned id.
    pub id: String,
    pub kind: HistoryKind,
    /// The operator's uid (operator actions).
    pub by_uid: Option<u32>,
    /// The operator's reason (hold), or what the action did.
    pub reason: Option<String>,
    pub build: String,
    pub started_unix: u64,
    /// `None` while running.
    pub finished_unix: Option<u64>,
    /// `None` while running.
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    /// Duration of each phase that ran, in milliseconds, keyed by
    /// [`Phase::as_str`].
    pub phase_ms: BTreeMap<Phase, u64>,
    /// A deploy built from a delta and its base, not the full artifact.
    pub from_delta: bool,
    /// Changes to a slot's files since its deploy that this deploy or
    /// rollback replaced or stopped serving (issue 20): `slot-b rebuilt
    /// (1 path differed from its record): modified app/f3.php`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(c: &mut Control, e: AgentEvent) {
        c.apply(&e, 100).unwrap();
    }

    fn held() -> AgentEvent {
        AgentEvent::Hold {
            by_uid: Some(0),
            reason: "incident".into(),
        }
    }

    #[test]
    fn a_hold_is_only_lifted_by_resume_or_redeploy() {
        let mut c = Control::default();
        apply(&mut c, held());
        for e in [
            AgentEvent::Freeze,
            AgentEvent::Unfreeze,
            AgentEvent::PhaseChanged(Phase::Verifying),
            AgentEvent::DeployEnded {
                outcome: Some(Outcome::Success),
                retry: None,
            },
        ] {
            apply(&mut c, e);
            assert!(c.state.is_held(), "{:?}", c.state);
        }
        assert!(c
            .apply(&AgentEvent::DeployStarted { build: "b".into() }, 1)
            .is_err());
        apply(&mut c, AgentEvent::Resume);
        assert_eq!(c.state, AgentState::Idle);
    }

    #[test]
    fn a_deploy_cancelled_by_a_lifted_hold_ends_in_idle() {
        let mut c = Control::default();
        apply(&mut c, AgentEvent::DeployStarted { build: "b".into() });
        apply(&mut c, held());
        apply(&mut c, AgentEvent::Resume);
        apply(&mut c, AgentEvent::PhaseChanged(Phase::Draining));
        apply(
            &mut c,
            AgentEvent::DeployEnded {
                outcome: Some(Outcome::Cancelled),
                retry: None,
            },
        );
        assert_eq!(c.state, AgentState::Idle);
        apply(&mut c, AgentEvent::DeployStarted { build: "b".into() });
    }

    #[test]
    fn resume_while_frozen_lands_in_frozen() {
        let mut c = Control::default();
        apply(&mut c, AgentEvent::Freeze);
        apply(&mut c, held());
        apply(&mut c, AgentEvent::Resume);
        assert!(matches!(c.state, AgentState::Frozen { .. }));
        assert!(c
            .apply(&AgentEvent::DeployStarted { build: "b".into() }, 1)
            .is_err());
        apply(&mut c, AgentEvent::Unfreeze);
        assert_eq!(c.state, AgentState::Idle);
    }

    #[test]
    fn rollback_pins_and_is_refused_while_deploying() {
        let mut c = Control::default();
        apply(&mut c, AgentEvent::DeployStarted { build: "b2".into() });
        assert!(c
            .apply(
                &AgentEvent::RolledBack {
                    by_uid: None,
                    build: "b1".into()
                },
                1
            )
            .is_err());
        apply(
            &mut c,
            AgentEvent::DeployEnded {
                outcome: Some(Outcome::Success),
                retry: None,
            },
        );
        apply(
            &mut c,
            AgentEvent::RolledBack {
                by_uid: Some(7),
                build: "b1".into(),
            },
        );
        match &c.state {
            AgentState::Held { pinned, by_uid, .. } => {
                assert_eq!(pinned.as_deref(), Some("b1"));
                assert_eq!(*by_uid, Some(7));
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn failures_wait_and_freeze_wins_over_retry() {
        let mut c = Control::default();
        apply(&mut c, AgentEvent::DeployStarted { build: "b".into() });
        apply(
            &mut c,
            AgentEvent::DeployEnded {
                outcome: Some(Outcome::Failed),
                retry: Some((200, 1)),
            },
        );
        assert!(matches!(
            c.state,
            AgentState::RetryWait { at_unix: 200, .. }
        ));
        apply(&mut c, AgentEvent::RetryDue);
        apply(&mut c, AgentEvent::DeployStarted { build: "b".into() });
        apply(&mut c, AgentEvent::Freeze);
        apply(
            &mut c,
            AgentEvent::DeployEnded {
                outcome: Some(Outcome::Cancelled),
                retry: Some((300, 2)),
            },
        );
        assert!(matches!(c.state, AgentState::Frozen { .. }));
        assert!(c.apply(&AgentEvent::RetryDue, 1).is_err());
    }

    #[test]
    fn restart_keeps_intent_and_drops_running_work() {
        let mut c = Control::default();
        apply(&mut c, AgentEvent::DeployStarted { build: "b".into() });
        assert_eq!(c.clone().recovered().state, AgentState::Idle);
        c.frozen = true;
        assert!(matches!(
            c.clone().recovered().state,
            AgentState::Frozen { .. }
        ));
        apply(&mut c, held());
        assert!(c.recovered().state.is_held());
    }

    #[test]
    fn persisted_round_trip_and_corrupt_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".deploy")).unwrap();
        let mut c = Control::default();
        apply(&mut c, held());
        save(dir.path(), &c, true).unwrap();
        assert_eq!(load(dir.path()).0, c);
        std::fs::write(control_path(dir.path()), b"{nope").unwrap();
        let (c, e) = load(dir.path());
        assert!(c.state.is_held());
        assert!(e.unwrap().to_string().contains("deploy-agent resume"));
        assert!(dir.path().join(".deploy/agent.json.corrupt").exists());
        assert_eq!(load(dir.path()).0, Control::default());
    }
}
