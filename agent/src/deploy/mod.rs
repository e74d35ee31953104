//! One deploy as an explicit state machine.
//!
//! ```text
//! idle ─start─> waiting-for-cold-slot ─cold-free─> downloading ─fetched─> unpacking
//!   │                                     (fetch, verify and unpack overlap)   │ marked
//!   └─start (build already in the cold slot: a rollback)─> draining <─────────┘
//! draining ─drained─> flipping ─flipped─> verifying ─verified─> done
//! any phase ─fail─> failed, ─cancel─> idle (never while flipping or verifying)
//! ```
//!
//! `verifying` runs the post-flip hook and the health gate (`health.rs`);
//! an unhealthy verdict quarantines the build (`guard.rs`, persisted
//! first) and flips back to the previous slot, and the deploy ends
//! `failed` with the outcome `health-failed`. If the agent stops while
//! `verifying`, the record on disk says so, and the next start judges the
//! live build again (`reverify`) before calling it done.
//!
//! [`transition`] is the one transition function; an unlisted (phase, event)
//! pair is an error. Every transition is persisted atomically to
//! `.deploy/deploy.json` (even when the step failed) and logged.
//!
//! If the process dies mid-deploy: the cold slot has no ready-marker until
//! `unpacking` ends (so it counts as empty), the partial download stays in
//! the cache for resume, and `current` was only ever changed by swapper's
//! atomic flip. On restart the watch hands the same manifest over again and
//! the deploy runs again from the top, reusing what was downloaded.

pub mod drain;
pub mod guard;
pub mod health;
pub mod hooks;
pub mod pipeline;
mod slots;
pub mod splay;

pub use slots::watch as watch_slots;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use swapper::{BuildInfo, DeployRoot, Slot};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::artifact::cache::make_room;
use crate::artifact::{ArtifactCache, FetchSettings};
use crate::clock::now_secs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::integrity::{Entry, Mechanism, SlotRecord};
use crate::manifest::Manifest;
use crate::progress::{Progress, ProgressSnapshot};
use crate::unpack::UnpackLimits;

/// The phases of a deploy. This is the one phase vocabulary: status, logs,
/// metrics and host reports all use it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing to do: the hot build is the desired one (or nothing is published).
    #[default]
    Idle,
    /// The fleet splay: a random wait (below `[fleet] splay-max`, 20 s by
    /// default) before a download, so a tier that sees a new key in the
    /// same second does not hit the artifact server in that second. Its
    /// own phase so that status and history say why nothing moves yet.
    Splay,
    /// Waiting for processes from an earlier deploy to leave the cold slot
    /// (bounded by `drain.cold-deadline`).
    WaitingForColdSlot,
    /// Downloading the artifact while hashing and unpacking its in-order
    /// prefix into the claimed cold slot (bounded by the download timeouts).
    Downloading,
    /// The whole digest matched: making the slot durable (syncfs) and
    /// writing its ready-marker.
    Unpacking,
    /// Running `pre-flip` and waiting for the hot-slot drain condition
    /// (bounded by `drain.hot-deadline` and `hooks.timeout`).
    Draining,
    /// Renaming the new `current` symlink into place (microseconds).
    Flipping,
    /// The new build is live: running the post-flip hook and the health
    /// gate (bounded by `hooks.timeout` and `health.window`). Not cancelled:
    /// the verdict, and a rollback it calls for, always complete.
    Verifying,
    /// The desired build is live.
    Done,
    /// The deploy failed; the previous build still serves.
    Failed,
}

impl Phase {
    /// Every phase, in pipeline order (metrics).
    pub const ALL: [Phase; 10] = [
        Phase::Idle,
        Phase::Splay,
        Phase::WaitingForColdSlot,
        Phase::Downloading,
        Phase::Unpacking,
        Phase::Draining,
        Phase::Flipping,
        Phase::Verifying,
        Phase::Done,
        Phase::Failed,
    ];

    /// The working phases in the order a deploy goes through them.
    pub const PIPELINE: [Phase; 7] = [
        Phase::Splay,
        Phase::WaitingForColdSlot,
        Phase::Downloading,
        Phase::Unpacking,
        Phase::Draining,
        Phase::Flipping,
        Phase::Verifying,
    ];

    /// The kebab-case name used in status, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Splay => "splay",
            Phase::WaitingForColdSlot => "waiting-for-cold-slot",
            Phase::Downloading => "downloading",
            Phase::Unpacking => "unpacking",
            Phase::Draining => "draining",
            Phase::Flipping => "flipping",
            Phase::Verifying => "verifying",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    fn is_terminal(self) -> bool {
        matches!(self, Phase::Idle | Phase::Done | Phase::Failed)
    }

