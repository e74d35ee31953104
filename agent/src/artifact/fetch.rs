//! Download of a build artifact into the artifact cache: parallel ranged
//! requests written in place into one preallocated `<sha256>.partial`,
//! per-range retries with backoff, mirrors, a shared bandwidth cap, and a
//! "contiguous watermark" that lets the verifier/unpacker read the in-order
//! prefix while later ranges are still arriving (see `pipeline`).
//!
//! Files in the cache directory:
//! - `<sha256>`: complete and verified (renamed only after the digest matched);
//! - `<sha256>.partial`: being downloaded, preallocated to the full size;
//! - `<sha256>.progress`: the sidecar, how many bytes of each chunk are in
//!   the partial, replaced atomically (temp + rename) every few MB.
//!
//! Crash guarantees: a crash leaves `<sha>.partial` and its sidecar; the next
//! run resumes from the recorded chunk progress. The sidecar is not fsynced,
//! so after a power loss it may claim bytes that never reached the disk; the
//! final sha256 then fails, the partial is deleted and the next attempt starts
//! over (never serving bad data). A digest mismatch deletes both files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use tokio::task::JoinSet;
use tracing::{debug, info, instrument, warn};

use crate::config::{DownloadConfig, UnpackLimits};
pub use crate::manifest::{BuildSpec, Format, Sha256Sum};
pub use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::pacing::{sleep_or_cancel, Backoff, BackoffState, TokenBucket};
use crate::progress::Progress;

/// How to download.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchSettings {
    /// Concurrent range requests when the server supports ranges.
    pub parallel_ranges: usize,
    /// TCP/TLS connect timeout (used by [`FetchSettings::client`]); also
    /// bounds, with `read_timeout`, the wait for response headers.
    pub connect_timeout: Duration,
    /// Longest wait for the next body chunk before the request counts as stalled.
    pub read_timeout: Duration,
    /// Consecutive failures of one range on one mirror before moving to the next mirror.
    pub retries_per_range: u32,
    /// Pause between retries of one range (jittered, doubling).
    pub backoff: Backoff,
    /// Total bytes per second over all ranges; `None` is unlimited.
    pub bandwidth_limit: Option<u64>,
    /// Accept `file://` URLs (tests, demo, air-gapped hosts).
    pub allow_file_urls: bool,
}

/// Retries of one range: 200 ms doubling to 10 s, jittered. Not a config
/// key: the range retry count (`download.retries`) is the operator's knob.
pub const RANGE_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(200),
    max: Duration::from_secs(10),
};

impl FetchSettings {
    /// The settings the `[download]` section gives; `allow_file_urls` also
    /// holds when the desired state comes from a local file.
    pub fn from_config(download: &DownloadConfig, local_source: bool) -> FetchSettings {
        FetchSettings {
            parallel_ranges: download.parallel_ranges,
            connect_timeout: download.connect_timeout,
            read_timeout: download.read_timeout,
            retries_per_range: download.retries,
            backoff: RANGE_BACKOFF,
            bandwidth_limit: download.bandwidth_limit,
            allow_file_urls: download.allow_file_urls || local_source,
        }
    }

    /// A client with this connect timeout, for callers without their own.
    pub fn client(&self) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .build()
    }
}

/// Verified artifacts by sha256, plus resumable partial downloads. The one
/// owner of the cache directory's files: clones share the set of pinned
/// digests, and [`ArtifactCache::prune`] never removes a pinned artifact,
/// partial or sidecar, so pruning after one deploy cannot delete what the
/// next (or a queued) deploy is using.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    keep: usize,
    /// Digests in use by a running deploy, with a count per user. Pruning
    /// decides and deletes under this lock, so a pin taken before a file is
    /// looked up is never raced.
    pins: Arc<Mutex<std::collections::HashMap<String, usize>>>,
}

/// Keeps one digest's cache files from being pruned while it lives.
#[derive(Debug)]
pub struct CachePin {
    pins: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    sha256: String,
}

impl Drop for CachePin {
    fn drop(&mut self) {
        let mut p = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = p.get_mut(&self.sha256) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.sha256);
            }
        }
    }
}

