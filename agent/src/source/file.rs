//! The second source of the desired state: a local file holding the same
//! value the Consul key would, watched with `notify`.
//!
//! The parent directory is watched, not the file, so writers that replace
//! the file atomically (write a temp file, rename it over) are seen. Events
//! are debounced, the file is re-read, and only changed content is sent, as
//! [`WatchEvent`]s like the Consul watch sends. A slow periodic re-read
//! covers lost notifications (and a directory that cannot be watched).
//!
//! Nothing is written. If the process dies, the next start re-reads the
//! file and sends its current content first; the consumer compares it with
//! what is deployed.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::consul::WatchEvent;
use crate::consul::MAX_VALUE_SIZE;

/// Quiet time after the last event before the file is read: an editor or a
/// deploy tool often touches the file several times in a row.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Upper bound of the debounce under a constant stream of events.
const MAX_DEBOUNCE: Duration = Duration::from_millis(500);
/// Re-read this often even without events, in case some were lost.
const RESCAN: Duration = Duration::from_secs(10);
/// Re-read this often when the directory cannot be watched at all.
const POLL_WITHOUT_WATCHER: Duration = Duration::from_secs(1);

/// Watches `path` until `shutdown` is cancelled (or the receiver is gone):
/// sends its initial content (or `Missing`), then every change. The
/// `modify_index` of a value counts the values sent, starting at 1.
#[tracing::instrument(name = "file_watch", skip_all, fields(path = %path.display()))]
pub async fn watch_file(path: PathBuf, tx: mpsc::Sender<WatchEvent>, shutdown: CancellationToken) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_os_string());
    // A capacity-1 channel is a "something happened" flag: a full channel
    // already says so, and the callback (on notify's thread) never blocks.
    let (poke_tx, mut poke_rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let relevant = match &res {
            Ok(ev) => {
                ev.paths.is_empty() || ev.paths.iter().any(|p| p.file_name() == name.as_deref())
            }
            // An error (e.g. queue overflow) may hide our event: re-read.
            Err(_) => true,
        };
        if relevant {
            let _ = poke_tx.try_send(());
        }
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
    let rescan = match &watcher {
        Ok(_) => RESCAN,
        Err(e) => {
            let err = crate::Error::WatchFile {
                path: dir.clone(),
                message: e.to_string(),
            };
            tracing::warn!(error = %err, "polling the file instead of watching it");
            POLL_WITHOUT_WATCHER
        }
    };

    let mut last: Option<Seen> = None;
    let mut counter = 0u64;
    loop {
        if let Some(event) = read_change(&path, &mut last, &mut counter).await {
            tokio::select! {
                r = tx.send(event) => if r.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
        }
        // Wait for an event (or the rescan period), then for quiet.
        tokio::select! {
            _ = next_poke(&mut poke_rx) => {}
            _ = tokio::time::sleep(rescan) => {}
            _ = shutdown.cancelled() => return,
        }
        let started = Instant::now();
        loop {
            let remaining = MAX_DEBOUNCE.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                break;
            }
            tokio::select! {
                r = tokio::time::timeout(DEBOUNCE.min(remaining), next_poke(&mut poke_rx)) => {
                    if r.is_err() {
                        break; // quiet for DEBOUNCE
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }
    // `watcher` lives until here: dropping it stops the notifications.
}

/// The next notification. Without a watcher (it could not be set up, so
/// every sender is gone) this never returns: the rescan timer drives the
/// loop instead of a closed channel spinning it.
async fn next_poke(rx: &mut mpsc::Receiver<()>) {
    if rx.recv().await.is_none() {
        std::future::pending::<()>().await;
    }
}

/// What the file held at the last read: nothing yet, absent, a value, or
/// a rejection (so each is reported once per change, not per rescan).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Missing,
    Value(Vec<u8>),
    Rejected(String),
}

/// Reads the manifest file with every input bounded: it must be a regular
/// file (a FIFO would block the watch, and with it shutdown; a device such
/// as `/dev/zero` behind a symlink would read until memory runs out), and
/// at most `MAX_VALUE_SIZE` bytes are read whatever its size claims.
/// Opened non-blocking so even opening a FIFO cannot hang, then checked
/// with fstat on the opened file (no race with a rename in between).
fn read_bounded(path: &Path) -> std::io::Result<Result<Vec<u8>, String>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Ok(Err(format!(
            "{} is not a regular file (a FIFO, device or directory); write the manifest to a plain file",
            path.display()
        )));
    }
    let mut buf = Vec::new();
    file.take(MAX_VALUE_SIZE as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > MAX_VALUE_SIZE {
        return Ok(Err(format!(
            "{} is larger than the 512 KiB a Consul value may hold; publish a smaller manifest",
            path.display()
        )));
    }
    Ok(Ok(buf))
}

async fn read_change(
    path: &Path,
    last: &mut Option<Seen>,
    counter: &mut u64,
) -> Option<WatchEvent> {
    let p = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || read_bounded(&p)).await;
    let seen = match read {
        Ok(Ok(Ok(bytes))) => Seen::Value(bytes),
        Ok(Ok(Err(reason))) => Seen::Rejected(reason),
        Ok(Err(e)) if e.kind() == ErrorKind::NotFound => Seen::Missing,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the file; keeping the last value");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "file read task failed; keeping the last value");
            return None;
        }
    };
    if last.as_ref() == Some(&seen) {
        return None;
    }
    *last = Some(seen.clone());
    match seen {
        Seen::Missing => Some(WatchEvent::Missing),
        Seen::Rejected(reason) => Some(WatchEvent::Rejected { reason }),
        Seen::Value(value) => {
            *counter += 1;
            Some(WatchEvent::Value {
                value,
                modify_index: *counter,
            })
        }
    }
}
