//! The report stage: what the agent tells operators. Builds the status
//! socket's report, history and metrics from the daemon's shared state, the
//! live progress counters and the watch's stats. Read-only snapshots under
//! short locks; nothing is persisted here, so a crash loses nothing.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::control::AgentState;
use crate::daemon::live::{LiveStatus, StatusInner};
use crate::deploy::{self, DeployRecord, Deployer, Phase};
use crate::source::consul::WatchStats;
use crate::status::metrics::ConsulErrorKind;
use crate::status::model::{
    ConsulInfo, DesiredBuild, DrainHolder, HoldState, LastError, ProgressInfo, SlotInfo,
};
use crate::status::{HistoryEntry, Metrics, StatusReport, StatusSource};

/// The daemon as the status socket sees it.
#[derive(Debug)]
pub struct AgentView {
    pub shared: Arc<LiveStatus>,
    pub deployer: Arc<Deployer>,
    pub watch: Option<Arc<WatchStats>>,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// (time, bytes) of the previous status call, for the download rate.
    rate: Mutex<Option<(Instant, u64, u64)>>,
    /// (when, slot dir, bytes) of the last disk-usage walk of an unmarked
    /// cold slot: walked at most every `LEFTOVERS_TTL`, not per request.
    leftovers: Mutex<Option<(Instant, std::path::PathBuf, u64)>>,
}

/// How long a measured size of the cold slot's leftovers is reused.
const LEFTOVERS_TTL: std::time::Duration = std::time::Duration::from_secs(10);

impl AgentView {
    pub fn new(
        shared: Arc<LiveStatus>,
        deployer: Arc<Deployer>,
        watch: Option<Arc<WatchStats>>,
        metrics: Arc<Metrics>,
    ) -> AgentView {
        AgentView {
            shared,
            deployer,
            watch,
            metrics,
            started: Instant::now(),
            rate: Mutex::new(None),
            leftovers: Mutex::new(None),
        }
    }
}

impl AgentView {
    /// The hot and cold slots. While the deploy root is busy (a `syncfs`
    /// can hold it for seconds) status does not wait: it shows the slots
    /// as of the root's last change, which every change records under the
    /// lock, so never older than the last flip.
    fn slots(&self) -> (Option<SlotInfo>, Option<SlotInfo>) {
        let seen = self.deployer.slots();
        let info = |(slot, marker): (swapper::Slot, Option<swapper::Marker>)| SlotInfo {
            name: slot.dir_name().trim_start_matches("slot-").to_string(),
            build: marker.as_ref().map(|m| m.build.build_id.clone()),
            sha256: marker.as_ref().and_then(|m| m.build.sha256.clone()),
            marked_unix: marker.as_ref().map(|m| m.marked_at),
            unmarked_bytes: None,
            integrity: self.deployer.last_check(slot, marker.as_ref()),
        };
        (seen.hot.map(info), Some(info(seen.cold)))
    }

    /// Bytes an unmarked slot directory still holds (cached, see
    /// `leftovers`).
    fn leftover_bytes(&self, dir: std::path::PathBuf) -> u64 {
        let mut g = self.leftovers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, d, n)) = g.as_ref() {
            if *d == dir && t.elapsed() < LEFTOVERS_TTL {
                return *n;
            }
        }
        let n = swapper::fsutil::disk_usage(&dir).saturating_sub(
            // The empty directory itself.
            std::fs::symlink_metadata(&dir)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0),
        );
        *g = Some((Instant::now(), dir, n));
        n
    }
}

impl StatusSource for AgentView {
    fn status(&self) -> StatusReport {
        let s = self.shared.snapshot();
        let mut rep = StatusReport::new(self.started.elapsed().as_secs());
        rep.desired = s.desired.as_ref().map(|d| DesiredBuild {
            build: d.build.clone(),
            sha256: Some(d.sha256.clone()),
            source: d.source.clone(),
            modify_index: Some(d.modify_index),
        });
        (rep.hot, rep.cold) = self.slots();
        let rec = s.deploy.as_ref();
        rep.phase = rec.map(|r| r.phase).unwrap_or_default();
        rep.phase_since_unix = rec.map(|r| r.phase_since).filter(|t| *t > 0);
        if !rep.phase.is_active() {
            if let Some(cold) = rep.cold.as_mut().filter(|c| c.build.is_none()) {
                let dir = self.deployer.root_path.join(format!("slot-{}", cold.name));
                cold.unmarked_bytes = Some(self.leftover_bytes(dir)).filter(|n| *n > 0);
            }
        }
        rep.state = s.control.state.clone();
        rep.progress = rec
            .filter(|r| r.phase.is_active())
            .map(|r| self.progress(r));
        rep.drain_holders = s
            .holders
            .iter()
            .map(|h| DrainHolder {
                pid: h.pid,
                command: h.command.chars().take(80).collect(),
                how: h.uses_summary(),
            })
            .collect();
        rep.fleet = self.shared.member().map(|m| m.info());
        rep.last_error = last_error(&s);
        rep.consul = self
            .watch
            .as_ref()
            .map(|w| consul_info(w, &mut rep.last_error));
        if let Some(f) = &rep.fleet {
            if let Some(e) = f.freeze_error.as_ref().or(f.report_error.as_ref()) {
                rep.last_error.get_or_insert_with(|| LastError {
                    message: e.clone(),
                    at_unix: crate::clock::now_secs(),
                    build: None,
                    current: true,
                });
            }
        }
        rep.hold = hold_state(&s.control.state);
        rep
    }

    fn history(&self) -> Vec<HistoryEntry> {
        let s = self.shared.snapshot();
        s.control.history.iter().rev().cloned().collect()
    }

