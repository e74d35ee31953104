//! The data path of one deploy: fetch -> verify -> unpack, overlapped.
//!
//! Range workers (async) write the artifact into `<sha>.partial` in the
//! artifact cache; one blocking reader thread follows the contiguous
//! watermark, feeding every byte in order through sha256 and into the
//! decompressor and the unpacker, so a build is hashed and unpacked while
//! its tail is still downloading. [`fetch_and_unpack`] returns Ok only when
//! the whole artifact's size and digest matched AND every entry is written.
//!
//! Crash guarantees: a crash leaves `<sha>.partial` and its sidecar, and the
//! next run resumes; the slot is garbage because the caller writes its
//! ready-marker only after this returns Ok. A digest mismatch deletes the
//! partial (never resume from bad data); the partial becomes `<sha>` only
//! after the digest matched.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::artifact::download::download;
use crate::artifact::partial::{Partial, PartialReader};
use crate::artifact::sha256::{check, HashingReader};
use crate::artifact::{ArtifactCache, BuildSpec, FetchSettings};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::unpack::{unpack_recorded, UnpackLimits, UnpackStats};

/// What [`fetch_and_unpack`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackOutcome {
    pub stats: UnpackStats,
    /// Lowercase hex sha256 of the artifact (verified).
    pub sha256: String,
    /// True when the artifact came from the cache (no network at all).
    pub from_cache: bool,
    /// From the start until the last byte was in the partial (zero from cache).
    pub download_time: Duration,
    /// From the start until the reader thread finished hashing and unpacking.
    pub unpack_time: Duration,
    /// The slot record's entries: each file's sha256, hashed by the writer
    /// threads from the bytes they wrote, and its stat.
    pub record: Vec<crate::integrity::Entry>,
}

