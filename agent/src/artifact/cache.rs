//! The artifact cache directory and its one owner, [`ArtifactCache`]:
//! - `<sha256>`: complete and verified (renamed only after the digest matched);
//! - `<sha256>.partial` and `<sha256>.progress`: a download in progress and
//!   its sidecar (see `partial`).
//!
//! Pins (in memory) keep what a deploy uses from being pruned; the free-space
//! check counts what the agent itself can clear. Crash guarantees: a file
//! appears under its digest only by rename after verification, so a crash
//! never leaves a half-written `<sha256>`; pruning and clearing partials
//! only delete, so a crash mid-way leaves fewer files, never wrong ones.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tracing::{debug, info, instrument, warn};

use crate::config::UnpackLimits;
pub use crate::manifest::{BuildSpec, Format, Sha256Sum};
pub use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

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

    /// Whether a partial download of `spec` already holds all its blocks
    /// (preallocated to the full size), so resuming it allocates nothing.
    pub fn partial_allocated(&self, spec: &BuildSpec) -> bool {
        std::fs::metadata(self.partial_path(&spec.sha256)).is_ok_and(|m| m.len() == spec.size)
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

/// The one free-space check of a deploy, made before the cold slot is
/// claimed. What the agent itself occupies and will clear counts as free
/// (the cold slot, about to be claimed; the trash; partial downloads no
/// deploy uses): a failed deploy's leftovers must never stop the next
/// deploy. When space is short it clears what can go now (the trash and
/// unused partials), so the claim itself has room for its few writes.
/// `cached` says the artifact is in the cache: nothing to download.
pub fn make_room(
    cache: &ArtifactCache,
    root: &Path,
    cold: &Path,
    spec: &BuildSpec,
    limits: &UnpackLimits,
    cached: bool,
) -> Result<()> {
    let download = if cached || cache.partial_allocated(spec) {
        0
    } else {
        spec.size
    };
    let unpacked = unpacked_estimate(spec, limits);
    let Err(Error::NotEnoughSpace { path, needed, .. }) =
        free_space_check(cache.dir(), cold, download, unpacked)
    else {
        return Ok(());
    };
    match swapper::purge_trash(root) {
        Ok(n) => info!(trash_entries = n, "space short: emptied the trash"),
        Err(e) => warn!(error = %e, "cannot empty the trash"),
    }
    match cache.remove_stale_partials() {
        Ok(freed) => info!(
            partial_bytes_freed = freed,
            "space short: removed unused partial downloads"
        ),
        Err(e) => warn!(error = %e, "cannot remove unused partial downloads"),
    }
    let free = match free_space_check(cache.dir(), cold, download, unpacked) {
        Ok(()) => return Ok(()),
        Err(Error::NotEnoughSpace { free, .. }) => free,
        Err(e) => return Err(e),
    };
    let reclaimable = swapper::fsutil::disk_usage(cold);
    if free.saturating_add(reclaimable) >= needed {
        info!(
            needed,
            free, reclaimable, "space short until the cold slot is cleared; going on"
        );
        return Ok(());
    }
    Err(Error::NotEnoughSpace {
        path,
        needed,
        free,
        reclaimable,
    })
}

/// Unpacked size assumed by the free-space check: the ratio guess for the
/// format, capped by the unpack limit (which the unpack would enforce anyway).
pub fn unpacked_estimate(spec: &BuildSpec, limits: &UnpackLimits) -> u64 {
    spec.size
        .saturating_mul(spec.format.expansion_estimate())
        .min(limits.max_bytes)
}
