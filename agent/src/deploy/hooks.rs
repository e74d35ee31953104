//! Hooks (`pre-flip`, `post-flip`, the health command): one argv, no
//! shell, run with a timeout in its own process group and killed whole on
//! timeout; the output is captured and capped, and a hook that leaves a
//! child holding its stdout cannot hang the agent (we stop reading shortly
//! after the hook itself exits). A hook writes nothing of the agent's, so a
//! crash mid-hook leaves the slots as they were; the process group is
//! killed with the agent's cgroup by systemd.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

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
