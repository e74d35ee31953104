//! This host as a member of the fleet: its id, the rollout decision for
//! each manifest it receives, the fleet-wide freeze key it watches, and the
//! reports it writes. The daemon calls in at three points: a manifest
//! arrives ([`Member::choose`]), a deploy changes phase
//! ([`Member::observe`]), the loop waits ([`Member::freeze_changed`]).
//!
//! Nothing here is persisted: after a crash the watches deliver the key and
//! the freeze state again and the decision is recomputed (it is a pure
//! function of the manifest and the host id). The freeze as last seen is
//! also kept in the agent's state file (`control.rs`), so a restarted agent
//! stays frozen until its freeze watch answers.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::consul::{ConsulClient, ConsulSettings, QueryOptions};
use crate::deploy::DeployRecord;
use crate::error::Result;
use crate::fleet::host::hostreport::HostReporter;
use crate::fleet::{Choice, Decision};
use crate::manifest::Manifest;
use crate::source::consul::{WatchEvent, WatchStats};
pub use crate::status::model::FleetInfo;

/// The fleet side of one running agent.
#[derive(Debug)]
pub struct Member {
    host_id: String,
    info: Mutex<FleetInfo>,
    reporter: Option<Arc<HostReporter>>,
    frozen: Mutex<watch::Receiver<bool>>,
    /// The freeze key and a client to confirm it with, when watched.
    freeze: Option<(ConsulClient, String, Arc<WatchStats>)>,
    /// Sends confirmed freeze states to the same channel as the watch.
    freeze_tx: watch::Sender<bool>,
}

impl Member {
    /// Resolves the host id and, with Consul, starts the freeze watch and
    /// the report writer. `served` is the build live at start.
    pub fn start(
        config: &Config,
        consul: Option<&ConsulSettings>,
        served: Option<String>,
        tracker: &TaskTracker,
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
        let mut freeze = None;
        if let Some(settings) = consul {
            let client = ConsulClient::new(settings)?;
            if let Some(prefix) = config.fleet.report_prefix() {
                let r = HostReporter::start(
                    client.clone(),
                    &prefix,
                    &host_id,
                    config.fleet.tier.clone(),
                    served,
                    tracker,
                    shutdown.clone(),
                );
                info.report_key = Some(r.key().to_string());
                reporter = Some(r);
            }
            if let Some(key) = config.fleet.freeze_key() {
                info.freeze_key = Some(key.clone());
                let (tx, mut rx) = mpsc::channel(4);
                let stats = Arc::new(WatchStats::new());
                freeze = Some((client.clone(), key.clone(), stats.clone()));
                tracker.spawn(crate::source::consul::watch_key(
                    client,
                    key.clone(),
                    tx,
                    stats,
                    shutdown.clone(),
                ));
                let ftx = ftx.clone();
                tracker.spawn(async move {
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
        info!(host_id = %host_id, tier = config.fleet.tier.as_deref().unwrap_or(""), "fleet member");
        Ok(Arc::new(Member {
            host_id,
            info: Mutex::new(info),
            reporter,
            frozen: Mutex::new(frx),
            freeze,
            freeze_tx: ftx,
        }))
    }

    /// The rollout decision for a newly received manifest: the manifest
    /// this host should deploy, or `None` to deploy nothing.
    pub fn choose(&self, m: Manifest, modify_index: u64) -> Option<Manifest> {
        let (d, chosen) = crate::fleet::effective(&m, &self.host_id);
        info!(
            bucket = d.bucket,
            percent = d.percent.unwrap_or(100.0),
            choice = serde_json::to_value(d.choice)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            build = d.build.as_deref().unwrap_or(""),
            "rollout decision"
        );
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

    /// Whether a freeze key is watched.
    pub fn watches_freeze(&self) -> bool {
        self.freeze.is_some()
    }

    /// Reads the freeze key now, in Consul's consistent mode (the leader
    /// confirms its leadership first), so a freeze whose `release freeze`
    /// returned before a tier change was written is always seen by a host
    /// that has seen that change. `false` without a freeze key.
    pub async fn confirm_freeze(&self) -> Result<bool> {
        let Some((client, key, stats)) = &self.freeze else {
            return Ok(false);
        };
        let read = client
            .get(
                key,
                &QueryOptions {
                    consistent: true,
                    ..QueryOptions::default()
                },
            )
            .await?;
        let frozen = read.pair.is_some();
        if *self.freeze_tx.borrow() != frozen {
            info!(key = %key, frozen, "fleet freeze changed (confirmed before acting)");
            // The watch has not seen this state: make it hand on its next
            // answer, so a lift it would read as "no change" still arrives.
            stats.resync();
        }
        // Through the watch's channel, so the main loop's state machine
        // sees it whoever read it (a repeated state is a no-op there).
        self.freeze_tx.send_replace(frozen);
        self.info.lock().unwrap_or_else(|p| p.into_inner()).frozen = frozen;
        if let Some(r) = &self.reporter {
            r.frozen(frozen);
        }
        Ok(frozen)
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
        if let Some((_, _, stats)) = &self.freeze {
            let w = stats.snapshot();
            if w.consecutive_errors > 0 {
                i.freeze_error = w.last_error;
            }
        }
        if let Some(r) = &self.reporter {
            i.report_error = r.last_error();
        }
        i
    }
}

impl crate::deploy::LiveCheckSink for Member {
    fn live_checked(&self, changed: Vec<String>) {
        if let Some(r) = &self.reporter {
            r.live_checked(changed);
        }
    }
}

impl crate::deploy::FlipGate for Member {
    fn check<'a>(
        &'a self,
        build: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            if !self.watches_freeze() {
                return Ok(());
            }
            match self.confirm_freeze().await {
                Ok(false) => Ok(()),
                Ok(true) => Err(crate::error::Error::Cancelled {
                    what: format!("flip to {build}: the fleet is frozen"),
                }),
                Err(e) => Err(crate::error::Error::FreezeUnconfirmed {
                    build: build.to_string(),
                    message: e.to_string(),
                }),
            }
        })
    }
}

/// The build `current` serves, from the hot slot's marker.
pub fn served_build(deployer: &crate::deploy::Deployer) -> Option<String> {
    let slots = deployer.slots();
    slots.served().map(|(_, m)| m.build.build_id.clone())
}
