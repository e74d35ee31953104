//! A partial download: `<sha256>.partial`, preallocated to the full size,
//! and its sidecar `<sha256>.progress` (how many bytes of each chunk are in
//! the file, replaced atomically every few MB), plus the in-order reader
//! that follows the contiguous watermark.
//!
//! Crash guarantees: a crash leaves the partial and its sidecar and the next
//! run resumes from the recorded chunk progress. The sidecar is not
//! fsynced, so after a power loss it may claim bytes that never reached the
//! disk; the final sha256 then fails, the partial is deleted and the next
//! attempt starts over (never serving bad data). The partial becomes a
//! cache entry ([`Partial::commit`]) only after its digest matched.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use tracing::warn;

pub use crate::manifest::{BuildSpec, Format, Sha256Sum};
pub use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

use super::cache::ArtifactCache;
use super::sha256::check;

/// Largest chunk handed to one range request. Small enough that the
/// in-order prefix (the watermark) advances at close to the full download
/// rate, big enough that per-request overhead does not matter.
const MAX_CHUNK: u64 = 8 << 20;
const MIN_CHUNK: u64 = 64 << 10;
/// Bytes buffered per range before one positional write (off the async
/// threads). Also what a dropped download can lose per range, and the step
/// in which the watermark advances.
pub(super) const WRITE_BUFFER: usize = 256 << 10;
/// Sidecar rewritten after this many new bytes (and when a download stops).
const PERSIST_EVERY: u64 = 4 << 20;

/// Progress of the partial file in chunks; shared by range writers (async)
/// and the in-order reader (a blocking thread, which waits on the Condvar).
#[derive(Debug)]
pub(super) struct Chunks {
    state: Mutex<ChunkState>,
    advanced: Condvar,
    pub(super) size: u64,
    pub(super) chunk: u64,
}

#[derive(Debug)]
struct ChunkState {
    /// Bytes present from each chunk's start.
    done: Vec<u64>,
    claimed: Vec<bool>,
    watermark: u64,
    /// Set when the download stopped for good (error, cancel, drop).
    aborted: bool,
    unpersisted: u64,
}

impl Chunks {
    fn new(size: u64, chunk: u64, done: Vec<u64>) -> Chunks {
        let n = done.len();
        let chunks = Chunks {
            state: Mutex::new(ChunkState {
                done,
                claimed: vec![false; n],
                watermark: 0,
                aborted: false,
                unpersisted: 0,
            }),
            advanced: Condvar::new(),
            size,
            chunk,
        };
        if let Ok(mut s) = chunks.state.lock() {
            s.watermark = chunks.watermark_of(&s.done);
        }
        chunks
    }

    /// A fully present file (the cache case): the reader never waits.
    fn complete(size: u64) -> Chunks {
        let chunk = size.max(1);
        Chunks::new(size, chunk, vec![size])
    }

    pub(super) fn len_of(&self, i: usize) -> u64 {
        let start = i as u64 * self.chunk;
        self.chunk.min(self.size - start)
    }

    fn watermark_of(&self, done: &[u64]) -> u64 {
        let mut mark = 0;
        for (i, d) in done.iter().enumerate() {
            mark += d;
            if *d < self.len_of(i) {
                break;
            }
        }
        mark
    }

    fn bytes_present(&self) -> u64 {
        self.state.lock().map(|s| s.done.iter().sum()).unwrap_or(0)
    }

    /// Claims the first chunk nobody works on that is not complete.
    pub(super) fn claim(&self) -> Option<usize> {
        let mut s = self.state.lock().ok()?;
        let i = (0..s.done.len()).find(|&i| !s.claimed[i] && s.done[i] < self.len_of(i))?;
        s.claimed[i] = true;
        Some(i)
    }

    pub(super) fn done(&self, i: usize) -> u64 {
        self.state.lock().map(|s| s.done[i]).unwrap_or(0)
    }

