//! The drain stage: wait for processes to leave a slot (the cold slot
//! before it is claimed, the hot slot before the flip), and at the cold
//! slot's deadline fail or kill what holds it, as configured. Nothing here
//! writes to the deploy root, so a crash mid-way leaves the slots as they
//! were.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use swapper::drain::Holder;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{ColdSlotAction, DrainConfig, HotDrain};
use crate::error::{Error, Result};

/// Waits until no process uses the cold slot `dir`, reporting holders via
/// `report`. At the deadline: fails naming them, or (with
/// `cold-action = "kill"`) sends SIGTERM, then SIGKILL after a grace.
pub async fn wait_cold_slot(
    dir: &Path,
    cfg: &DrainConfig,
    cancel: &CancellationToken,
    report: impl Fn(&[Holder]) + Send + Sync + 'static,
) -> Result<()> {
    if !dir.exists() {
        // Removed from under the agent (the claim recreates it): no
        // process can be using it.
        return Ok(());
    }
    let report = std::sync::Arc::new(report);
    let r = wait_no_process(dir, cfg.cold_deadline, cfg.poll, cancel, report.clone()).await;
    match (r, cfg.cold_action) {
        (Ok(()), _) => Ok(()),
        (
            Err(Error::Swapper(swapper::Error::DrainTimeout { holders, .. })),
            ColdSlotAction::Kill,
        ) if !cancel.is_cancelled() => {
            for sig in [Signal::SIGTERM, Signal::SIGKILL] {
                for h in &holders {
                    warn!(pid = h.pid, command = %h.command, signal = %sig, "signalling process still using the cold slot");
                    let _ = nix::sys::signal::kill(Pid::from_raw(h.pid), sig);
                }
                if wait_no_process(
                    dir,
                    Duration::from_secs(5),
                    cfg.poll,
                    cancel,
                    report.clone(),
                )
                .await
                .is_ok()
                {
                    return Ok(());
                }
            }
            wait_no_process(dir, Duration::ZERO, cfg.poll, cancel, report).await
        }
        (Err(e), _) => Err(e),
    }
}

async fn wait_no_process(
    dir: &Path,
    deadline: Duration,
    poll: Duration,
    cancel: &CancellationToken,
    report: std::sync::Arc<impl Fn(&[Holder]) + Send + Sync + 'static>,
) -> Result<()> {
    let dir: PathBuf = dir.to_path_buf();
    let cancel = cancel.clone();
    tokio::task::spawn_blocking(move || {
        swapper::drain::wait_until_drained(&dir, deadline, poll, |hs| {
            report(hs);
            !cancel.is_cancelled()
        })
    })
    .await
    .map_err(|e| Error::Internal(format!("drain task panicked: {e}")))?
    .map_err(Error::from)
}

/// Waits until the configured hot-slot condition holds, bounded by its
/// deadline.
pub async fn wait_hot_drained(
    hot_dir: &Path,
    cfg: &DrainConfig,
    hook_timeout: Duration,
    cancel: &CancellationToken,
    client: &reqwest::Client,
    report: impl Fn(&[Holder]) + Send + Sync + 'static,
) -> Result<()> {
    match &cfg.hot {
        HotDrain::None => Ok(()),
        HotDrain::NoProcess => {
            wait_no_process(
                hot_dir,
                cfg.hot_deadline,
                cfg.poll,
                cancel,
                std::sync::Arc::new(report),
            )
            .await
        }
        HotDrain::Command { argv } => {
            let start = Instant::now();
            loop {
                let left = cfg.hot_deadline.saturating_sub(start.elapsed());
                let r = super::hooks::run_hook(
                    "drain-check",
                    argv,
                    &[],
                    hook_timeout.min(left.max(Duration::from_millis(100))),
                    4096,
                )
                .await;
                if r.is_ok() {
                    return Ok(());
                }
                if start.elapsed() >= cfg.hot_deadline || cancel.is_cancelled() {
                    return Err(Error::DrainCondition {
                        what: format!("command {argv:?}"),
                        waited: start.elapsed(),
                    });
                }
                tokio::time::sleep(cfg.poll).await;
            }
        }
        HotDrain::Http { url } => {
            let start = Instant::now();
            loop {
                let ok = client
                    .get(url)
                    .timeout(cfg.poll.max(Duration::from_secs(1)))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    return Ok(());
                }
                if start.elapsed() >= cfg.hot_deadline || cancel.is_cancelled() {
                    return Err(Error::DrainCondition {
                        what: format!("HTTP endpoint {url}"),
                        waited: start.elapsed(),
                    });
                }
                tokio::time::sleep(cfg.poll).await;
            }
        }
    }
}