/// Downloads into `cache` (or reads `cached`, the cache entry the caller
/// looked up and pinned), verifies and unpacks the artifact into `slot_dir`,
/// an EMPTY directory the caller has claimed after its free-space check,
/// overlapping the stages.
///
/// Returns only when the sha256 and size of the whole artifact matched AND
/// every entry is written; the caller then makes the slot durable (syncfs)
/// and writes the ready-marker. On any Err the slot is garbage. On
/// cancellation (the token, or dropping this future) the partial download
/// and its progress are kept, so the next call resumes.
#[instrument(skip_all, fields(sha256 = %spec.sha256, size = spec.size, slot = %slot_dir.display()))]
#[allow(clippy::too_many_arguments)] // the deploy state machine's interface, kept flat on purpose
pub async fn fetch_and_unpack(
    client: &reqwest::Client,
    spec: &BuildSpec,
    cache: &ArtifactCache,
    cached: Option<PathBuf>,
    slot_dir: &Path,
    settings: &FetchSettings,
    limits: &UnpackLimits,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<UnpackOutcome> {
    progress.reset(spec.size);
    let started = Instant::now();

    // A cache hit needs no URL at all (rollback to a build whose mirrors are gone).
    if let Some(path) = cached {
        let expected = spec.sha256.to_bytes();
        return from_cache(
            spec, &expected, cache, path, slot_dir, limits, progress, cancel,
        )
        .await;
    }

    let partial = open_partial(spec, cache, settings).await?;
    let mut stop = StopOnDrop(Some(Arc::clone(&partial)));

    let reader = spawn_reader(
        partial.reader(cancel.clone()),
        spec,
        slot_dir,
        limits,
        Arc::clone(&progress),
    );
    // Cancellation is handled inside: workers flush what they received,
    // so a cancelled attempt keeps every byte it paid for.
    let downloaded = download(
        client,
        spec,
        Arc::clone(&partial),
        settings,
        Arc::clone(&progress),
        cancel.clone(),
    )
    .await;
    let download_time = started.elapsed();
    if let Err(e) = downloaded {
        // Stop the reader and wait for it: the caller may clear the slot next.
        partial.stop();
        let _ = reader.await;
        stop.0 = None;
        if matches!(e, Error::SizeMismatch { .. }) {
            partial.discard();
        }
        return Err(e);
    }
    stop.0 = None;
    let read = reader
        .await
        .map_err(|e| Error::io(slot_dir, std::io::Error::other(e)))?;
    release_memory();
    let unpack_time = started.elapsed();
    let (stats, record) = verify_and_commit(read, &partial, cache, spec, &cancel)?;
    info!(
        entries = stats.entries,
        bytes = stats.bytes_written,
        download_ms = download_time.as_millis() as u64,
        unpack_ms = unpack_time.as_millis() as u64,
        "fetched, verified and unpacked"
    );
    Ok(UnpackOutcome {
        stats,
        sha256: spec.sha256.to_string(),
        from_cache: false,
        download_time,
        unpack_time,
        record,
    })
}

/// Downloads `spec` whole into the cache (resuming a partial), verifies
/// its size and digest and returns the cache entry. For artifacts used
/// only once complete, such as a delta.
pub async fn fetch_to_cache(
    client: &reqwest::Client,
    spec: &BuildSpec,
    cache: &ArtifactCache,
    settings: &FetchSettings,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<PathBuf> {
    progress.reset(spec.size);
    let partial = open_partial(spec, cache, settings).await?;
    let mut stop = StopOnDrop(Some(Arc::clone(&partial)));
    let downloaded = download(
        client,
        spec,
        Arc::clone(&partial),
        settings,
        progress,
        cancel,
    )
    .await;
    stop.0 = None;
    if let Err(e) = downloaded {
        partial.stop();
        if matches!(e, Error::SizeMismatch { .. }) {
            partial.discard();
        }
        return Err(e);
    }
    let (cache, spec) = (cache.clone(), spec.clone());
    blocking(move || partial.verify_and_commit(&cache, &spec)).await
}

/// Opens (resuming) the partial download of `spec` in the cache.
async fn open_partial(
    spec: &BuildSpec,
    cache: &ArtifactCache,
    settings: &FetchSettings,
) -> Result<Arc<Partial>> {
    validate_urls(spec, settings)?;
    let (cache, spec, parallel) = (cache.clone(), spec.clone(), settings.parallel_ranges);
    let partial = blocking(move || Partial::open(&cache, &spec, parallel)).await?;
    let resumed = partial.bytes_present();
    if resumed > 0 {
        info!(resumed, "resuming partial download");
    }
    Ok(Arc::new(partial))
}

/// After the last byte: the size and digest of everything the reader saw
/// must match, and only then does the partial become a cache entry. A
/// mismatch deletes the partial (never resume from bad data).
fn verify_and_commit(
    read: ReadOutcome,
    partial: &Partial,
    cache: &ArtifactCache,
    spec: &BuildSpec,
    cancel: &CancellationToken,
) -> Result<Recorded> {
    let Some((digest, bytes)) = read.digest else {
        return Err(stopped(read, cancel, &spec.sha256));
    };
    let source = spec.urls.join(", ");
    if let Err(e) = check(&source, &spec.sha256.to_bytes(), spec.size, &digest, bytes) {
        warn!(error = %e, "downloaded artifact failed verification, deleting it");
        partial.discard();
        return Err(e);
    }
    partial.commit(cache, &spec.sha256)?;
    read.unpacked
}

/// The cache path: same reader, the whole file is already present. The
/// digest is checked again (disk corruption, a partial write before a power
/// loss); a bad cache entry is deleted.
#[allow(clippy::too_many_arguments)]
async fn from_cache(
    spec: &BuildSpec,
    expected: &[u8; 32],
    cache: &ArtifactCache,
    path: PathBuf,
    slot_dir: &Path,
    limits: &UnpackLimits,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<UnpackOutcome> {
    let started = Instant::now();
    info!(path = %path.display(), "artifact cache hit");
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
    progress
        .bytes_downloaded
        .store(size, std::sync::atomic::Ordering::Relaxed);
    let reader = spawn_reader(
        PartialReader::whole(file, size, cancel.clone()),
        spec,
        slot_dir,
        limits,
        progress,
    );
    let read = reader
        .await
        .map_err(|e| Error::io(slot_dir, std::io::Error::other(e)))?;
    release_memory();
    let Some((digest, bytes)) = read.digest else {
        return Err(stopped(read, &cancel, &spec.sha256));
    };
    let source = path.display().to_string();
    if let Err(e) = check(&source, expected, spec.size, &digest, bytes) {
        warn!(error = %e, "cached artifact failed verification, deleting it");
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    cache.touch(&spec.sha256);
    let (stats, record) = read.unpacked?;
    Ok(UnpackOutcome {
        stats,
        sha256: spec.sha256.to_string(),
        from_cache: true,
        download_time: Duration::ZERO,
        unpack_time: started.elapsed(),
        record,
    })
}

/// Hands the reader's freed buffers back to the kernel. glibc keeps freed
/// memory in per-thread arenas, so without this an idle agent holds on to
/// most of its last deploy's peak (measured: 33 MiB idle after a deploy).
pub(crate) fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only walks the
    // allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Caps glibc's malloc arenas at 2. By default glibc gives every thread
/// that allocates concurrently an arena of its own (up to 8 per core); the
/// range workers, the reader and the writers each leave one behind holding
/// freed memory, which is most of an idle agent's anonymous RSS after a
/// deploy. Call once at startup, before the runtime starts its threads.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt has no preconditions; M_ARENA_MAX only bounds how
    // many arenas later allocations may create.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// The error for a read that stopped before the last byte.
fn stopped(read: ReadOutcome, cancel: &CancellationToken, sha256: &str) -> Error {
    let cancelled = || Error::Cancelled {
        what: format!("unpack of {sha256}"),
    };
    if cancel.is_cancelled() {
        return cancelled();
    }
    read.unpacked.err().unwrap_or_else(cancelled)
}

fn validate_urls(spec: &BuildSpec, settings: &FetchSettings) -> Result<()> {
    if spec.urls.is_empty() {
        return Err(Error::InvalidArtifact {
            reason: format!("artifact {} has no URLs", spec.sha256),
        });
    }
    for url in &spec.urls {
        let ok = url.starts_with("http://")
            || url.starts_with("https://")
            || url.starts_with("s3://")
            || (settings.allow_file_urls && url.starts_with("file://"));
        if !ok {
            return Err(Error::InvalidArtifact {
                reason: format!("unsupported URL {url:?} (http, https, s3, or file when allowed)"),
            });
        }
    }
    Ok(())
}

/// What an unpack wrote, and the record entries of it.
type Recorded = (UnpackStats, Vec<crate::integrity::Entry>);

/// What the reader thread saw.
struct ReadOutcome {
    unpacked: Result<Recorded>,
    /// Digest and length of every byte of the artifact; `None` when the
    /// read stopped early (download failed, cancelled).
    digest: Option<([u8; 32], u64)>,
}

fn spawn_reader(
    source: PartialReader,
    spec: &BuildSpec,
    slot_dir: &Path,
    limits: &UnpackLimits,
    progress: Arc<Progress>,
) -> tokio::task::JoinHandle<ReadOutcome> {
    let (format, slot, limits) = (spec.format, slot_dir.to_path_buf(), *limits);
    tokio::task::spawn_blocking(move || {
        let mut hashing =
            HashingReader::new(BufReader::with_capacity(256 << 10, source), &progress);
        let unpacked = unpack_recorded(&mut hashing, format, &slot, &limits, &progress);
        // Hash the rest even when the unpack refused the archive: a digest
        // mismatch (bad download) is the more useful error than "corrupt".
        let digest = match hashing.drain() {
            Ok(()) => Some(hashing.finish()),
            Err(_) => None,
        };
        ReadOutcome { unpacked, digest }
    })
}

/// Stops the reader and records progress if `fetch_and_unpack` is dropped
/// mid-download (the "restart" case): the range workers are aborted by
/// their JoinSet, this wakes the reader thread so it exits.
struct StopOnDrop(Option<Arc<Partial>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(partial) = self.0.take() {
            partial.stop();
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("<blocking task>", std::io::Error::other(e)))?
}