    /// Records `len` bytes written at `offset` (in memory); true when the
    /// sidecar is due to be persisted.
    pub(super) fn record(&self, offset: u64, len: u64) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let end = offset + len;
        let first = (offset / self.chunk) as usize;
        for i in first..s.done.len() {
            let start = i as u64 * self.chunk;
            if start >= end {
                break;
            }
            // Only contiguous growth counts: bytes beyond a gap are rewritten later.
            if offset <= start + s.done[i] {
                s.done[i] = s.done[i].max(end.min(start + self.len_of(i)) - start);
            }
        }
        s.unpersisted += len;
        let mark = self.watermark_of(&s.done);
        if mark != s.watermark {
            s.watermark = mark;
            self.advanced.notify_all();
        }
        if s.unpersisted >= PERSIST_EVERY {
            s.unpersisted = 0;
            return true;
        }
        false
    }

    /// Makes incomplete chunks claimable again (a full-body stream failed
    /// halfway; the next request starts over from byte 0).
    pub(super) fn unclaim_incomplete(&self) {
        if let Ok(mut s) = self.state.lock() {
            for i in 0..s.done.len() {
                if s.done[i] < self.len_of(i) {
                    s.claimed[i] = false;
                }
            }
        }
    }

    /// Claims every chunk: one full-body stream (no ranges) covers them all.
    pub(super) fn reset_all_claimed(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.claimed.iter_mut().for_each(|c| *c = true);
        }
    }

    fn abort(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.aborted = true;
        }
        self.advanced.notify_all();
    }

    /// Blocks until bytes beyond `pos` are present; `Ok(end)` is how far the
    /// caller may read, `Err` means the download stopped.
    fn wait_beyond(&self, pos: u64) -> std::io::Result<u64> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("chunk state poisoned"))?;
        loop {
            if s.watermark > pos || pos >= self.size {
                return Ok(s.watermark);
            }
            if s.aborted {
                // Not `Interrupted`: std's read loops would retry that forever.
                return Err(std::io::Error::other("download stopped"));
            }
            s = self
                .advanced
                .wait(s)
                .map_err(|_| std::io::Error::other("chunk state poisoned"))?;
        }
    }

    /// Sidecar text: `v1 <size> <chunk>` then one done-count per chunk.
    fn to_sidecar(&self) -> String {
        let done = self
            .state
            .lock()
            .map(|s| s.done.clone())
            .unwrap_or_default();
        let mut text = format!("v1 {} {}\n", self.size, self.chunk);
        for d in done {
            text.push_str(&d.to_string());
            text.push('\n');
        }
        text
    }
}

/// Chunk size for an artifact of `size` bytes fetched with `parallel` ranges.
fn chunk_size(size: u64, parallel: usize) -> u64 {
    size.div_ceil(parallel.max(1) as u64 * 2)
        .clamp(MIN_CHUNK, MAX_CHUNK)
}

/// Reads a sidecar; anything unexpected means "start over".
fn load_sidecar(path: &Path, size: u64, chunk: u64) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let header = lines.next()?;
    if header != format!("v1 {size} {chunk}") {
        return None;
    }
    let done: Vec<u64> = lines.map(|l| l.parse().ok()).collect::<Option<_>>()?;
    let n = size.div_ceil(chunk) as usize;
    if done.len() != n {
        return None;
    }
    let fits = done
        .iter()
        .enumerate()
        .all(|(i, d)| *d <= chunk.min(size - i as u64 * chunk));
    fits.then_some(done)
}

/// Replaces the sidecar atomically (temp + rename; no fsync, see module docs).
fn persist_sidecar(path: &Path, chunks: &Chunks) {
    let tmp = path.with_extension("progress.tmp");
    let result =
        std::fs::write(&tmp, chunks.to_sidecar()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        // A full disk fails the write half way: do not leave the temp
        // file behind (nothing else removes it for the current build).
        let _ = std::fs::remove_file(&tmp);
        // Only resume granularity is lost; the download itself goes on.
        warn!(path = %path.display(), error = %e, "cannot persist download progress");
    }
}

/// An open partial download: the preallocated file and its chunk progress.
#[derive(Debug)]
pub struct Partial {
    pub(super) path: PathBuf,
    sidecar: PathBuf,
    pub(super) file: Arc<File>,
    pub(super) chunks: Arc<Chunks>,
}

impl Partial {
    /// Opens (resuming) or creates `<sha>.partial`, preallocated to `size`.
    pub fn open(cache: &ArtifactCache, spec: &BuildSpec, parallel: usize) -> Result<Partial> {
        let path = cache.partial_path(&spec.sha256);
        let sidecar = cache.sidecar_path(&spec.sha256);
        let chunk = chunk_size(spec.size, parallel);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let done = if len == spec.size {
            load_sidecar(&sidecar, spec.size, chunk)
        } else {
            None
        };
        let done = match done {
            Some(done) => done,
            None => {
                file.set_len(0).map_err(|e| Error::io(&path, e))?;
                preallocate(&file, &path, spec.size)?;
                vec![0; spec.size.div_ceil(chunk) as usize]
            }
        };
        let chunks = Arc::new(Chunks::new(spec.size, chunk, done));
        Ok(Partial {
            path,
            sidecar,
            file: Arc::new(file),
            chunks,
        })
    }

