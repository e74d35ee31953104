//! Host reports: this host's state written to Consul under
//! `deploy-hosts/<app>/<host-id>` once per state change, never periodically.
//!
//! Two things keep a fleet of thousands cheap for Consul:
//! - The prefix is outside `deploy/<app>/`, the radix subtree of the
//!   control keys (tier keys, freeze). Real Consul wakes a blocking query on
//!   a missing key for every write in its subtree, so reports there would
//!   wake every host's freeze watch once per report of every other host.
//! - Phase progress is coalesced: a report is written when the host sees a
//!   new desired state, when a deploy starts, and when it ends (plus freeze
//!   and operator changes), so a deploy costs at most 3 writes per host,
//!   not one per phase. `fleet status` still shows which hosts are busy.
//!
//! The deploy never waits for Consul: [`HostReporter::observe`] only puts
//! the newest record into a one-slot mailbox, and one writer task sends it.
//! A failed write is retried with backoff (1 s doubling to 1 min,
//! jittered), sooner when the token file changes or a newer state comes, so
//! a report lost to a Consul outage or a wrong token heals by itself once
//! the cause is gone. If the process dies, the key keeps the last state
//! written; the next start writes a fresh one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::clock::now_secs;
use crate::consul::ConsulClient;
use crate::deploy::{DeployRecord, Outcome, Phase};
use crate::fleet::Decision;
use crate::pacing::{Backoff, BackoffState};

/// One host's report, as stored in Consul.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host: String,
    pub tier: Option<String>,
    /// The build `current` serves.
    pub build: Option<String>,
    /// The build this host was told to run (after the rollout decision).
    pub desired: Option<String>,
    /// ModifyIndex of the tier key this host last acted on.
    pub seen_index: u64,
    pub phase: Phase,
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    pub bucket: Option<f64>,
    pub frozen: bool,
    /// When the current (or last) deploy started and finished (Unix s).
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// When this report was written (Unix s).
    pub updated_at: u64,
    pub agent_version: String,
    /// Paths of the live slot changed since its deploy (`modified
    /// app/f3.php`, at most 20 per kind), as of its last check (issue 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
}

impl HostRecord {
    /// The first report of a host serving `build`: idle, nothing seen yet.
    pub fn fresh(host: &str, tier: Option<String>, build: Option<String>) -> HostRecord {
        HostRecord {
            host: host.to_string(),
            tier,
            build,
            desired: None,
            seen_index: 0,
            phase: Phase::Idle,
            outcome: None,
            error: None,
            bucket: None,
            frozen: false,
            started_at: None,
            finished_at: None,
            updated_at: now_secs(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            changed: Vec::new(),
        }
    }

    /// What makes two reports different states (times excluded). Only
    /// whether a deploy is in flight counts, not its phase: phase progress
    /// rides along with the next write instead of costing one of its own.
    fn state(&self) -> impl PartialEq + '_ {
        (
            &self.build,
            &self.desired,
            self.seen_index,
            self.phase.is_active(),
            self.outcome,
            &self.error,
            self.frozen,
            &self.changed,
        )
    }
}

/// Turns state changes into Consul writes, off the deploy's path.
#[derive(Debug)]
pub struct HostReporter {
    key: String,
    current: Mutex<HostRecord>,
    /// The newest unsent record (a one-slot mailbox: older ones are moot).
    pending: Mutex<Option<HostRecord>>,
    wake: Notify,
    /// The last write's error, cleared by a successful write.
    last_error: Mutex<Option<String>>,
}

impl HostReporter {
    /// Starts the writer task. `served` is the build live at start.
    pub fn start(
        client: ConsulClient,
        prefix: &str,
        host: &str,
        tier: Option<String>,
        served: Option<String>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<HostReporter> {
        let rec = HostRecord::fresh(host, tier, served.clone());
        let r = Arc::new(HostReporter {
            key: format!("{}{}", prefix, host),
            current: Mutex::new(rec.clone()),
            pending: Mutex::new(Some(rec)),
            wake: Notify::new(),
            last_error: Mutex::new(None),
        });
        tracker.spawn(writer(r.clone(), client, shutdown));
        r.wake.notify_one();
        r
    }

    /// Why the last write failed, until one succeeds.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The key this host reports under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Applies `f` to the current record and queues a write when the state
    /// changed. Never blocks on the network.
    pub fn update(&self, f: impl FnOnce(&mut HostRecord)) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let before = cur.clone();
        f(&mut cur);
        if before.state() == cur.state() {
            return;
        }
        cur.updated_at = now_secs();
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(cur.clone());
        drop(cur);
        self.wake.notify_one();
    }

    /// A deploy transition (from the daemon's observer).
    pub fn observe(&self, rec: &DeployRecord) {
        self.update(|r| {
            r.phase = rec.phase;
            r.outcome = rec.outcome;
            r.error = rec.error.as_ref().map(|e| e.message.clone());
            r.started_at = Some(rec.started_at);
            r.finished_at = rec.finished_at;
            if rec.phase == Phase::Done {
                r.build = Some(rec.build.clone());
            }
        });
    }

    /// A new desired state and the rollout decision for this host.
    pub fn decided(&self, modify_index: u64, d: &Decision) {
        self.update(|r| {
            r.seen_index = modify_index;
            r.desired = d.build.clone().or_else(|| r.build.clone());
            r.bucket = Some(d.bucket);
        });
    }

    /// The freeze key appeared or went away.
    pub fn frozen(&self, frozen: bool) {
        self.update(|r| r.frozen = frozen);
    }

    /// The served build changed outside a deploy (operator rollback).
    pub fn served(&self, build: &str) {
        self.update(|r| r.build = Some(build.to_string()));
    }

    /// The live slot was checked against its record: `changed` lists what
    /// differs (empty when intact). Written only when it changed.
    pub fn live_checked(&self, changed: Vec<String>) {
        self.update(|r| r.changed = changed);
    }
}

/// Backoff between retries of a failed write: a Consul blip at the end of
/// a deploy must not leave `fleet status` wrong until the next deploy, and
/// a fleet of thousands that lost Consul retries at most once a minute per
/// host.
const RETRY: Backoff = Backoff {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
};

async fn writer(r: Arc<HostReporter>, client: ConsulClient, shutdown: CancellationToken) {
    let mut backoff = BackoffState::new(RETRY);
    // Set after a failed write: when to send the kept record again.
    let mut retry_in: Option<Duration> = None;
    loop {
        let retry = async {
            match retry_in {
                // Sooner when the token file is fixed (a 403 healed).
                Some(d) => client.sleep_until_token_changes(d, &shutdown).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = r.wake.notified() => {}
            _ = retry => {}
        }
        let Some(rec) = r.pending.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            continue;
        };
        let body = match serde_json::to_vec(&rec) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode the host report");
                continue;
            }
        };
        match client.put(&r.key, &body, None).await {
            Ok(_) => {
                debug!(key = %r.key, phase = rec.phase.as_str(), "host report written");
                *r.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                backoff.reset();
                retry_in = None;
            }
            Err(e) => {
                *r.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                let delay = backoff.next_delay(&mut rand::thread_rng());
                warn!(key = %r.key, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot write the host report; retrying");
                retry_in = Some(delay);
                // Keep it for the retry unless a newer one came.
                let mut p = r.pending.lock().unwrap_or_else(|p| p.into_inner());
                if p.is_none() {
                    *p = Some(rec);
                }
            }
        }
    }
}