    fn metrics(&self) -> String {
        if let Some(w) = &self.watch {
            let w = w.snapshot();
            let e = &w.errors;
            self.metrics.sync_consul(
                w.requests_total,
                &[
                    (ConsulErrorKind::Connect, e.connect),
                    (ConsulErrorKind::Timeout, e.timeout),
                    (
                        ConsulErrorKind::Status,
                        e.http_5xx + e.http_429 + e.forbidden,
                    ),
                    (ConsulErrorKind::Decode, e.decode),
                    (ConsulErrorKind::Other, e.other),
                ],
            );
        }
        self.metrics.set_held(self.shared.state().is_held());
        let (hot, cold) = self.slots();
        let changed = |s: Option<SlotInfo>| {
            s.and_then(|s| s.integrity)
                .map_or(0, |c| c.verdict.changed() as u64)
        };
        self.metrics.set_slot_changed(changed(hot), changed(cold));
        self.metrics.render()
    }
}

impl AgentView {
    /// Download progress of the running deploy `r`, with the rate since the
    /// previous status read.
    fn progress(&self, r: &DeployRecord) -> ProgressInfo {
        let p = self.deployer.progress.snapshot();
        let now = Instant::now();
        let mut g = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        let rate = match *g {
            Some((t, b, _)) if now > t && p.bytes_downloaded >= b => {
                let dt = now.duration_since(t).as_secs_f64();
                (dt > 0.05).then(|| ((p.bytes_downloaded - b) as f64 / dt) as u64)
            }
            _ => None,
        };
        *g = Some((now, p.bytes_downloaded, r.started_at));
        let left = p.bytes_total.saturating_sub(p.bytes_downloaded);
        ProgressInfo {
            bytes_done: p.bytes_downloaded,
            bytes_total: Some(p.bytes_total),
            rate_bytes_per_sec: rate,
            eta_seconds: rate.filter(|r| *r > 0).map(|r| left / r),
            entries: Some(p.entries),
        }
    }
}

/// The last deploy error. It stays visible after it is resolved, marked as
/// such: a later successful deploy, or a different desired build, makes it
/// history rather than the reason for anything now.
fn last_error(s: &StatusInner) -> Option<LastError> {
    let last_success = s
        .control
        .history
        .iter()
        .filter(|h| {
            matches!(
                h.outcome,
                Some(deploy::Outcome::Success | deploy::Outcome::RolledBack)
            )
        })
        .filter_map(|h| h.finished_unix)
        .max();
    let desired = s.desired.as_ref().map(|d| d.build.as_str());
    s.last_error.as_ref().map(|e| LastError {
        message: e.message.clone(),
        at_unix: e.at,
        build: e.build.clone(),
        current: last_success.is_none_or(|t| t < e.at)
            && e.build.as_deref().is_none_or(|b| Some(b) == desired),
    })
}

/// The watch as the status shows it. An error that stops the watch stops
/// progress: while it lasts it replaces an older `last_error`, as the error
/// an operator must see first.
fn consul_info(w: &WatchStats, last_error: &mut Option<LastError>) -> ConsulInfo {
    let w = w.snapshot();
    let watch_error = (w.consecutive_errors > 0)
        .then(|| w.last_error.clone().zip(w.last_error_unix))
        .flatten()
        .map(|(message, at_unix)| LastError {
            message,
            at_unix,
            build: None,
            current: true,
        });
    if let Some(e) = &watch_error {
        if last_error.as_ref().is_none_or(|l| l.at_unix <= e.at_unix) {
            *last_error = Some(e.clone());
        }
    }
    let now_ms = crate::clock::now_ms();
    ConsulInfo {
        address: w.address,
        key: w.key,
        last_index: Some(w.last_index),
        last_contact_ms: w.last_success_unix_ms.map(|t| now_ms.saturating_sub(t)),
        consecutive_errors: w.consecutive_errors.min(u32::MAX as u64) as u32,
        last_error: watch_error,
    }
}

/// The operator hold, if the agent is held.
fn hold_state(state: &AgentState) -> HoldState {
    match state {
        AgentState::Held {
            by_uid,
            reason,
            since_unix,
            ..
        } => HoldState {
            held: true,
            reason: Some(reason.clone()),
            since_unix: Some(*since_unix),
            by_uid: *by_uid,
        },
        _ => HoldState::default(),
    }
}

/// Feeds a finished deploy into the metrics.
pub fn count_deploy(metrics: &Metrics, rec: &DeployRecord, slot: Option<swapper::Slot>) {
    if let Some(o) = rec.outcome {
        metrics.deploy_finished(o);
    }
    for (phase, ms) in &rec.phase_ms {
        metrics.phase_finished(*phase, std::time::Duration::from_millis(*ms));
    }
    if rec.from_cache {
        metrics.cache_hit();
    } else if rec.phase_ms.contains_key(&Phase::Downloading) {
        metrics.add_bytes_downloaded(rec.progress.bytes_downloaded);
    }
    if matches!(
        rec.outcome,
        Some(deploy::Outcome::Success | deploy::Outcome::RolledBack)
    ) {
        if let Some(s) = slot {
            metrics.set_build(&rec.build, s.dir_name());
        }
    }
    if rec.outcome == Some(deploy::Outcome::HealthFailed) {
        // The unhealthy build went live; it still serves when there was
        // nothing to flip back to.
        match (&rec.rolled_back_to, slot) {
            (Some(back), Some(s)) => {
                metrics.health_rollback();
                metrics.set_build(back, s.other().dir_name());
            }
            (Some(_), None) => metrics.health_rollback(),
            (None, Some(s)) => metrics.set_build(&rec.build, s.dir_name()),
            (None, None) => {}
        }
    }
}
