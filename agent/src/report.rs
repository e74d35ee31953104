//! The report stage: what the agent tells operators. Builds the status
//! socket's report, history and metrics from the daemon's shared state, the
//! live progress counters and the watch's stats. Read-only snapshots under
//! short locks; nothing is persisted here, so a crash loses nothing.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::daemon::Shared;
use crate::deploy::{self, DeployRecord, Deployer, Phase};
use crate::status::metrics::ConsulErrorKind;
use crate::status::model::{
    self, ConsulInfo, DesiredBuild, DrainHolder, HoldState, LastError, ProgressInfo, SlotInfo,
    Source, SourceKind,
};
use crate::status::{HistoryEntry, Metrics, StatusReport, StatusSource};
use crate::watch::consul::WatchStats;

/// The daemon as the status socket sees it.
#[derive(Debug)]
pub struct AgentView {
    pub shared: Arc<Shared>,
    pub deployer: Arc<Deployer>,
    pub watch: Option<Arc<WatchStats>>,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// (time, bytes) of the previous status call, for the download rate.
    rate: Mutex<Option<(Instant, u64, u64)>>,
}

impl AgentView {
    pub fn new(
        shared: Arc<Shared>,
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
        }
    }
}

impl From<Phase> for model::Phase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Idle => model::Phase::Idle,
            Phase::WaitingForColdSlot => model::Phase::WaitingForColdSlot,
            Phase::Downloading => model::Phase::Downloading,
            Phase::Unpacking => model::Phase::Unpacking,
            Phase::Draining => model::Phase::Draining,
            Phase::Flipping => model::Phase::Flipping,
            Phase::Verifying => model::Phase::Verifying,
            Phase::Done => model::Phase::Done,
            Phase::Failed => model::Phase::Failed,
        }
    }
}

/// The wire outcome of a deploy outcome; `NoChange` is not a deploy.
pub fn outcome(o: deploy::Outcome) -> Option<model::Outcome> {
    match o {
        deploy::Outcome::Success => Some(model::Outcome::Success),
        deploy::Outcome::RolledBack => Some(model::Outcome::RolledBack),
        deploy::Outcome::Failed => Some(model::Outcome::Failed),
        deploy::Outcome::Cancelled => Some(model::Outcome::Cancelled),
        deploy::Outcome::HealthFailed => Some(model::Outcome::HealthFailed),
        deploy::Outcome::NoChange => None,
    }
}

fn history_entry(r: &DeployRecord) -> HistoryEntry {
    HistoryEntry {
        id: format!("{}-{}", r.started_at, r.build),
        build: r.build.clone(),
        started_unix: r.started_at,
        finished_unix: r.finished_at,
        outcome: r.outcome.and_then(outcome),
        error: r.error.as_ref().map(|e| e.message.clone()),
        phase_ms: r.phase_ms.clone(),
    }
}

impl StatusSource for AgentView {
    fn status(&self) -> StatusReport {
        let s = self.shared.snapshot();
        let mut rep = StatusReport::new(self.started.elapsed().as_secs());
        rep.desired = s.desired.as_ref().map(|d| {
            let (kind, location) = match d.source.split_once(':') {
                Some(("file", loc)) => (SourceKind::File, loc.to_string()),
                Some((_, loc)) => (SourceKind::Consul, loc.to_string()),
                None => (SourceKind::Consul, d.source.clone()),
            };
            DesiredBuild {
                build: d.build.clone(),
                sha256: Some(d.sha256.clone()),
                source: Source { kind, location },
                modify_index: Some(d.modify_index),
            }
        });
        {
            let root = self.deployer.root.lock().unwrap_or_else(|p| p.into_inner());
            let info = |slot: swapper::Slot| SlotInfo {
                name: slot.dir_name().trim_start_matches("slot-").to_string(),
                build: root.marker(slot).map(|m| m.build.build_id.clone()),
                sha256: root.marker(slot).and_then(|m| m.build.sha256.clone()),
                marked_unix: root.marker(slot).map(|m| m.marked_at),
            };
            rep.hot = root.hot().map(info);
            rep.cold = Some(info(root.cold()));
        }
        let rec = s.deploy.as_ref();
        rep.phase = rec.map(|r| r.phase.into()).unwrap_or_default();
        if s.hold.is_some() && !rep.phase.is_active() {
            rep.phase = model::Phase::Holding;
        }
        if let Some(r) = rec.filter(|r| r.phase.is_active()) {
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
            rep.progress = Some(ProgressInfo {
                bytes_done: p.bytes_downloaded,
                bytes_total: Some(p.bytes_total),
                rate_bytes_per_sec: rate,
                eta_seconds: rate.filter(|r| *r > 0).map(|r| left / r),
                entries: Some(p.entries),
            });
        }
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
        rep.last_error = s.last_error.as_ref().map(|e| LastError {
            message: e.message.clone(),
            at_unix: e.at,
        });
        rep.consul = self.watch.as_ref().map(|w| {
            let w = w.snapshot();
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            ConsulInfo {
                address: w.address,
                key: w.key,
                last_index: Some(w.last_index),
                last_contact_ms: w.last_success_unix_ms.map(|t| now_ms.saturating_sub(t)),
                consecutive_errors: w.consecutive_errors.min(u32::MAX as u64) as u32,
            }
        });
        rep.hold = match &s.hold {
            Some(h) => HoldState {
                held: true,
                reason: Some(h.reason.clone()),
                since_unix: Some(h.since),
                by_uid: h.by_uid,
            },
            None => HoldState::default(),
        };
        rep
    }

    fn history(&self) -> Vec<HistoryEntry> {
        let s = self.shared.snapshot();
        s.history.iter().rev().map(history_entry).collect()
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
        self.metrics.set_held(self.shared.snapshot().hold.is_some());
        self.metrics.render()
    }
}

/// Feeds a finished deploy into the metrics.
pub fn count_deploy(metrics: &Metrics, rec: &DeployRecord, slot: Option<swapper::Slot>) {
    if let Some(o) = rec.outcome.and_then(outcome) {
        metrics.deploy_finished(o);
    }
    for (phase, ms) in &rec.phase_ms {
        if let Some(p) = model::Phase::ALL.iter().find(|p| p.as_str() == phase) {
            metrics.phase_finished(*p, std::time::Duration::from_millis(*ms));
        }
    }
    if rec.from_cache {
        metrics.cache_hit();
    } else if rec.phase_ms.contains_key("downloading") {
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