    /// Deletes the partial and its sidecar (after a mismatch: never resume bad data).
    pub fn discard(&self) {
        for path in [&self.path, &self.sidecar] {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(path = %path.display(), error = %e, "cannot delete bad download");
                }
            }
        }
    }

    pub(super) fn persist(&self) {
        persist_sidecar(&self.sidecar, &self.chunks);
    }

    pub fn bytes_present(&self) -> u64 {
        self.chunks.bytes_present()
    }

    /// Reads the artifact in order while it downloads, never past the
    /// contiguous watermark; blocks (a blocking thread) until more arrives.
    pub fn reader(&self, cancel: CancellationToken) -> PartialReader {
        PartialReader {
            file: Arc::clone(&self.file),
            chunks: Arc::clone(&self.chunks),
            pos: 0,
            cancel,
        }
    }

    /// The download ended early (failed, cancelled or dropped): wakes the
    /// reader so it stops, and records the progress for the next attempt.
    /// A few hundred bytes, written synchronously (callable from `Drop`).
    pub fn stop(&self) {
        self.chunks.abort();
        self.persist();
    }

    /// For a partial downloaded whole (nothing read it while it arrived):
    /// hashes the file, then commits it like [`Partial::commit`], or
    /// deletes it when size or digest do not match.
    pub fn verify_and_commit(&self, cache: &ArtifactCache, spec: &BuildSpec) -> Result<PathBuf> {
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let size = std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(&self.path, e))?;
        let digest: [u8; 32] = sha2::Digest::finalize(hasher).into();
        let source = spec.urls.join(", ");
        if let Err(e) = check(&source, &spec.sha256.to_bytes(), spec.size, &digest, size) {
            self.discard();
            return Err(e);
        }
        self.commit(cache, &spec.sha256)
    }

    /// The digest matched: the partial becomes the cache entry `<sha256>`
    /// (by rename, so the name appears only complete), its sidecar goes,
    /// and the cache is pruned around it.
    pub fn commit(&self, cache: &ArtifactCache, sha256: &Sha256Sum) -> Result<PathBuf> {
        let complete = cache.dir().join(sha256.as_str());
        std::fs::rename(&self.path, &complete).map_err(|e| Error::io(&complete, e))?;
        let _ = std::fs::remove_file(&self.sidecar);
        if let Err(e) = cache.prune(Some(sha256)) {
            warn!(error = %e, "cannot prune the artifact cache");
        }
        Ok(complete)
    }
}

/// Reads an artifact in order: a partial, never past its contiguous
/// watermark, or a complete cached file.
#[derive(Debug)]
pub struct PartialReader {
    file: Arc<File>,
    chunks: Arc<Chunks>,
    pos: u64,
    cancel: CancellationToken,
}

impl PartialReader {
    /// A reader of a complete file of `size` bytes (a cache hit).
    pub fn whole(file: File, size: u64, cancel: CancellationToken) -> PartialReader {
        PartialReader {
            file: Arc::new(file),
            chunks: Arc::new(Chunks::complete(size)),
            pos: 0,
            cancel,
        }
    }
}

impl std::io::Read for PartialReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::other("cancelled"));
        }
        if self.pos >= self.chunks.size || buf.is_empty() {
            return Ok(0);
        }
        let available = self.chunks.wait_beyond(self.pos)?;
        let n = (available - self.pos).min(buf.len() as u64) as usize;
        let n = self.file.read_at(&mut buf[..n], self.pos)?;
        if n == 0 {
            return Err(std::io::Error::other("partial file shorter than recorded"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reserves the blocks up front (no ENOSPC halfway, no fragmentation from
/// four interleaved writers); filesystems without fallocate get a sparse file.
fn preallocate(file: &File, path: &Path, size: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let len = i64::try_from(size).map_err(|_| Error::InvalidArtifact {
        reason: format!("size {size} is too large"),
    })?;
    if len > 0 {
        let allocated = nix::fcntl::fallocate(
            file.as_raw_fd(),
            nix::fcntl::FallocateFlags::empty(),
            0,
            len,
        );
        match allocated {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::ENOSPC) => {
                return Err(Error::io(
                    path,
                    std::io::Error::from(nix::errno::Errno::ENOSPC),
                ))
            }
            Err(_) => {}
        }
    }
    file.set_len(size).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_follows_contiguous_prefix() {
        let chunks = Chunks::new(250, 100, vec![0, 0, 0]);
        assert!(!chunks.record(100, 100));
        chunks.record(0, 50);
        assert_eq!(chunks.wait_beyond(0).ok(), Some(50));
        chunks.record(50, 50);
        assert_eq!(chunks.wait_beyond(0).ok(), Some(200));
        chunks.record(200, 50);
        assert_eq!(chunks.wait_beyond(199).ok(), Some(250));
        let text = chunks.to_sidecar();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("s");
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load_sidecar(&path, 250, 100), Some(vec![100, 100, 50]));
        assert_eq!(load_sidecar(&path, 251, 100), None);
    }
}