impl ArtifactCache {
    /// A cache in `dir` (created if missing) keeping the `keep` most recently
    /// used artifacts (2 = current and previous build, for instant rollback).
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Result<ArtifactCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(ArtifactCache {
            dir,
            keep: keep.max(1),
            pins: Arc::default(),
        })
    }

    /// Pins `sha256` (in memory) until the returned guard drops: take it
    /// before looking the artifact up, hold it until the deploy ends.
    pub fn pin(&self, sha256: &Sha256Sum) -> CachePin {
        let sha256 = sha256.to_string();
        *self
            .pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(sha256.clone())
            .or_default() += 1;
        CachePin {
            pins: self.pins.clone(),
            sha256,
        }
    }

    /// Deletes partial downloads (and sidecars) that no deploy uses.
    pub fn remove_stale_partials(&self) -> Result<u64> {
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let mut freed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((stem, _)) = name.split_once('.') else {
                continue;
            };
            if stem.len() != 64 || pins.contains_key(&stem.to_ascii_lowercase()) {
                continue;
            }
            let bytes = e
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            match std::fs::remove_file(e.path()) {
                Ok(()) => freed += bytes,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(Error::io(e.path(), err)),
            }
        }
        Ok(freed)
    }

    /// Bytes of partial downloads (and their sidecars) that no deploy uses:
    /// the agent's own leftovers, which a deploy may delete to make room.
    pub fn stale_partial_bytes(&self) -> u64 {
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                matches!(name.split_once('.'), Some((stem, _)) if stem.len() == 64 && !pins.contains_key(&stem.to_ascii_lowercase()))
            })
            .filter_map(|e| e.metadata().ok())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .sum()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the verified artifact `sha256` if the cache holds it (no I/O
    /// beyond one `stat`).
    pub fn lookup(&self, sha256: &Sha256Sum) -> Option<PathBuf> {
        let path = self.complete_path(sha256);
        path.is_file().then_some(path)
    }

    /// A digest names only a file inside the cache: it is 64 hex digits.
    fn complete_path(&self, sha256: &Sha256Sum) -> PathBuf {
        self.dir.join(sha256.as_str())
    }

    pub(crate) fn partial_path(&self, sha256: &Sha256Sum) -> PathBuf {
        self.dir.join(format!("{sha256}.partial"))
    }

    pub(crate) fn sidecar_path(&self, sha256: &Sha256Sum) -> PathBuf {
        self.dir.join(format!("{sha256}.progress"))
    }

    /// Marks `sha256` as just used (on disk: its mtime), so `prune` keeps it.
    pub fn touch(&self, sha256: &Sha256Sum) {
        let path = self.complete_path(sha256);
        if let Ok(file) = File::options().write(true).open(&path) {
            if let Err(e) = file.set_modified(SystemTime::now()) {
                warn!(path = %path.display(), error = %e, "cannot touch cached artifact");
            }
        }
    }

    /// Deletes (on disk) all but the `keep` most recently used complete
    /// artifacts, and partial downloads of any other build except `current`.
    /// Returns what it removed.
    pub fn prune(&self, current: Option<&str>) -> Result<Vec<PathBuf>> {
        // Held across the whole decision and the deletes (see `pins`).
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let pinned = |stem: &str| pins.contains_key(&stem.to_ascii_lowercase());
        let mut complete = Vec::new();
        let mut removed = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (stem, ext) = name.split_once('.').unwrap_or((&name, ""));
            if stem.len() != 64 || !stem.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            if ext.is_empty() {
                let mtime = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                complete.push((mtime, entry.path()));
            } else if current.is_none_or(|c| !c.eq_ignore_ascii_case(stem)) && !pinned(stem) {
                removed.push(entry.path());
            }
        }
        complete.sort_by_key(|(mtime, _)| std::cmp::Reverse(*mtime));
        // Beyond the `keep` newest, an artifact in use is kept anyway (for
        // as long as it is pinned).
        removed.extend(
            complete
                .into_iter()
                .skip(self.keep)
                .filter(|(_, p)| !p.file_name().is_some_and(|n| pinned(&n.to_string_lossy())))
                .map(|(_, p)| p),
        );
        for path in &removed {
            match std::fs::remove_file(path) {
                Ok(()) => info!(path = %path.display(), "pruned from artifact cache"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        Ok(removed)
    }
}

/// Refuses to start when `cache_dir`'s filesystem cannot take
/// `download_bytes` more and `slot_dir`'s cannot take `unpacked_bytes` (both
/// on one filesystem: the sum). The error names the bytes needed and free.
#[instrument(skip_all, fields(cache = %cache_dir.display(), slot = %slot_dir.display()))]
pub fn free_space_check(
    cache_dir: &Path,
    slot_dir: &Path,
    download_bytes: u64,
    unpacked_bytes: u64,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|e| Error::io(p, e))
    };
    let needs = if dev(cache_dir)? == dev(slot_dir)? {
        vec![(slot_dir, download_bytes.saturating_add(unpacked_bytes))]
    } else {
        vec![(cache_dir, download_bytes), (slot_dir, unpacked_bytes)]
    };
    for (path, needed) in needs {
        let stat = nix::sys::statvfs::statvfs(path)
            .map_err(|e| Error::io(path, std::io::Error::from(e)))?;
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        let free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
        debug!(path = %path.display(), needed, free, "free space");
        if needed > free {
            return Err(Error::NotEnoughSpace {
                path: path.to_path_buf(),
                needed,
                free,
                reclaimable: 0,
            });
        }
    }
    Ok(())
}

