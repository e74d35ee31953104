//! Starts the slot's writeback while the unpack goes on, so the `syncfs`
//! that makes the slot durable before its ready-marker finds little left
//! to write. Without it the kernel starts writing a 400 MB build only at
//! that final `syncfs` (the default dirty thresholds are gigabytes on a
//! large host), after the last file, with the disk idle until then.
//!
//! Every `[unpack] writeback-every` bytes (32 MiB) the parser asks a
//! background thread for one `syncfs` of the slot's filesystem; a request
//! made while one is running is dropped, so at most one runs at a time and
//! the unpack never waits for the disk. It changes nothing about durability or crash behaviour: the
//! final `syncfs` and the marker after it are the caller's, as before, and
//! a crash leaves an unmarked slot whatever was flushed.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use tracing::debug;

/// The background flusher of one unpack.
#[derive(Debug)]
pub struct Writeback {
    kick: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    every: u64,
    next_at: u64,
}

impl Writeback {
    /// Starts the flusher for the filesystem holding `slot`, asked every
    /// `every` bytes (0: never, and no thread). When the thread cannot be
    /// started, the unpack goes on without it.
    pub fn start(slot: &Path, every: u64) -> Writeback {
        if every == 0 {
            return Writeback {
                kick: None,
                thread: None,
                every,
                next_at: u64::MAX,
            };
        }
        // A rendezvous channel: `try_send` only succeeds while the thread
        // waits, which is what drops requests made during a flush.
        let (tx, rx) = sync_channel::<()>(0);
        let dir: PathBuf = slot.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("unpack-writeback".into())
            .spawn(move || {
                for () in rx {
                    if let Err(e) = swapper::fsutil::syncfs(&dir) {
                        // Only an early start: the caller's final syncfs
                        // reports what matters.
                        debug!(error = %e, "early writeback failed");
                    }
                }
            })
            .ok();
        Writeback {
            kick: thread.as_ref().map(|_| tx),
            thread,
            every,
            next_at: every,
        }
    }

    /// The unpack has handed `unpacked` bytes of contents to be written.
    pub fn progress(&mut self, unpacked: u64) {
        if unpacked < self.next_at {
            return;
        }
        self.next_at = unpacked.saturating_add(self.every);
        if let Some(tx) = &self.kick {
            let _ = tx.try_send(());
        }
    }

    /// Stops the flusher, waiting for a flush in progress.
    pub fn stop(&mut self) {
        self.kick = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.stop();
    }
}