    /// True while a deploy is in flight.
    pub fn is_active(self) -> bool {
        !self.is_terminal()
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What moves a deploy from one phase to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new desired build; `in_cold_slot` when the cold slot already holds
    /// it (a rollback: no download).
    Start {
        in_cold_slot: bool,
    },
    /// A download is needed and the fleet splay drew a delay.
    Splay,
    /// The splay is over.
    Splayed,
    ColdSlotFree,
    Fetched,
    Marked,
    Drained,
    Flipped,
    /// The health gate passed (or none is configured).
    Verified,
    /// After a restart: the live build was being judged when the agent
    /// stopped; judge it again.
    Reverify,
    Fail,
    Cancel,
}

/// The one transition function.
pub fn transition(phase: Phase, event: Event) -> Result<Phase> {
    use Event as E;
    use Phase as P;
    let next = match (phase, event) {
        (
            p,
            E::Start {
                in_cold_slot: false,
            },
        ) if p.is_terminal() => P::WaitingForColdSlot,
        (p, E::Start { in_cold_slot: true }) if p.is_terminal() => P::Draining,
        (p, E::Reverify) if p.is_terminal() => P::Verifying,
        // The free-space check runs before the splay, the wait for the
        // cold slot after it.
        (P::WaitingForColdSlot, E::Splay) => P::Splay,
        (P::Splay, E::Splayed) => P::WaitingForColdSlot,
        (P::WaitingForColdSlot, E::ColdSlotFree) => P::Downloading,
        (P::Downloading, E::Fetched) => P::Unpacking,
        (P::Unpacking, E::Marked) => P::Draining,
        (P::Draining, E::Drained) => P::Flipping,
        (P::Flipping, E::Flipped) => P::Verifying,
        (P::Verifying, E::Verified) => P::Done,
        (p, E::Fail) if !p.is_terminal() => P::Failed,
        // Flipping is never cancelled: a flip is one rename and always
        // completes once started. Verifying is not either: a build that
        // is live must get its verdict (and its rollback).
        (p, E::Cancel) if !p.is_terminal() && !matches!(p, P::Flipping | P::Verifying) => P::Idle,
        (p, e) => {
            return Err(Error::Transition {
                phase: p.as_str().into(),
                event: format!("{e:?}"),
            })
        }
    };
    Ok(next)
}

/// How a deploy ended (the one outcome vocabulary, as for [`Phase`]).
/// A desired build that was already live is no deploy and has no outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The build went live.
    Success,
    Failed,
    Cancelled,
    /// The build went live by flipping to the cold slot (no download).
    RolledBack,
    /// The build went live, failed its health check, and was quarantined;
    /// the agent flipped back to the previous build when there was one.
    HealthFailed,
}

impl Outcome {
    /// Every outcome (metrics).
    pub const ALL: [Outcome; 5] = [
        Outcome::Success,
        Outcome::Failed,
        Outcome::Cancelled,
        Outcome::RolledBack,
        Outcome::HealthFailed,
    ];

    /// The kebab-case name used in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::RolledBack => "rolled-back",
            Outcome::HealthFailed => "health-failed",
        }
    }
}

/// A timestamped error, as shown in status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub message: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// The build the error belongs to, when it belongs to one.
    #[serde(default)]
    pub build: Option<String>,
}

/// Where the base of a delta is, in order of preference. A slot base
/// comes with its record (read before the claim, which removes the cold
/// slot's), so unchanged files are proven by stat instead of hashed.
#[derive(Debug)]
enum DeltaBase {
    /// The live slot (only read).
    Hot(PathBuf, Option<Box<SlotRecord>>),
    /// The cold slot: the claim keeps its old contents aside to read from.
    Cold(Option<Box<SlotRecord>>),
    /// The old cold slot's contents, kept aside by the claim (the `Cold`
    /// base once claimed); they go to the trash once the delta has run.
    Kept(PathBuf, Option<Box<SlotRecord>>),
    /// Only the base's full artifact, in the artifact cache, pinned for
    /// the deploy: the shared files are written from it, not reused.
    Cached {
        artifact: PathBuf,
        _pin: crate::artifact::cache::CachePin,
    },
}

/// The persisted record of the current (or last) deploy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub build: String,
    pub sha256: String,
    pub deploy_id: Option<String>,
    pub phase: Phase,
    pub outcome: Option<Outcome>,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    /// Milliseconds spent in each phase.
    pub phase_ms: BTreeMap<Phase, u64>,
    pub progress: ProgressSnapshot,
    pub from_cache: bool,
    pub slot: Option<Slot>,
    pub error: Option<ErrorRecord>,
    /// After a failed health check: the build the agent flipped back to.
    #[serde(default)]
    pub rolled_back_to: Option<String>,
    /// The cold slot was built from a delta and the base slot's files.
    #[serde(default)]
    pub from_delta: bool,
    /// When `phase` was entered (unix seconds; 0 in records written before
    /// this field), for status's "phase downloading for 12s".
    #[serde(default)]
    pub phase_since: u64,
    /// The slot this deploy was to flip to without unpacking (a rollback)
    /// no longer matched its record, so it was rebuilt from the artifact
    /// first: what differed (at most a few paths per kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repaired: Option<crate::integrity::SlotVerdict>,
    /// The live slot this deploy flipped away from had changed since its
    /// deploy (a hot-patch): what stopped being served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_behind: Option<crate::integrity::SlotCheck>,
}

impl DeployRecord {
    /// The history's note on slot integrity, if this deploy met a slot
    /// that was not exactly its build.
    pub fn integrity_note(&self) -> Option<String> {
        let mut notes = Vec::new();
        if let Some(v) = &self.repaired {
            let slot = self.slot.map(|s| s.dir_name()).unwrap_or("the slot");
            notes.push(format!(
                "{slot} rebuilt from the artifact, repaired {} changed path(s): {}",
                v.changed(),
                v.summary()
            ));
        }
        if let Some(c) = &self.left_behind {
            notes.push(c.left_behind_note());
        }
        (!notes.is_empty()).then(|| notes.join("; "))
    }
}

impl DeployRecord {
    /// The record of a deploy of `m` that starts now.
    fn start(m: &Manifest) -> DeployRecord {
        DeployRecord {
            build: m.spec.build.clone(),
            sha256: m.spec.sha256.to_string(),
            deploy_id: m.deploy_id.clone(),
            phase: Phase::Idle,
            outcome: None,
            started_at: now_secs(),
            finished_at: None,
            phase_ms: BTreeMap::new(),
            progress: ProgressSnapshot::default(),
            from_cache: false,
            slot: None,
            error: None,
            rolled_back_to: None,
            from_delta: false,
            phase_since: now_secs(),
            repaired: None,
            left_behind: None,
        }
    }
}

/// Observes the deploy as it goes (status socket, history, metrics).
pub trait Observer: Send + Sync {
    /// Called after every persisted transition.
    fn record(&self, rec: &DeployRecord);
    /// Called with the processes a drain waits on (empty when done).
    fn holders(&self, holders: &[swapper::drain::Holder]);
}