/// [`free_space_check`] for a deploy whose cold slot was already claimed:
/// when space is short, the agent first deletes its own leftovers (the
/// trash of the deploy root `slot_dir` lives in, and partial downloads no
/// deploy uses), then checks again. Its own leftovers never make a deploy
/// fail for lack of space.
pub fn ensure_space(
    cache: &ArtifactCache,
    slot_dir: &Path,
    download_bytes: u64,
    unpacked_bytes: u64,
) -> Result<()> {
    match free_space_check(cache.dir(), slot_dir, download_bytes, unpacked_bytes) {
        Err(Error::NotEnoughSpace { .. }) => {
            let trash = slot_dir.parent().map(swapper::purge_trash);
            let partials = cache.remove_stale_partials();
            info!(
                trash_entries = trash.and_then(|r| r.ok()).unwrap_or(0),
                partial_bytes_freed = partials.as_ref().copied().unwrap_or(0),
                "space short: cleared the agent's own leftovers"
            );
            free_space_check(cache.dir(), slot_dir, download_bytes, unpacked_bytes)
        }
        r => r,
    }
}

/// Unpacked size assumed by the free-space check: the ratio guess for the
/// format, capped by the unpack limit (which the unpack would enforce anyway).
pub fn unpacked_estimate(spec: &BuildSpec, limits: &UnpackLimits) -> u64 {
    spec.size
        .saturating_mul(spec.format.expansion_estimate())
        .min(limits.max_bytes)
}

// ---- chunk progress and the contiguous watermark ----

/// Largest chunk handed to one range request. Small enough that the
/// in-order prefix (the watermark) advances at close to the full download
/// rate, big enough that per-request overhead does not matter.
const MAX_CHUNK: u64 = 8 << 20;
const MIN_CHUNK: u64 = 64 << 10;
/// Bytes buffered per range before one positional write (off the async
/// threads). Also what a dropped download can lose per range, and the step
/// in which the watermark advances.
const WRITE_BUFFER: usize = 256 << 10;
/// Sidecar rewritten after this many new bytes (and when a download stops).
const PERSIST_EVERY: u64 = 4 << 20;

/// Progress of the partial file in chunks; shared by range writers (async)
/// and the in-order reader (a blocking thread, which waits on the Condvar).
#[derive(Debug)]
pub(crate) struct Chunks {
    state: Mutex<ChunkState>,
    advanced: Condvar,
    pub(crate) size: u64,
    chunk: u64,
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
    pub(crate) fn complete(size: u64) -> Chunks {
        let chunk = size.max(1);
        Chunks::new(size, chunk, vec![size])
    }

    fn len_of(&self, i: usize) -> u64 {
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
    fn claim(&self) -> Option<usize> {
        let mut s = self.state.lock().ok()?;
        let i = (0..s.done.len()).find(|&i| !s.claimed[i] && s.done[i] < self.len_of(i))?;
        s.claimed[i] = true;
        Some(i)
    }

    fn done(&self, i: usize) -> u64 {
        self.state.lock().map(|s| s.done[i]).unwrap_or(0)
    }

    /// Records `len` bytes written at `offset` (in memory); true when the
    /// sidecar is due to be persisted.
    fn record(&self, offset: u64, len: u64) -> bool {
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
    fn unclaim_incomplete(&self) {
        if let Ok(mut s) = self.state.lock() {
            for i in 0..s.done.len() {
                if s.done[i] < self.len_of(i) {
                    s.claimed[i] = false;
                }
            }
        }
    }

    /// Claims every chunk: one full-body stream (no ranges) covers them all.
    fn reset_all_claimed(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.claimed.iter_mut().for_each(|c| *c = true);
        }
    }

    pub(crate) fn abort(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.aborted = true;
        }
        self.advanced.notify_all();
    }

