//! Durable filesystem primitives: atomic replace of a small file, directory
//! fsync, syncfs, and background deletion. `write_atomic` guarantees that a
//! crash leaves either the old or the new content under the final name, never
//! a mix; a leftover `*.tmp.*` file is harmless and removed by recovery.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{IoContext, Result};

/// Suffix marker shared by every temporary name we create, so recovery can
/// find leftovers with one pattern.
pub(crate) const TMP_TAG: &str = ".tmp.";

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique within this host: pid plus a process-wide counter plus the
/// clock, so two processes (or two threads) never race on one temp name.
pub(crate) fn unique_tmp_name(base: &str) -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(".{base}{TMP_TAG}{}.{n}.{nanos}", std::process::id())
}

/// Writes `bytes` to `path` atomically and durably: temp file in the same
/// directory, fsync, rename over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent(path);
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(unique_tmp_name(&base));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        fs::rename(&tmp, path).at(path)?;
        fsync_dir(&dir)
    })();
    if result.is_err() {
        // Best effort: the temp name is unique and recovery removes leftovers.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Replaces `path` with `bytes` atomically but not durably: temp file in
/// the same directory, then rename, no fsync. A killed process leaves the
/// old or the new content, never a mix; a power cut may lose the update.
/// For records that are informational or rebuilt at start, where an fsync
/// per update would cost more than it protects.
pub fn replace_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent(path);
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(unique_tmp_name(&base));
    let result = std::fs::write(&tmp, bytes)
        .at(&tmp)
        .and_then(|()| fs::rename(&tmp, path).at(path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes `dst` share `src`'s extents (the FICLONE ioctl: a reflink). Only
/// filesystems that copy shared extents on write support it (XFS with
/// reflink, btrfs): a later write to either file changes that file only.
/// Fails with EOPNOTSUPP, EINVAL or EXDEV where that is not possible (ext4,
/// tmpfs, another filesystem); the caller then copies.
pub fn reflink(src: &File, dst: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument
    // and reads no memory of ours; both descriptors are open for the whole
    // call since we borrow their `File`s.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// fsyncs a directory so that renames and unlinks inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Flushes every dirty page and inode of the filesystem holding `path` with
/// one syncfs(2). For a freshly unpacked build of tens of thousands of files
/// this costs well under a second, where one fsync per file costs 5-29 s.
pub fn syncfs(path: &Path) -> Result<()> {
    let f = File::open(path).at(path)?;
    nix::unistd::syncfs(f.as_raw_fd())
        .map_err(std::io::Error::from)
        .at(path)
}

/// Removes `path` recursively if it exists. Used off the critical path on
/// slot contents that were renamed into the trash.
pub fn remove_tree(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).at(path),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).at(path),
        Ok(_) => fs::remove_file(path).at(path),
    }
}

/// Bytes `path` occupies on disk (allocated blocks, recursively, never
/// following symlinks); 0 when it does not exist. Unreadable parts are
/// skipped: this is an estimate for free-space decisions and status.
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = m.blocks().saturating_mul(512);
    if !m.is_dir() {
        return own;
    }
    let Ok(entries) = fs::read_dir(path) else {
        return own;
    };
    entries
        .flatten()
        .map(|e| disk_usage(&e.path()))
        .fold(own, u64::saturating_add)
}

pub(crate) fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Reads a symlink, mapping "not there" to `None`.
pub(crate) fn read_link_opt(path: &Path) -> Result<Option<PathBuf>> {
    match fs::read_link(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // EINVAL: it exists but is not a symlink; callers look at metadata.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e).at(path),
    }
}

pub(crate) fn is_tmp_name(name: &OsString) -> bool {
    name.to_string_lossy().contains(TMP_TAG)
}