/// Everything a deploy needs, shared with the daemon.
#[derive(Debug)]
pub struct Deployer {
    pub root: Arc<Mutex<DeployRoot>>,
    /// The slots as of the root's last change (see [`SlotsSeen`]).
    pub slots_seen: Arc<Mutex<SlotsSeen>>,
    pub root_path: PathBuf,
    pub config: Config,
    pub client: reqwest::Client,
    pub cache: ArtifactCache,
    pub progress: Arc<Progress>,
    pub fetch: FetchSettings,
    /// Quarantine and applied ModifyIndex, persisted in `.deploy/guard.json`.
    pub guard: Arc<crate::deploy::guard::Guard>,
    /// Asked right before every flip (set once the fleet member exists).
    pub flip_gate: std::sync::OnceLock<Arc<dyn FlipGate>>,
    /// How a delta reuses the base slot's unchanged files on this deploy
    /// root's filesystem: probed at the first delta (`unpack::reuse`).
    pub reuse: std::sync::OnceLock<Mechanism>,
    /// The last check of each slot against its record (A, B).
    pub checks: Mutex<[Option<crate::integrity::SlotCheck>; 2]>,
    /// Wakes the periodic slot check (after a deploy or a rollback).
    pub check_now: tokio::sync::Notify,
    /// Told the result of every check of the live slot (the fleet
    /// member's host report; set once the member exists).
    pub live_sink: std::sync::OnceLock<Arc<dyn LiveCheckSink>>,
}