    /// Blocks until bytes beyond `pos` are present; `Ok(end)` is how far the
    /// caller may read, `Err` means the download stopped.
    pub(crate) fn wait_beyond(&self, pos: u64) -> std::io::Result<u64> {
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

// ---- the download ----

/// An open partial download: the preallocated file and its chunk progress.
#[derive(Debug)]
pub(crate) struct Partial {
    pub(crate) path: PathBuf,
    pub(crate) sidecar: PathBuf,
    pub(crate) file: Arc<File>,
    pub(crate) chunks: Arc<Chunks>,
}

impl Partial {
    /// Opens (resuming) or creates `<sha>.partial`, preallocated to `size`.
    pub(crate) fn open(
        cache: &ArtifactCache,
        spec: &BuildSpec,
        parallel: usize,
    ) -> Result<Partial> {
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
    pub(crate) fn discard(&self) {
        for path in [&self.path, &self.sidecar] {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(path = %path.display(), error = %e, "cannot delete bad download");
                }
            }
        }
    }

    pub(crate) fn persist(&self) {
        persist_sidecar(&self.sidecar, &self.chunks);
    }

    pub(crate) fn bytes_present(&self) -> u64 {
        self.chunks.bytes_present()
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

/// The download's bandwidth limit, shared by all ranges: each takes tokens
/// as bytes arrive and sleeps off any debt. The lock is held while sleeping
/// so ranges queue up fairly and the total stays at the rate.
#[derive(Debug)]
struct Bandwidth(tokio::sync::Mutex<TokenBucket>);

impl Bandwidth {
    fn new(bytes_per_sec: u64) -> Bandwidth {
        Bandwidth(tokio::sync::Mutex::new(TokenBucket::per_second(
            bytes_per_sec,
            tokio::time::Instant::now(),
        )))
    }

    async fn take(&self, n: usize) {
        let mut bucket = self.0.lock().await;
        let pause = bucket.take_owing(n as u64, tokio::time::Instant::now());
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Everything the range workers share.
#[derive(Debug)]
struct Job {
    client: reqwest::Client,
    spec: BuildSpec,
    settings: FetchSettings,
    partial: Arc<Partial>,
    progress: Arc<Progress>,
    mirror: AtomicUsize,
    rate: Option<Bandwidth>,
    /// Set by the first response: does the server answer ranges with 206?
    ranges: tokio::sync::watch::Sender<Option<bool>>,
    /// Workers stop at the next chunk, flush what they hold and return.
    cancel: CancellationToken,
}

/// How one request attempt ended.
enum Failure {
    /// Worth retrying on the same mirror (network, timeout, 5xx, 429).
    Transient(String),
    /// This mirror will not do (404, wrong size, 416): next mirror at once.
    Mirror(Error),
    /// The cancel token fired; what arrived was written.
    Cancelled,
}

/// Downloads every missing byte of `partial` (resuming what it holds),
/// recording progress in its chunks so the in-order reader can follow.
/// On error or cancellation (workers flush what they received first) the
/// partial and sidecar stay for resume.
#[instrument(skip_all, fields(sha256 = %spec.sha256, size = spec.size))]
pub(crate) async fn download(
    client: &reqwest::Client,
    spec: &BuildSpec,
    partial: Arc<Partial>,
    settings: &FetchSettings,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<()> {
    progress
        .bytes_downloaded
        .store(partial.bytes_present(), Ordering::Relaxed);
    let (ranges, mut ranges_known) = tokio::sync::watch::channel(None);
    let job = Arc::new(Job {
        client: client.clone(),
        spec: spec.clone(),
        settings: settings.clone(),
        partial,
        progress,
        mirror: AtomicUsize::new(0),
        rate: settings.bandwidth_limit.map(Bandwidth::new),
        ranges,
        // A child: stopping the workers after one failed must not cancel the caller.
        cancel: cancel.child_token(),
    });
    // JoinSet aborts the workers if this future is dropped (cancel/restart).
    let mut workers = JoinSet::new();
    workers.spawn(worker(Arc::clone(&job)));
    let mut spawned_rest = false;
    let mut first_error = None;
    loop {
        tokio::select! {
            changed = ranges_known.changed(), if !spawned_rest => {
                if changed.is_err() {
                    spawned_rest = true;
                    continue;
                }
                if let Some(with_ranges) = *ranges_known.borrow_and_update() {
                    spawned_rest = true;
                    if with_ranges {
                        for _ in 1..settings.parallel_ranges.max(1) {
                            workers.spawn(worker(Arc::clone(&job)));
                        }
                    }
                }
            }
            joined = workers.join_next() => {
                let failed = match joined {
                    None => break,
                    Some(Ok(Ok(()))) => continue,
                    Some(Ok(Err(e))) => e,
                    Some(Err(e)) => Error::Download {
                        sha256: spec.sha256.to_string(),
                        url: spec.urls.join(", "),
                        reason: format!("range worker failed: {e}"),
                    },
                };
                // Stop the other workers gracefully (they flush what they
                // hold) and report the first real error, not "cancelled".
                job.cancel.cancel();
                spawned_rest = true;
                let replace = match &first_error {
                    None => true,
                    Some(Error::Cancelled { .. }) => !matches!(failed, Error::Cancelled { .. }),
                    Some(_) => false,
                };
                if replace {
                    first_error = Some(failed);
                }
            }
        }
    }
    job.partial.persist();
    if let Some(e) = first_error {
        return Err(e);
    }
    let present = job.partial.bytes_present();
    if present != spec.size {
        // Every worker ended without error yet bytes are missing: a bug, but
        // report it as a failed download rather than verify a hole.
        return Err(Error::Download {
            sha256: spec.sha256.to_string(),
            url: spec.urls.join(", "),
            reason: format!("only {present} of {} bytes arrived", spec.size),
        });
    }
    Ok(())
}

/// One range worker: claims chunks in order until none are left.
async fn worker(job: Arc<Job>) -> Result<()> {
    let mut buf = Vec::with_capacity(WRITE_BUFFER);
    while let Some(i) = job.partial.chunks.claim() {
        let start = i as u64 * job.partial.chunks.chunk;
        let end = start + job.partial.chunks.len_of(i);
        let single = fetch_range(&job, start, end, &mut buf).await?;
        if single {
            // The server ignored Range and this worker streamed everything.
            break;
        }
    }
    Ok(())
}

/// Fetches `[start + done, end)` with retries and mirror fallback. Returns
/// true if the server answered 200 and the whole file was streamed instead.
async fn fetch_range(job: &Job, start: u64, end: u64, buf: &mut Vec<u8>) -> Result<bool> {
    let chunks = &job.partial.chunks;
    let i = (start / chunks.chunk) as usize;
    let mut failures = 0u32;
    let mut backoff = BackoffState::new(job.settings.backoff);
    let cancelled = || Error::Cancelled {
        what: format!("download of {}", job.spec.sha256),
    };
    loop {
        let from = start + chunks.done(i);
        if from >= end {
            return Ok(false);
        }
        if job.cancel.is_cancelled() {
            return Err(cancelled());
        }
        let mirror = job.mirror.load(Ordering::Acquire);
        let Some(url) = job.spec.urls.get(mirror) else {
            return Err(Error::Download {
                sha256: job.spec.sha256.to_string(),
                url: job.spec.urls.join(", "),
                reason: "no mirror left".into(),
            });
        };
        let before = chunks.done(i);
        let outcome = attempt(job, url, from, end, buf).await;
        match outcome {
            Ok(single) => return Ok(single),
            Err(Failure::Cancelled) => return Err(cancelled()),
            Err(failure) => {
                // Only real progress earns fresh retries, so a server that
                // dies after a few bytes every time still fails in bounded time.
                let progressed = chunks.done(i) >= before + WRITE_BUFFER as u64;
                if progressed {
                    failures = 0;
                    backoff.reset();
                }
                failures += 1;
                let give_up_mirror = match &failure {
                    Failure::Transient(_) => failures > job.settings.retries_per_range,
                    Failure::Mirror(_) | Failure::Cancelled => true,
                };
                let reason = match &failure {
                    Failure::Transient(r) => r.clone(),
                    Failure::Mirror(e) => e.to_string(),
                    Failure::Cancelled => "cancelled".to_string(),
                };
                warn!(url = %url, from, end, failures, reason = %reason, "range request failed");
                if give_up_mirror {
                    if let Some(next) = job.spec.urls.get(mirror + 1) {
                        warn!(url = %url, next = %next, "giving up on mirror, trying the next");
                    }
                    // Other workers may have moved on already; only advance once.
                    let _ = job.mirror.compare_exchange(
                        mirror,
                        mirror + 1,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    if mirror + 1 >= job.spec.urls.len() {
                        return Err(match failure {
                            Failure::Mirror(e) => e,
                            Failure::Cancelled => cancelled(),
                            Failure::Transient(reason) => Error::Download {
                                sha256: job.spec.sha256.to_string(),
                                url: url.clone(),
                                reason,
                            },
                        });
                    }
                    failures = 0;
                    backoff.reset();
                    continue;
                }
                let pause = backoff.next_delay(&mut rand::thread_rng());
                if !sleep_or_cancel(pause, &job.cancel).await {
                    return Err(cancelled());
                }
            }
        }
    }
}

/// One HTTP request for `[from, end)`; streams the body into the partial.
async fn attempt(
    job: &Job,
    url: &str,
    from: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> std::result::Result<bool, Failure> {
    let size = job.spec.size;
    if let Some(path) = url.strip_prefix("file://") {
        return attempt_file(job, url, Path::new(path), from, end, buf).await;
    }
    let request = job
        .client
        .get(url)
        .header(RANGE, format!("bytes={from}-{}", end - 1));
    let headers_deadline = job.settings.connect_timeout + job.settings.read_timeout;
    let sent = tokio::select! {
        _ = job.cancel.cancelled() => return Err(Failure::Cancelled),
        sent = tokio::time::timeout(headers_deadline, request.send()) => sent,
    };
    let response = match sent {
        Err(_) => {
            return Err(Failure::Transient(format!(
                "no response within {headers_deadline:?}"
            )))
        }
        Ok(Err(e)) => return Err(Failure::Transient(format!("request failed: {}", chain(&e)))),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    let (offset, single) = match status {
        StatusCode::PARTIAL_CONTENT => {
            let _ = job.ranges.send_if_modified(|r| r.replace(true).is_none());
            let total = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit_once('/'))
                .and_then(|(_, t)| t.parse::<u64>().ok());
            if let Some(total) = total.filter(|t| *t != size) {
                return Err(Failure::Mirror(Error::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: total,
                }));
            }
            if let Some(len) = response.content_length().filter(|l| *l != end - from) {
                return Err(Failure::Mirror(Error::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: size - (end - from) + len,
                }));
            }
            (from, false)
        }
        StatusCode::OK => {
            if let Some(len) = response.content_length().filter(|l| *l != size) {
                return Err(Failure::Mirror(Error::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: len,
                }));
            }
            let first = job.ranges.send_if_modified(|r| r.replace(false).is_none());
            if !first && *job.ranges.borrow() == Some(true) {
                // A mirror that stopped honouring ranges mid-download: take
                // the range from its full body would cost the whole file per
                // range; treat it as a transient fault of this request.
                return Err(Failure::Transient(format!(
                    "{url} ignored the Range header"
                )));
            }
            // No ranges: this worker streams the whole file from byte 0.
            job.partial.chunks.reset_all_claimed();
            (0, true)
        }
        s if s == StatusCode::NOT_FOUND
            || s == StatusCode::GONE
            || s == StatusCode::FORBIDDEN
            || s == StatusCode::UNAUTHORIZED
            || s == StatusCode::RANGE_NOT_SATISFIABLE =>
        {
            return Err(Failure::Mirror(Error::Download {
                sha256: job.spec.sha256.to_string(),
                url: url.to_string(),
                reason: format!("HTTP {s}"),
            }))
        }
        s => return Err(Failure::Transient(format!("HTTP {s}"))),
    };
    let stop = if single { size } else { end };
    let streamed = stream_body(job, url, response, offset, stop, buf).await;
    if single && streamed.is_err() {
        job.partial.chunks.unclaim_incomplete();
    }
    streamed.map(|()| single)
}

/// An error with its sources, for the operator (reqwest's top-level
/// message alone hides the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A `file://` mirror (only when allowed): read the range from the local
/// file on the blocking pool, then write it like a body.
async fn attempt_file(
    job: &Job,
    url: &str,
    path: &Path,
    from: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> std::result::Result<bool, Failure> {
    if !job.settings.allow_file_urls {
        return Err(Failure::Mirror(Error::InvalidArtifact {
            reason: format!("{url}: file URLs are not allowed (settings.allow_file_urls)"),
        }));
    }
    let file = match File::open(path) {
        Ok(f) => Arc::new(f),
        Err(e) => return Err(Failure::Mirror(Error::io(path, e))),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len != job.spec.size {
        return Err(Failure::Mirror(Error::SizeMismatch {
            url: url.to_string(),
            expected: job.spec.size,
            actual: len,
        }));
    }
    let _ = job.ranges.send_if_modified(|r| r.replace(true).is_none());
    let mut offset = from;
    while offset < end {
        if job.cancel.is_cancelled() {
            return Err(Failure::Cancelled);
        }
        let n = (end - offset).min(WRITE_BUFFER as u64) as usize;
        let reader = Arc::clone(&file);
        let read = tokio::task::spawn_blocking(move || {
            let mut data = vec![0u8; n];
            reader.read_exact_at(&mut data, offset).map(|()| data)
        })
        .await;
        match read {
            Ok(Ok(data)) => {
                if let Some(rate) = &job.rate {
                    rate.take(data.len()).await;
                }
                *buf = data;
                offset = flush(job, buf, offset).await?;
            }
            Ok(Err(e)) => return Err(Failure::Transient(format!("{url}: {e}"))),
            Err(e) => return Err(Failure::Transient(format!("{url}: read task failed: {e}"))),
        }
    }
    Ok(false)
}

/// Streams a response body to `offset..stop` of the partial in buffered
/// positional writes, each one on the blocking pool.
async fn stream_body(
    job: &Job,
    url: &str,
    mut response: reqwest::Response,
    mut offset: u64,
    stop: u64,
    buf: &mut Vec<u8>,
) -> std::result::Result<(), Failure> {
    buf.clear();
    let mut result: std::result::Result<(), Failure> = Ok(());
    loop {
        let next = tokio::select! {
            biased;
            _ = job.cancel.cancelled() => {
                result = Err(Failure::Cancelled);
                break;
            }
            next = tokio::time::timeout(job.settings.read_timeout, response.chunk()) => next,
        };
        let chunk = match next {
            Err(_) => {
                result = Err(Failure::Transient(format!(
                    "stalled: no data for {:?}",
                    job.settings.read_timeout
                )));
                break;
            }
            Ok(Err(e)) => {
                result = Err(Failure::Transient(format!("body failed: {}", chain(&e))));
                break;
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        if let Some(rate) = &job.rate {
            rate.take(chunk.len()).await;
        }
        let room = (stop - offset - buf.len() as u64) as usize;
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= WRITE_BUFFER || buf.len() as u64 + offset >= stop {
            offset = flush(job, buf, offset).await?;
        }
        if offset >= stop {
            break;
        }
    }
    // Keep what arrived before a failure: the retry resumes after it.
    offset = flush(job, buf, offset).await?;
    match result {
        Ok(()) if offset < stop => Err(Failure::Transient(format!(
            "{url}: body ended at byte {offset}, expected bytes up to {stop}"
        ))),
        Err(Failure::Transient(reason)) => Err(Failure::Transient(format!(
            "{reason} (received up to byte {offset}, expected bytes up to {stop})"
        ))),
        other => other,
    }
}

async fn flush(job: &Job, buf: &mut Vec<u8>, offset: u64) -> std::result::Result<u64, Failure> {
    if buf.is_empty() {
        return Ok(offset);
    }
    let data = std::mem::take(buf);
    let file = Arc::clone(&job.partial.file);
    let written = tokio::task::spawn_blocking(move || {
        let r = file.write_all_at(&data, offset);
        (r, data)
    })
    .await;
    let (result, mut data) = match written {
        Ok(pair) => pair,
        Err(e) => return Err(Failure::Transient(format!("write task failed: {e}"))),
    };
    if let Err(e) = result {
        // A local disk error will not get better by retrying another mirror.
        return Err(Failure::Mirror(Error::io(&job.partial.path, e)));
    }
    let len = data.len() as u64;
    data.clear();
    *buf = data;
    job.progress
        .bytes_downloaded
        .fetch_add(len, Ordering::Relaxed);
    if job.partial.chunks.record(offset, len) {
        let partial = Arc::clone(&job.partial);
        // Small file write; off the async threads like every other write.
        let _ = tokio::task::spawn_blocking(move || partial.persist()).await;
    }
    Ok(offset + len)
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
