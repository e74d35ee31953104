//! Live progress of the current deploy, shared between the pipeline stages
//! (writers) and the status socket (reader). In memory only: after a crash
//! the persisted deploy state says which phase was running, and progress
//! restarts from what is on disk.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters updated by the pipeline stages with relaxed atomics; readers
/// take a [`ProgressSnapshot`].
#[derive(Debug, Default)]
pub struct Progress {
    /// Artifact bytes downloaded (or found in the cache / partial file).
    pub bytes_downloaded: AtomicU64,
    /// Artifact size in bytes, from the manifest.
    pub bytes_total: AtomicU64,
    /// Archive bytes read through the hasher and unpacker, in order.
    pub bytes_unpacked_input: AtomicU64,
    /// Entries (files, dirs, links) written into the slot so far.
    pub entries: AtomicU64,
    /// Bytes of file contents written into the slot so far.
    pub bytes_written: AtomicU64,
}

/// A consistent-enough copy of [`Progress`] for reporting.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProgressSnapshot {
    pub bytes_downloaded: u64,
    pub bytes_total: u64,
    pub bytes_unpacked_input: u64,
    pub entries: u64,
    pub bytes_written: u64,
}

impl Progress {
    /// Resets every counter (in memory) for a new deploy of `total` bytes.
    pub fn reset(&self, total: u64) {
        self.bytes_downloaded.store(0, Ordering::Relaxed);
        self.bytes_total.store(total, Ordering::Relaxed);
        self.bytes_unpacked_input.store(0, Ordering::Relaxed);
        self.entries.store(0, Ordering::Relaxed);
        self.bytes_written.store(0, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            bytes_downloaded: self.bytes_downloaded.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_unpacked_input: self.bytes_unpacked_input.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}