impl Deployer {
    /// The slots now, without waiting for the root's lock. A claim or a
    /// `syncfs` holds that lock for seconds, and an async task blocked on
    /// it holds a runtime worker: with two tasks blocked on a 2-core host,
    /// nothing else (the status socket) would run. Readers in async code
    /// use this; the answer is the root itself when it is free, else the
    /// slots as of its last change, which every change records under the
    /// lock ([`SlotsSeen::change`]), so never older than the last flip,
    /// claim or mark.
    pub fn slots(&self) -> SlotsSeen {
        match self.root.try_lock() {
            Ok(g) => SlotsSeen::of(&g),
            // Plain data: a panic elsewhere cannot leave it inconsistent.
            Err(std::sync::TryLockError::Poisoned(p)) => SlotsSeen::of(&p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => self
                .slots_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// `slot`'s directory (a path only: no lock).
    pub fn slot_dir(&self, slot: Slot) -> PathBuf {
        DeployRoot::slot_path_at(&self.root_path, slot)
    }

    /// Where `slot`'s record lives (a path only: no lock).
    pub fn slot_record_path(&self, slot: Slot) -> PathBuf {
        DeployRoot::record_path_at(&self.root_path, slot)
    }
}

/// Where the result of each check of the live slot goes besides status.
pub trait LiveCheckSink: Send + Sync + std::fmt::Debug {
    /// `changed`: `modified <path>` / `added <path>` / `missing <path>`,
    /// at most 20 per kind; empty when the live slot is exactly its build.
    fn live_checked(&self, changed: Vec<String>);
}

/// What the deploy root's slots hold, as of its last change: for readers
/// that must not wait for the root's lock (`status`, while a `syncfs` holds
/// it for seconds). Every change takes it under the lock, so it is never
/// older than the last flip or rollback. Memory only.
#[derive(Debug, Clone)]
pub struct SlotsSeen {
    pub hot: Option<(Slot, Option<swapper::Marker>)>,
    pub cold: (Slot, Option<swapper::Marker>),
}

impl SlotsSeen {
    pub fn of(root: &DeployRoot) -> SlotsSeen {
        let seen = |slot: Slot| (slot, root.marker(slot).cloned());
        SlotsSeen {
            hot: root.hot().map(seen),
            cold: seen(root.cold()),
        }
    }

    /// The slot `current` points at, if any.
    pub fn hot(&self) -> Option<Slot> {
        self.hot.as_ref().map(|(s, _)| *s)
    }

    /// The hot slot and its marker, when `current` serves a marked build.
    pub fn served(&self) -> Option<(Slot, &swapper::Marker)> {
        let (slot, marker) = self.hot.as_ref()?;
        Some((*slot, marker.as_ref()?))
    }

    /// The other slot (slot A before the first flip).
    pub fn cold(&self) -> Slot {
        self.cold.0
    }

    /// `slot`'s ready marker, if it holds a marked build.
    pub fn marker(&self, slot: Slot) -> Option<&swapper::Marker> {
        if slot == self.cold.0 {
            return self.cold.1.as_ref();
        }
        self.hot
            .as_ref()
            .filter(|(s, _)| *s == slot)
            .and_then(|(_, m)| m.as_ref())
    }

    /// Runs `change` on the locked `root` and records the slots it leaves
    /// into `seen`, under the same lock. Every change to the deploy root
    /// goes through here (`Deployer::with_root`, the operator rollback).
    pub fn change<T>(
        root: &Mutex<DeployRoot>,
        seen: &Mutex<SlotsSeen>,
        change: impl FnOnce(&mut DeployRoot) -> T,
    ) -> T {
        // A panic while holding the lock cannot leave the root in a state
        // the on-disk protocol does not cover, so take the guard.
        let mut g = root.lock().unwrap_or_else(|p| p.into_inner());
        let r = change(&mut g);
        *seen.lock().unwrap_or_else(|p| p.into_inner()) = SlotsSeen::of(&g);
        r
    }
}

/// Whether a flip may happen now. The fleet member answers with the
/// freeze read in Consul's consistent mode, so a `release freeze` that
/// returned is never followed by a flip caused by the tier key, even for a
/// deploy that was already past its download when the freeze was written.
pub trait FlipGate: Send + Sync + std::fmt::Debug {
    /// `Ok` to flip to `build`; an error cancels (frozen) or fails
    /// (freeze state unknown) the deploy before anything changed.
    fn check<'a>(
        &'a self,
        build: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;
}

struct Run<'a> {
    d: &'a Deployer,
    rec: DeployRecord,
    phase_start: Instant,
    obs: Arc<dyn Observer>,
}

impl Run<'_> {
    /// Applies `event`, records the time spent in the phase left, persists
    /// and reports the record.
    fn step(&mut self, event: Event) -> Result<()> {
        let next = transition(self.rec.phase, event)?;
        let spent = self.phase_start.elapsed().as_millis() as u64;
        if !self.rec.phase.is_terminal() {
            *self.rec.phase_ms.entry(self.rec.phase).or_default() += spent;
        }
        info!(build = %self.rec.build, from = self.rec.phase.as_str(), to = next.as_str(), spent_ms = spent, "deploy phase");
        self.rec.phase = next;
        self.rec.phase_since = now_secs();
        self.phase_start = Instant::now();
        self.rec.progress = self.d.progress.snapshot();
        // A terminal record is persisted and reported once, by `finish`,
        // with its outcome: no reader (status, host report, a restart)
        // ever sees `done` without how it ended. Nothing awaits between
        // this step and `finish`; if the process dies in between, the
        // persisted record is still the phase before, which a restart
        // judges again.
        if !next.is_terminal() {
            self.persist();
        }
        Ok(())
    }

    fn persist(&self) {
        self.obs.record(&self.rec);
        let path = record_path(&self.d.root_path);
        match serde_json::to_vec_pretty(&self.rec) {
            Ok(bytes) => {
                // Only `verifying` must survive a power cut (the health
                // gate runs again at start); every other phase is rebuilt
                // from the deploy root and the watch, so it is replaced
                // without the two fsyncs that would otherwise sit on the
                // deploy's critical path at every transition.
                let r = if self.rec.phase == Phase::Verifying {
                    swapper::fsutil::write_atomic(&path, &bytes)
                } else {
                    swapper::fsutil::replace_atomic(&path, &bytes)
                };
                if let Err(e) = r {
                    warn!(error = %e, "cannot persist deploy state");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode deploy state"),
        }
    }

    fn finish(&mut self, outcome: Outcome, error: Option<&Error>) {
        self.rec.outcome = Some(outcome);
        self.rec.finished_at = Some(now_secs());
        self.rec.progress = self.d.progress.snapshot();
        if let Some(e) = error {
            // The record feeds status, history and host reports: no
            // credentials, no unbounded text.
            self.rec.error = Some(ErrorRecord {
                message: crate::redact::message(&e.to_string()),
                at: now_secs(),
                build: Some(self.rec.build.clone()),
            });
        }
        self.persist();
    }
}

/// Stops the deploy of `m` when `cancel` fired, naming the step it did
/// not start.
fn not_cancelled(m: &Manifest, cancel: &CancellationToken, what: &str) -> Result<()> {
    if cancel.is_cancelled() {
        return Err(Error::Cancelled {
            what: format!("deploy of {} (before {what})", m.spec.build),
        });
    }
    Ok(())
}

/// Records how the deploy of `m` ended on `e`: cancelled at a safe point,
/// rejected by the health gate, or failed (the previous build serves).
fn failed(m: &Manifest, e: &Error, cancel: &CancellationToken, run: &mut Run<'_>) -> Outcome {
    let unhealthy = matches!(
        e,
        Error::HealthCheckFailed { .. } | Error::HealthRollbackImpossible { .. }
    );
    let cancelled = !unhealthy && (matches!(e, Error::Cancelled { .. }) || cancel.is_cancelled());
    let ev = if cancelled {
        Event::Cancel
    } else {
        Event::Fail
    };
    if let Err(te) = run.step(ev) {
        warn!(error = %te, "cannot record the failure transition");
    }
    let outcome = if cancelled {
        info!(build = %m.spec.build, "deploy cancelled at a safe point");
        Outcome::Cancelled
    } else if unhealthy {
        tracing::error!(build = %m.spec.build, error = %e, rolled_back_to = run.rec.rolled_back_to.as_deref(), "health check failed");
        Outcome::HealthFailed
    } else {
        tracing::error!(build = %m.spec.build, error = %e, "deploy failed; the previous build keeps serving");
        Outcome::Failed
    };
    run.finish(outcome, Some(e));
    outcome
}

/// Where a deploy root keeps the record of its current or last deploy.
fn record_path(root: &std::path::Path) -> PathBuf {
    root.join(".deploy/deploy.json")
}

/// Reads the persisted record of the last deploy, if any.
pub fn load_record(root: &std::path::Path) -> Option<DeployRecord> {
    let bytes = std::fs::read(record_path(root)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl Deployer {
    async fn with_root<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DeployRoot) -> swapper::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (root, seen) = (self.root.clone(), self.slots_seen.clone());
        tokio::task::spawn_blocking(move || SlotsSeen::change(&root, &seen, f))
            .await
            .map_err(|e| Error::Internal(format!("deploy-root task panicked: {e}")))?
            .map_err(Error::from)
    }

    /// Which slot holds `m`'s artifact with a valid marker, if any; the hot
    /// slot first (after a redeploy both slots may hold the same build, and
    /// the live one is the answer, not a "rollback" to its twin).
    pub fn slot_holding(&self, m: &Manifest) -> Option<Slot> {
        let root = self.slots();
        let order = match root.hot() {
            Some(h) => [h, h.other()],
            None => Slot::ALL,
        };
        order.into_iter().find(|s| {
            root.marker(*s).is_some_and(|mk| {
                mk.build.build_id == m.spec.build
                    && mk.build.sha256.as_deref() == Some(&m.spec.sha256)
            })
        })
    }

    /// Drives one deploy of `m` to its end. Returns the outcome (`None`:
    /// the build was already live, no deploy ran); the record (persisted
    /// and given to `obs`) carries the details. The hot build keeps serving
    /// on every error path.
    #[instrument(skip_all, fields(build = %m.spec.build))]
    pub async fn execute(
        &self,
        m: &Manifest,
        force: bool,
        cancel: CancellationToken,
        obs: Arc<dyn Observer>,
    ) -> (Option<Outcome>, Option<Error>) {
        // Before any lookup: a prune running for the previous deploy must
        // not delete this build's artifact or partial under us.
        let _pin = self.cache.pin(&m.spec.sha256);
        let hot = self.slots().hot();
        let holding = self.slot_holding(m);
        let mut reverify = false;
        if !force && holding.is_some() && holding == hot {
            if !self.unjudged(m) {
                info!(build = %m.spec.build, "desired build is already live");
                return (None, None);
            }
            warn!(build = %m.spec.build, "the agent stopped while judging this live build; running its health check again");
            reverify = true;
        }
        let in_cold_slot = holding.is_some() && holding != hot && !force;
        self.progress.reset(m.spec.size);
        let mut run = Run {
            d: self,
            rec: DeployRecord::start(m),
            phase_start: Instant::now(),
            obs,
        };
        let result = match (reverify, hot) {
            (true, Some(slot)) => self.reverify(m, slot, &mut run).await,
            _ => self.drive(m, in_cold_slot, &cancel, &mut run).await,
        };
        // What is live or cold may have changed: check the slots again.
        self.check_now.notify_one();
        match result {
            Ok(()) => {
                let outcome = if in_cold_slot && run.rec.repaired.is_none() {
                    Outcome::RolledBack
                } else {
                    Outcome::Success
                };
                run.finish(outcome, None);
                // Off the critical path: delete what claims moved aside and
                // keep only the newest artifacts.
                self.purge_off_critical_path(Some(m.spec.sha256.to_string()));
                (Some(outcome), None)
            }
            Err(e) => {
                let outcome = failed(m, &e, &cancel, &mut run);
                // Each attempt's claim moved the cold slot's old contents
                // (often the previous attempt's partial unpack) to the
                // trash: empty it now, or retries of a failing deploy
                // grow the disk by one slot each.
                self.purge_off_critical_path(None);
                (Some(outcome), Some(e))
            }
        }
    }

    /// Empties the trash and, after a success, prunes the artifact cache
    /// down to the newest builds (keeping `live_sha`), on a blocking thread
    /// so no deploy waits for it.
    fn purge_off_critical_path(&self, live_sha: Option<String>) {
        let root_path = self.root_path.clone();
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = swapper::purge_trash(&root_path) {
                warn!(error = %e, "cannot empty the trash");
            }
            if let Some(sha) = live_sha {
                if let Err(e) = cache.prune(Some(&sha)) {
                    warn!(error = %e, "cannot prune the artifact cache");
                }
            }
        });
    }

    /// The phases of one deploy, in order: the cold slot (unless the build
    /// already waits there), drain, flip, then the health verdict.
    async fn drive(
        &self,
        m: &Manifest,
        in_cold_slot: bool,
        cancel: &CancellationToken,
        run: &mut Run<'_>,
    ) -> Result<()> {
        let target = match in_cold_slot {
            true => self.cold_slot_as_it_is(m, run).await?,
            false => None,
        };
        let target = match target {
            Some(slot) => slot,
            None => {
                run.step(Event::Start {
                    in_cold_slot: false,
                })?;
                self.fill_cold_slot(m, cancel, run).await?
            }
        };
        run.rec.slot = Some(target);
        let env = self.hook_env(m, target);
        self.drain_and_flip(m, target, &env, cancel, run).await?;
        self.judge(m, &env, run).await
    }

    /// The fleet splay, in phase `splay` when it draws a delay (a member of
    /// no fleet, or `splay-max = "0s"`, never enters it).
    async fn splay(
        &self,
        m: &Manifest,
        cancel: &CancellationToken,
        run: &mut Run<'_>,
    ) -> Result<()> {
        let delay = splay::delay(self.config.fleet.splay());
        if delay.is_zero() {
            return Ok(());
        }
        run.step(Event::Splay)?;
        splay::wait(delay, &m.spec.build, cancel).await;
        not_cancelled(m, cancel, "the download")?;
        run.step(Event::Splayed)
    }

    /// waiting-for-cold-slot, splay, downloading, unpacking: the one cache lookup
    /// (the entry is pinned for the whole deploy) and the one free-space
    /// check, the splay, the claim, fetch+verify+unpack, and the marker.
    async fn fill_cold_slot(
        &self,
        m: &Manifest,
        cancel: &CancellationToken,
        run: &mut Run<'_>,
    ) -> Result<Slot> {
        let cold_dir = self.slot_dir(self.slots().cold());
        let limits = self.limits(m);
        let cached = self.cache.lookup(&m.spec.sha256);
        let base = match cached {
            None => self.delta_base(m).await,
            Some(_) => None,
        };
        {
            let (cache, root, cold) =
                (self.cache.clone(), self.root_path.clone(), cold_dir.clone());
            let (spec, hit) = (m.spec.clone(), cached.is_some());
            tokio::task::spawn_blocking(move || {
                make_room(&cache, &root, &cold, &spec, &limits, hit)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        }
        if cached.is_none() {
            // A download is needed: spread the fleet's requests out.
            self.splay(m, cancel, run).await?;
        }
        let holders = holder_reporter(run.obs.clone());
        drain::wait_cold_slot(&cold_dir, &self.config.drain, cancel, holders).await?;
        run.obs.holders(&[]);
        not_cancelled(m, cancel, "claiming the cold slot")?;
        // A base in the cold slot is kept aside by the claim (not trashed)
        // until the delta has been applied from it.
        let keep = matches!(base, Some(DeltaBase::Cold(_)));
        let (slot, dir, kept) = self
            .with_root(move |r| match keep {
                true => r.claim_cold_keeping(),
                false => r.claim_cold().map(|(slot, dir)| (slot, dir, None)),
            })
            .await?;
        let base = match base {
            Some(DeltaBase::Cold(rec)) => kept.map(|k| DeltaBase::Kept(k, rec)),
            other => other,
        };
        run.rec.slot = Some(slot);
        run.step(Event::ColdSlotFree)?;

        // The publisher's file index, if any, comes in beside the build.
        let (unpacked, index) = tokio::join!(
            self.download_and_unpack(m, (slot, dir), base, cached, &limits, cancel, run),
            self.file_index(m, cancel),
        );
        let (slot, entries, bytes, built) = unpacked?;
        run.step(Event::Fetched)?;

        // unpacking: the record, then durable, then marked. Not cancelled:
        // it is short and leaves a reusable slot.
        self.write_record(m, slot, built, index).await?;
        let info = BuildInfo {
            build_id: m.spec.build.clone(),
            sha256: Some(m.spec.sha256.to_string()),
            entries,
            bytes,
        };
        self.with_root(move |r| r.mark_ready(slot, info)).await?;
        run.step(Event::Marked)?;
        Ok(slot)
    }

    /// downloading: from a delta when this host has its base, else (or when
    /// the delta does not fit) fetch, verify and unpack overlapped. Returns
    /// the slot built (a failed delta re-claims it) with its entries and bytes.
    /// `base` is the delta's base, claimed: a kept-aside old cold slot goes
    /// to the trash as soon as the delta is done with it, before any full
    /// download needs its space.
    #[allow(clippy::too_many_arguments)] // the steps of one phase, kept flat
    async fn download_and_unpack(
        &self,
        m: &Manifest,
        claimed: (Slot, PathBuf),
        base: Option<DeltaBase>,
        cached: Option<PathBuf>,
        limits: &UnpackLimits,
        cancel: &CancellationToken,
        run: &mut Run<'_>,
    ) -> Result<(Slot, u64, u64, (Mechanism, Vec<Entry>))> {
        let (mut slot, mut dir) = claimed;
        let mut built = None;
        let delta = match base {
            Some(base) => {
                let applied = self.apply_delta(m, &base, &dir, limits, cancel).await;
                if let DeltaBase::Kept(kept, _) = base {
                    // Emptied after the deploy with the trash, like any claim's.
                    if let Err(e) = self.with_root(move |r| r.discard_kept(&kept)).await {
                        warn!(error = %e, "cannot move the old cold slot into the trash");
                    }
                }
                Some(applied)
            }
            None => None,
        };
        match delta {
            Some(Ok(done)) => built = Some(done),
            Some(Err(e)) if matches!(e, Error::Cancelled { .. }) || cancel.is_cancelled() => {
                return Err(e)
            }
            Some(Err(e)) => {
                warn!(error = %e, "delta not used; downloading the full artifact");
                run.rec.error = Some(ErrorRecord {
                    message: crate::redact::message(&e.to_string()),
                    at: now_secs(),
                    build: Some(m.spec.build.clone()),
                });
                (slot, dir) = self.with_root(|r| r.claim_cold()).await?;
            }
            None => {}
        }
        let (entries, bytes, recorded) = match built {
            Some((entries, bytes, recorded)) => {
                run.rec.from_delta = true;
                (entries, bytes, recorded)
            }
            None => {
                let outcome = crate::deploy::pipeline::fetch_and_unpack(
                    &self.client,
                    &m.spec,
                    &self.cache,
                    cached,
                    &dir,
                    &self.fetch,
                    limits,
                    self.progress.clone(),
                    cancel.clone(),
                )
                .await?;
                run.rec.from_cache = outcome.from_cache;
                let recorded = (Mechanism::Written, outcome.record);
                (outcome.stats.entries, outcome.stats.bytes_written, recorded)
            }
        };
        Ok((slot, entries, bytes, recorded))
    }

    /// Where this host has the base of `m`'s delta, if anywhere. The hot
    /// slot is preferred (the cold one must first be set aside by the
    /// claim); the artifact cache comes last, since its files are written,
    /// not reused from a slot.
    async fn delta_base(&self, m: &Manifest) -> Option<DeltaBase> {
        let delta = m.delta.as_ref()?;
        let in_slot = {
            let root = self.slots();
            let holds = |slot: Slot| {
                root.marker(slot)
                    .and_then(|mk| mk.build.sha256.as_deref())
                    .is_some_and(|sha| delta.base == *sha)
            };
            let hot = root.hot();
            let cold = root.cold();
            if let Some(h) = hot.filter(|h| holds(*h)) {
                Some((Some(self.slot_dir(h)), self.slot_record_path(h)))
            } else if hot != Some(cold) && holds(cold) {
                Some((None, self.slot_record_path(cold)))
            } else {
                None
            }
        };
        if let Some((hot_dir, record)) = in_slot {
            let record = slots::base_record(record, delta.base.clone()).await;
            return Some(match hot_dir {
                Some(dir) => DeltaBase::Hot(dir, record),
                None => DeltaBase::Cold(record),
            });
        }
        // Pinned before the lookup, so a prune cannot race it.
        let _pin = self.cache.pin(&delta.base);
        let artifact = self.cache.lookup(&delta.base)?;
        Some(DeltaBase::Cached { artifact, _pin })
    }

    /// Downloads (or takes from the cache) `m`'s delta and builds the target
    /// in `dir` from it and its base. Returns (entries, bytes).
    async fn apply_delta(
        &self,
        m: &Manifest,
        base: &DeltaBase,
        dir: &std::path::Path,
        limits: &UnpackLimits,
        cancel: &CancellationToken,
    ) -> Result<(u64, u64, (Mechanism, Vec<Entry>))> {
        let Some(delta) = m.delta.clone() else {
            return Err(Error::Internal("no delta in the manifest".into()));
        };
        let spec = delta.artifact(&m.spec.build);
        let _pin = self.cache.pin(&spec.sha256);
        info!(base = %delta.base, size = delta.size, "deploying from a delta");
        let path = match self.cache.lookup(&spec.sha256) {
            Some(p) => p,
            None => {
                crate::deploy::pipeline::fetch_to_cache(
                    &self.client,
                    &spec,
                    &self.cache,
                    &self.fetch,
                    self.progress.clone(),
                    cancel.clone(),
                )
                .await?
            }
        };
        let (dir, limits, progress) = (dir.to_path_buf(), *limits, self.progress.clone());
        let target = m.spec.sha256.clone();
        use crate::unpack::delta::{apply, Base};
        let base = match base {
            DeltaBase::Hot(d, record) | DeltaBase::Kept(d, record) => Base::Slot {
                dir: d.clone(),
                record: record.clone(),
                how: self.reuse_mechanism().await,
            },
            DeltaBase::Cached { artifact, .. } => Base::Artifact(artifact.clone()),
            DeltaBase::Cold(_) => {
                return Err(Error::Internal("the cold base was not set aside".into()))
            }
        };
        let applied = tokio::task::spawn_blocking(move || {
            apply(
                &path,
                &base,
                &dir,
                (&delta.base, &target),
                &limits,
                &progress,
            )
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        crate::deploy::pipeline::release_memory();
        let entries = applied.unpacked.entries + applied.reused();
        let how = applied.mechanism();
        Ok((
            entries,
            applied.unpacked.bytes_written + applied.reused_bytes,
            (how, applied.entries),
        ))
    }

    /// draining, flipping: the pre-flip hook, the hot slot's drain, the
    /// freeze gate, then the flip, which is never cancelled once started.
    async fn drain_and_flip(
        &self,
        m: &Manifest,
        target: Slot,
        env: &[(String, String)],
        cancel: &CancellationToken,
        run: &mut Run<'_>,
    ) -> Result<()> {
        let hooks = &self.config.hooks;
        if let Some(argv) = &hooks.pre_flip {
            hooks::run_hook("pre-flip", argv, env, hooks.timeout, hooks.output_limit).await?;
        }
        let hot_dir = self.root_path.join("current");
        drain::wait_hot_drained(
            &hot_dir,
            &self.config.drain,
            hooks.timeout,
            cancel,
            &self.client,
            holder_reporter(run.obs.clone()),
        )
        .await?;
        run.obs.holders(&[]);
        not_cancelled(m, cancel, "the flip")?;
        if let Some(gate) = self.flip_gate.get() {
            gate.check(&m.spec.build).await?;
        }
        not_cancelled(m, cancel, "the flip")?;
        run.step(Event::Drained)?;

        run.rec.left_behind = self.live_drift();
        let report = self.with_root(move |r| r.flip_to(target)).await?;
        info!(build = %report.build_id, to = %report.to, took_us = report.took.as_micros() as u64, "flip complete");
        run.step(Event::Flipped)
    }

    /// verifying: the post-flip hook (reported, never undone: the build is
    /// live whatever it says), then the health gate and its verdict.
    async fn judge(&self, m: &Manifest, env: &[(String, String)], run: &mut Run<'_>) -> Result<()> {
        let hooks = &self.config.hooks;
        if let Some(argv) = &hooks.post_flip {
            if let Err(e) =
                hooks::run_hook("post-flip", argv, env, hooks.timeout, hooks.output_limit).await
            {
                warn!(error = %e, "post-flip hook failed");
                run.rec.error = Some(ErrorRecord {
                    message: crate::redact::message(&e.to_string()),
                    at: now_secs(),
                    build: Some(m.spec.build.clone()),
                });
            }
        }
        if self.config.health.is_enabled() {
            if let Err(bad) =
                crate::deploy::health::check(&self.config.health, env, hooks.output_limit).await
            {
                return Err(self.reject_unhealthy(m, bad, run).await);
            }
        }
        run.step(Event::Verified)
    }

    /// Whether the persisted record says the agent stopped while the health
    /// gate was judging `m` (a crash or a shutdown in `verifying`).
    fn unjudged(&self, m: &Manifest) -> bool {
        self.config.health.is_enabled()
            && load_record(&self.root_path).is_some_and(|r| {
                r.phase == Phase::Verifying && r.build == m.spec.build && m.spec.sha256 == *r.sha256
            })
    }

    /// Runs the health gate again on the live build in `slot`.
    async fn reverify(&self, m: &Manifest, slot: Slot, run: &mut Run<'_>) -> Result<()> {
        run.rec.slot = Some(slot);
        run.step(Event::Reverify)?;
        let env = self.hook_env(m, slot);
        let hooks = &self.config.hooks;
        if let Err(bad) =
            crate::deploy::health::check(&self.config.health, &env, hooks.output_limit).await
        {
            return Err(self.reject_unhealthy(m, bad, run).await);
        }
        run.step(Event::Verified)
    }

    /// Acts on an unhealthy verdict: quarantines the build (persisted first,
    /// so a crash right after cannot retry it), then flips back to the
    /// previous slot if it still holds a marked build. Returns the error
    /// that ends the deploy.
    async fn reject_unhealthy(
        &self,
        m: &Manifest,
        bad: crate::deploy::health::Unhealthy,
        run: &mut Run<'_>,
    ) -> Error {
        let verdict = Instant::now();
        let reason = format!(
            "{} after {} attempt(s) in {:?}",
            bad.last_failure, bad.attempts, bad.took
        );
        let guard = self.guard.clone();
        let (qm, qr) = (m.clone(), reason.clone());
        match tokio::task::spawn_blocking(move || guard.quarantine(&qm, &qr)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "cannot persist the quarantine; it holds until restart")
            }
            Err(e) => warn!(error = %e, "quarantine task failed"),
        }
        let back = match self.check_previous_slot().await {
            Ok(()) => self.with_root(|r| r.rollback()).await,
            Err(e) => Err(e),
        };
        match back {
            Ok(rep) => {
                info!(
                    build = %m.spec.build,
                    to = %rep.to,
                    back_to = %rep.build_id,
                    flip_us = rep.took.as_micros() as u64,
                    verdict_to_rollback_ms = verdict.elapsed().as_millis() as u64,
                    "unhealthy build rolled back"
                );
                run.rec.rolled_back_to = Some(rep.build_id.clone());
                Error::HealthCheckFailed {
                    build: m.spec.build.clone(),
                    reason,
                    rolled_back_to: rep.build_id,
                }
            }
            Err(e) => Error::HealthRollbackImpossible {
                build: m.spec.build.clone(),
                reason,
                why: e.to_string(),
            },
        }
    }

    /// The manifest may lower the configured limits, never raise them.
    fn limits(&self, m: &Manifest) -> UnpackLimits {
        let c = &self.config.unpack;
        UnpackLimits {
            max_bytes: m
                .max_unpacked_bytes
                .map_or(c.max_bytes, |b| b.min(c.max_bytes)),
            max_entries: m
                .max_entries
                .map_or(c.max_entries, |n| n.min(c.max_entries)),
            ..*c
        }
    }

    fn hook_env(&self, m: &Manifest, slot: Slot) -> Vec<(String, String)> {
        vec![
            ("DEPLOY_BUILD".into(), m.spec.build.clone()),
            ("DEPLOY_SHA256".into(), m.spec.sha256.to_string()),
            ("DEPLOY_ROOT".into(), self.root_path.display().to_string()),
            ("DEPLOY_SLOT".into(), slot.dir_name().into()),
            (
                "DEPLOY_SLOT_DIR".into(),
                self.root_path.join(slot.dir_name()).display().to_string(),
            ),
        ]
    }
}

fn holder_reporter(
    obs: Arc<dyn Observer>,
) -> impl Fn(&[swapper::drain::Holder]) + Send + Sync + 'static {
    move |hs: &[swapper::drain::Holder]| obs.holders(hs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path_and_rollback_path() {
        let mut p = Phase::Idle;
        for e in [
            Event::Start {
                in_cold_slot: false,
            },
            Event::ColdSlotFree,
            Event::Fetched,
            Event::Marked,
            Event::Drained,
            Event::Flipped,
            Event::Verified,
        ] {
            p = transition(p, e).unwrap();
        }
        assert_eq!(p, Phase::Done);
        let p = transition(Phase::Done, Event::Start { in_cold_slot: true }).unwrap();
        assert_eq!(p, Phase::Draining);
    }

    #[test]
    fn the_splay_sits_between_the_space_check_and_the_cold_slot_wait() {
        let start = Event::Start {
            in_cold_slot: false,
        };
        let mut p = transition(Phase::Idle, start).unwrap();
        for (e, want) in [
            (Event::Splay, Phase::Splay),
            (Event::Splayed, Phase::WaitingForColdSlot),
            (Event::ColdSlotFree, Phase::Downloading),
        ] {
            p = transition(p, e).unwrap();
            assert_eq!(p, want);
        }
        // A new key during the splay cancels it; nothing was claimed.
        assert_eq!(
            transition(Phase::Splay, Event::Cancel).unwrap(),
            Phase::Idle
        );
        assert!(transition(Phase::Splay, Event::ColdSlotFree).is_err());
        assert!(transition(Phase::Downloading, Event::Splay).is_err());
        // History lists it first among the working phases.
        assert_eq!(Phase::PIPELINE[0], Phase::Splay);
        assert!(Phase::Splay < Phase::WaitingForColdSlot);
    }

    #[test]
    fn unlisted_pairs_are_errors() {
        assert!(transition(Phase::Idle, Event::Flipped).is_err());
        assert!(transition(Phase::Downloading, Event::Marked).is_err());
        assert!(transition(Phase::Flipping, Event::Cancel).is_err());
        assert!(transition(Phase::Done, Event::Fail).is_err());
        assert!(transition(Phase::Verifying, Event::Cancel).is_err());
        assert!(transition(Phase::Flipping, Event::Verified).is_err());
        assert_eq!(
            transition(Phase::Verifying, Event::Fail).unwrap(),
            Phase::Failed
        );
    }

    #[test]
    fn no_event_sequence_reaches_done_without_marked_or_cold_slot_build() {
        // Exhaustive over sequences of length <= 10 (the longest deploy,
        // with a splay, is 9 events): Done needs either
        // Marked (a verified, durable build) or a Start from the cold slot.
        let events = [
            Event::Start {
                in_cold_slot: false,
            },
            Event::Start { in_cold_slot: true },
            Event::Splay,
            Event::Splayed,
            Event::ColdSlotFree,
            Event::Fetched,
            Event::Marked,
            Event::Drained,
            Event::Flipped,
            Event::Verified,
            Event::Reverify,
            Event::Fail,
            Event::Cancel,
        ];
        fn walk(p: Phase, verified: bool, depth: usize, events: &[Event]) {
            if p == Phase::Done {
                assert!(verified, "reached done without a verified build");
            }
            if depth == 0 {
                return;
            }
            for e in events {
                if let Ok(n) = transition(p, *e) {
                    let v = match e {
                        // Reverify judges a build that is already live,
                        // so it was marked when it went live.
                        Event::Marked | Event::Start { in_cold_slot: true } | Event::Reverify => {
                            true
                        }
                        Event::Start {
                            in_cold_slot: false,
                        } => false,
                        _ => verified,
                    };
                    walk(n, v, depth - 1, events);
                }
            }
        }
        walk(Phase::Idle, false, 10, &events);
    }
}
