//! This host as a member of the fleet: its id, the rollout decision for
//! each manifest it receives, the fleet-wide freeze key it watches, and the
//! reports it writes. The daemon calls in at three points: a manifest
//! arrives ([`Member::choose`]), a deploy changes phase
//! ([`Member::observe`]), the loop waits ([`Member::freeze_changed`]).
//!
//! Nothing here is persisted: after a crash the watches deliver the key and
//! the freeze state again and the decision is recomputed (it is a pure
//! function of the manifest and the host id).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::deploy::DeployRecord;
use crate::error::Result;
use crate::fleet::hostreport::HostReporter;
use crate::fleet::{Choice, Decision};
use crate::manifest::Manifest;
use crate::watch::consul::{ConsulClient, ConsulSettings, WatchEvent, WatchStats};

/// What `status` shows about the fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetInfo {
    pub host_id: String,
    pub tier: Option<String>,
    /// The rollout bucket in `[0, 100)` under the last manifest.
    pub bucket: Option<f64>,
    pub percent: Option<f64>,
    /// `all`, `new`, `previous` or `stay`.
    pub choice: Option<String>,
    /// The build the decision names.
    pub decided_build: Option<String>,
    pub frozen: bool,
    pub freeze_key: Option<String>,
    pub report_key: Option<String>,
}

/// The fleet side of one running agent.
#[derive(Debug)]
pub struct Member {
    host_id: String,
    info: Mutex<FleetInfo>,
    reporter: Option<Arc<HostReporter>>,
    frozen: Mutex<watch::Receiver<bool>>,
}

impl Member {
    /// Resolves the host id and, with Consul, starts the freeze watch and
    /// the report writer. `served` is the build live at start.
    pub fn start(
        config: &Config,
        consul: Option<&ConsulSettings>,
        served: Option<String>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Member>> {
        let host_id = crate::fleet::host_id(config);
        let (ftx, frx) = watch::channel(false);
        let mut info = FleetInfo {
            host_id: host_id.clone(),
            tier: config.fleet.tier.clone(),
            ..FleetInfo::default()
        };
        let mut reporter = None;
        if let Some(settings) = consul {
            let client = ConsulClient::new(settings)?;
            if let Some(prefix) = config.fleet.report_prefix() {
                let r = HostReporter::start(
                    client.clone(),
                    &prefix,
                    &host_id,
                    config.fleet.tier.clone(),
                    served,
                    shutdown.clone(),
                );
                info.report_key = Some(r.key().to_string());
                reporter = Some(r);
            }
            if let Some(key) = config.fleet.freeze_key() {
                info.freeze_key = Some(key.clone());
                let (tx, mut rx) = mpsc::channel(4);
                tokio::spawn(crate::watch::consul::watch_key(
                    client,
                    key.clone(),
                    tx,
                    Arc::new(WatchStats::new()),
                    shutdown.clone(),
                ));
                tokio::spawn(async move {
                    while let Some(ev) = rx.recv().await {
                        let frozen = matches!(ev, WatchEvent::Value { .. });
                        if *ftx.borrow() != frozen {
                            info!(key = %key, frozen, "fleet freeze changed");
                        }
                        ftx.send_replace(frozen);
                    }
                });
            }
        }
        info!(host_id = %host_id, tier = ?config.fleet.tier, "fleet member");
        Ok(Arc::new(Member {
            host_id,
            info: Mutex::new(info),
            reporter,
            frozen: Mutex::new(frx),
        }))
    }

    /// The rollout decision for a newly received manifest: the manifest
    /// this host should deploy, or `None` to deploy nothing.
    pub fn choose(&self, m: Manifest, modify_index: u64) -> Option<Manifest> {
        let (d, chosen) = crate::fleet::effective(&m, &self.host_id);
        info!(bucket = d.bucket, percent = ?d.percent, choice = ?d.choice, build = ?d.build, "rollout decision");
        if let Some(r) = &self.reporter {
            r.decided(modify_index, &d);
        }
        self.set_decision(&d);
        if d.choice == Choice::Stay {
            warn!(build = %m.spec.build, "outside the rollout percentage and the manifest names no previous build: keeping the live build");
        }
        chosen
    }

    fn set_decision(&self, d: &Decision) {
        let mut i = self.info.lock().unwrap_or_else(|p| p.into_inner());
        i.bucket = Some(d.bucket);
        i.percent = d.percent;
        i.choice = serde_json::to_value(d.choice)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
        i.decided_build = d.build.clone();
    }

    /// A deploy transition.
    pub fn observe(&self, rec: &DeployRecord) {
        if let Some(r) = &self.reporter {
            r.observe(rec);
        }
    }

    /// The live build changed outside a deploy (operator rollback).
    pub fn served(&self, build: &str) {
        if let Some(r) = &self.reporter {
            r.served(build);
        }
    }

    /// Whether the fleet-wide freeze is in place.
    pub fn frozen(&self) -> bool {
        *self
            .frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .borrow()
    }

    /// Waits for the freeze to change; returns the new state. Pending
    /// forever when there is no freeze watch.
    pub async fn freeze_changed(&self) -> bool {
        let mut rx = self
            .frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let frozen = *rx.borrow_and_update();
        // Mark it seen on the shared receiver too.
        self.frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .borrow_and_update();
        self.info.lock().unwrap_or_else(|p| p.into_inner()).frozen = frozen;
        if let Some(r) = &self.reporter {
            r.frozen(frozen);
        }
        frozen
    }

    /// What `status` shows.
    pub fn info(&self) -> FleetInfo {
        let mut i = self.info.lock().unwrap_or_else(|p| p.into_inner()).clone();
        i.frozen = self.frozen();
        i
    }
}

/// The build `current` serves, from the hot slot's marker.
pub fn served_build(root: &Mutex<swapper::DeployRoot>) -> Option<String> {
    let root = root.lock().unwrap_or_else(|p| p.into_inner());
    let hot = root.hot()?;
    root.marker(hot).map(|m| m.build.build_id.clone())
}
