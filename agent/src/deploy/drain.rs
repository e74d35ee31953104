//! The drain stage: wait for processes to leave a slot, and run the hooks
//! around the flip.
//!
//! Hooks run with a timeout in their own process group, killed whole on
//! timeout; their output is captured and capped, and a hook that leaves a
//! child holding its stdout cannot hang the agent (we stop reading shortly
//! after the hook itself exits). Nothing here writes to the deploy root, so
//! a crash mid-way leaves the slots as they were.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use swapper::drain::Holder;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{ColdSlotAction, DrainConfig, HotDrain};
use crate::error::{Error, Result};

/// How long we keep reading a hook's output after it exited: enough for
/// buffered output, short enough that a grandchild holding the pipe does
/// not matter.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// What a hook did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HookOutcome {
    pub name: String,
    pub status: Option<i32>,
    pub output: String,
    pub truncated: bool,
    pub took: Duration,
}

/// Runs one hook (an argv, no shell) with `timeout`, in its own process
/// group, with `env` added. Output (stdout and stderr interleaved as read)
/// is capped at `limit` bytes. Non-zero exit and timeout are errors.
pub async fn run_hook(
    name: &str,
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
    limit: usize,
) -> Result<HookOutcome> {
    let start = Instant::now();
    let Some((prog, args)) = argv.split_first() else {
        return Err(Error::Hook {
            name: name.into(),
            reason: "no command configured".into(),
            output: String::new(),
        });
    };
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| Error::Hook {
        name: name.into(),
        reason: format!("cannot start {prog:?}: {e}"),
        output: String::new(),
    })?;
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    for pipe in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut pipe = pipe;
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 || tx.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut output = Vec::new();
    let mut truncated = false;
    let mut collect = |chunk: Vec<u8>, output: &mut Vec<u8>| {
        let room = limit.saturating_sub(output.len());
        if chunk.len() > room {
            truncated = true;
        }
        output.extend_from_slice(&chunk[..chunk.len().min(room)]);
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st.ok(),
            Some(chunk) = rx.recv() => collect(chunk, &mut output),
            _ = tokio::time::sleep_until(deadline) => {
                if let Some(pg) = pgid {
                    // The whole group: a hook's children die with it.
                    let _ = killpg(pg, Signal::SIGKILL);
                }
                let _ = child.wait().await;
                let text = String::from_utf8_lossy(&output).into_owned();
                return Err(Error::Hook {
                    name: name.into(),
                    reason: format!("timed out after {} and was killed with its process group", crate::clock::human_duration(timeout)),
                    output: text,
                });
            }
        }
    };
    // Drain what is buffered, but never wait on a grandchild that keeps
    // the pipe open.
    let grace = tokio::time::Instant::now() + OUTPUT_GRACE;
    loop {
        tokio::select! {
            c = rx.recv() => match c { Some(chunk) => collect(chunk, &mut output), None => break },
            _ = tokio::time::sleep_until(grace) => {
                warn!(hook = name, "hook left a process holding its output; no longer reading it");
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&output).into_owned();
    let code = status.and_then(|s| s.code());
    let outcome = HookOutcome {
        name: name.into(),
        status: code,
        output: text.clone(),
        truncated,
        took: start.elapsed(),
    };
    if code != Some(0) {
        return Err(Error::Hook {
            name: name.into(),
            reason: match code {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".into(),
            },
            output: text,
        });
    }
    info!(
        hook = name,
        took_ms = outcome.took.as_millis() as u64,
        "hook succeeded"
    );
    Ok(outcome)
}

/// Waits until no process uses the cold slot `dir`, reporting holders via
/// `report`. At the deadline: fails naming them, or (with
/// `cold-action = "kill"`) sends SIGTERM, then SIGKILL after a grace.
pub async fn wait_cold_slot(
    dir: &Path,
    cfg: &DrainConfig,
    cancel: &CancellationToken,
    report: impl Fn(&[Holder]) + Send + Sync + 'static,
) -> Result<()> {
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
                let r = run_hook(
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
