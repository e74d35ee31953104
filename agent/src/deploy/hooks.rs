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
    let hook_error = |reason: String, output: String| Error::Hook {
        name: name.into(),
        reason,
        output,
    };
    let Some((prog, args)) = argv.split_first() else {
        return Err(hook_error("no command configured".into(), String::new()));
    };
    let mut child = tokio::process::Command::new(prog)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| hook_error(format!("cannot start {prog:?}: {e}"), String::new()))?;
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    let mut output = Output::new(read_pipes(&mut child), limit);
    let deadline = tokio::time::Instant::now() + timeout;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st.ok(),
            Some(chunk) = output.rx.recv() => output.add(&chunk),
            _ = tokio::time::sleep_until(deadline) => {
                if let Some(pg) = pgid {
                    // The whole group: a hook's children die with it.
                    let _ = killpg(pg, Signal::SIGKILL);
                }
                let _ = child.wait().await;
                let reason = format!(
                    "timed out after {} and was killed with its process group",
                    crate::clock::human_duration(timeout)
                );
                return Err(hook_error(reason, output.text()));
            }
        }
    };
    output.drain(name).await;
    let code = status.and_then(|s| s.code());
    if code != Some(0) {
        let reason = match code {
            Some(c) => format!("exited with status {c}"),
            None => "was killed by a signal".into(),
        };
        return Err(hook_error(reason, output.text()));
    }
    let took = start.elapsed();
    info!(
        hook = name,
        took_ms = took.as_millis() as u64,
        "hook succeeded"
    );
    Ok(HookOutcome {
        name: name.into(),
        status: code,
        output: output.text(),
        truncated: output.truncated,
        took,
    })
}

/// Reads the child's stdout and stderr on their own tasks; the chunks
/// arrive on the returned channel, which closes when both pipes did.
fn read_pipes(child: &mut tokio::process::Child) -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let pipes: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
        child.stdout.take().map(|s| Box::new(s) as _),
        child.stderr.take().map(|s| Box::new(s) as _),
    ];
    for mut pipe in pipes.into_iter().flatten() {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 || tx.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// A hook's output, capped at `limit` bytes.
struct Output {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    bytes: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Output {
    fn new(rx: tokio::sync::mpsc::Receiver<Vec<u8>>, limit: usize) -> Self {
        Output {
            rx,
            bytes: Vec::new(),
            limit,
            truncated: false,
        }
    }

    fn add(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.bytes.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.bytes
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// After the hook exited: takes what is buffered, but never waits on a
    /// grandchild that keeps the pipe open.
    async fn drain(&mut self, name: &str) {
        let grace = tokio::time::Instant::now() + OUTPUT_GRACE;
        loop {
            tokio::select! {
                c = self.rx.recv() => match c { Some(chunk) => self.add(&chunk), None => break },
                _ = tokio::time::sleep_until(grace) => {
                    warn!(hook = name, "hook left a process holding its output; no longer reading it");
                    break;
                }
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}
