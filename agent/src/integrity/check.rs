//! Compares a slot with its record: which recorded paths were modified or
//! are missing, and which paths were added.
//!
//! One walk of the slot (readdir, and one `fstatat` per entry relative to
//! its directory) on two threads, each entry judged by
//! [`classify`](super::record::classify); only the files a stat cannot prove
//! unchanged are hashed, again on two threads. With nothing changed that is
//! one stat per entry and no reads: this is what runs before every flip to
//! an existing slot (docs/reliability.md, "Every slot is exactly its build").
//!
//! Crash guarantees: read-only; nothing to lose.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::record::{classify, link_digest, Entry, Kind, Observed, SlotRecord, Verdict};
use crate::error::{Error, Result};

/// Paths listed per kind in summaries (status, history, errors).
const LIST_MAX: usize = 20;

/// How a slot differs from its record. Paths are relative to the slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    pub modified: Vec<String>,
    pub added: Vec<String>,
    pub missing: Vec<String>,
    /// Entries compared.
    pub checked: u64,
    /// Files whose content had to be read.
    pub hashed: u64,
    /// Paths that differ, all kinds, also once the lists are capped.
    #[serde(default)]
    pub total: u64,
}

impl Drift {
    pub fn is_clean(&self) -> bool {
        self.modified.is_empty() && self.added.is_empty() && self.missing.is_empty()
    }

    /// Paths that differ, all kinds (the lists may be capped).
    pub fn count(&self) -> usize {
        let listed = self.modified.len() + self.added.len() + self.missing.len();
        listed.max(self.total as usize)
    }

    /// `modified app/f3.php; added x` with at most a few paths per kind,
    /// for logs, errors and history.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (what, list) in [
            ("modified", &self.modified),
            ("added", &self.added),
            ("missing", &self.missing),
        ] {
            if list.is_empty() {
                continue;
            }
            let shown: Vec<&str> = list.iter().take(5).map(String::as_str).collect();
            let more = list.len().saturating_sub(shown.len());
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            parts.push(format!("{what} {}{tail}", shown.join(", ")));
        }
        parts.join("; ")
    }

    /// The same drift with at most [`LIST_MAX`] paths per kind (status and
    /// host reports stay small whatever was changed); the counts are kept
    /// in `checked`/`hashed` and in [`Drift::count`] of the full value.
    pub fn capped(&self) -> Drift {
        let cap = |v: &Vec<String>| v.iter().take(LIST_MAX).cloned().collect();
        Drift {
            modified: cap(&self.modified),
            added: cap(&self.added),
            missing: cap(&self.missing),
            total: self.count() as u64,
            ..*self
        }
    }
}

/// What one walker found.
#[derive(Default)]
struct Walk {
    seen: Vec<usize>,
    hash: Vec<usize>,
    modified: Vec<PathBuf>,
    added: Vec<PathBuf>,
}

/// Compares `slot` with `record`. `full` hashes every file, whatever its
/// stat says (`deploy-agent verify --full`). Blocking: call it off the
/// async threads.
pub fn verify(slot: &Path, record: &SlotRecord, full: bool) -> Result<Drift> {
    // Keyed by the path's bytes: hashing a `Path` walks its components.
    let index: HashMap<&[u8], usize, FxBuild> = record
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.as_os_str().as_bytes(), i))
        .collect();
    let ctx = (&index, record, record.header.written_at_ns, full);
    // The top levels on this thread until there are directories enough to
    // share: a build usually has one or two top-level directories, and
    // splitting only those would leave one thread all the work.
    let mut main = Walk::default();
    let mut frontier = vec![PathBuf::new()];
    while !frontier.is_empty() && frontier.len() < 16 {
        let mut next = Vec::new();
        for dir in frontier {
            next.extend(children(slot, &dir, ctx, &mut main)?);
        }
        frontier = next;
    }
    let (odd, even): (Vec<_>, Vec<_>) = frontier
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 1);
    let walk_all = |dirs: Vec<(usize, PathBuf)>| -> Result<Walk> {
        let mut w = Walk::default();
        for (_, dir) in dirs {
            walk(slot, &dir, ctx, &mut w)?;
        }
        Ok(w)
    };
    let (a, b) = std::thread::scope(|s| {
        let t = s.spawn(|| walk_all(odd));
        let b = walk_all(even);
        (joined(t, slot), b)
    });
    for w in [a?, b?] {
        main.seen.extend(w.seen);
        main.hash.extend(w.hash);
        main.modified.extend(w.modified);
        main.added.extend(w.added);
    }
    finish(slot, record, main)
}

type Ctx<'a> = (
    &'a HashMap<&'a [u8], usize, FxBuild>,
    &'a SlotRecord,
    i64,
    bool,
);

/// FxHash (rustc's hasher) for the record's path index, built and probed
/// once per entry on the rollback's path. SipHash's resistance to chosen
/// collisions buys nothing here: whoever chooses the names in a slot can
/// change its files anyway, and the worst case is a slower check.
#[derive(Default)]
struct Fx(u64);

impl std::hash::Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxBuild = std::hash::BuildHasherDefault<Fx>;

/// Judges everything under the slot-relative directory `dir`.
fn walk(slot: &Path, dir: &Path, ctx: Ctx<'_>, w: &mut Walk) -> Result<()> {
    for sub in children(slot, dir, ctx, w)? {
        walk(slot, &sub, ctx, w)?;
    }
    Ok(())
}

/// Judges the entries of the slot-relative directory `dir`; returns its
/// subdirectories.
///
/// This loop is the rollback's critical path (one pass per entry of the
/// cold slot): it stats by name relative to the open directory and builds
/// each relative path in one reused buffer, allocating only for what it
/// returns or reports.
fn children(slot: &Path, dir: &Path, ctx: Ctx<'_>, w: &mut Walk) -> Result<Vec<PathBuf>> {
    use nix::fcntl::{AtFlags, OFlag};
    let (index, record, at, full) = ctx;
    let full_dir = slot.join(dir);
    let io = |e: nix::Error| Error::io(&full_dir, std::io::Error::from(e));
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut d = nix::dir::Dir::open(&full_dir, flags, nix::sys::stat::Mode::empty()).map_err(io)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&d);
    let mut rel = dir.as_os_str().as_bytes().to_vec();
    if !rel.is_empty() {
        rel.push(b'/');
    }
    let prefix = rel.len();
    let owned = |rel: &[u8]| PathBuf::from(OsStr::from_bytes(rel));
    let mut subdirs = Vec::new();
    for entry in d.iter() {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        let st = nix::sys::stat::fstatat(Some(fd), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| Error::io(full_dir.join(OsStr::from_bytes(name.to_bytes())), e.into()))?;
        rel.truncate(prefix);
        rel.extend_from_slice(name.to_bytes());
        let now = Observed::of_stat(&st);
        match index.get(rel.as_slice()) {
            None => w.added.push(owned(&rel)),
            Some(&i) => {
                w.seen.push(i);
                match classify(&record.entries[i], &now, at, full) {
                    Verdict::Same => {}
                    Verdict::Hash => w.hash.push(i),
                    Verdict::Changed => w.modified.push(owned(&rel)),
                }
            }
        }
        if now.kind == Kind::Dir {
            subdirs.push(owned(&rel));
        }
    }
    Ok(subdirs)
}

/// Hashes what the stat could not prove, and lists the missing entries.
fn finish(slot: &Path, record: &SlotRecord, w: Walk) -> Result<Drift> {
    let mut seen = vec![false; record.entries.len()];
    for i in &w.seen {
        seen[*i] = true;
    }
    let half = w.hash.len() / 2;
    let hash_all = |idx: &[usize]| -> Vec<usize> {
        let mut buf = vec![0u8; 256 << 10];
        idx.iter()
            .copied()
            .filter(|i| !content_matches(slot, &record.entries[*i], &mut buf))
            .collect()
    };
    let (x, y) = std::thread::scope(|s| {
        let t = s.spawn(|| hash_all(&w.hash[..half]));
        let y = hash_all(&w.hash[half..]);
        (t.join(), y)
    });
    let x = x.map_err(|_| {
        Error::Internal(format!(
            "a slot check thread panicked on {}",
            slot.display()
        ))
    })?;
    let lossy = |p: &Path| p.to_string_lossy().into_owned();
    let mut modified: Vec<String> = w.modified.iter().map(|p| lossy(p)).collect();
    modified.extend(x.iter().chain(&y).map(|i| lossy(&record.entries[*i].path)));
    let mut added: Vec<String> = w.added.iter().map(|p| lossy(p)).collect();
    let mut missing: Vec<String> = record
        .entries
        .iter()
        .zip(&seen)
        .filter(|(_, s)| !**s)
        .map(|(e, _)| lossy(&e.path))
        .collect();
    modified.sort();
    added.sort();
    missing.sort();
    let total = (modified.len() + added.len() + missing.len()) as u64;
    Ok(Drift {
        modified,
        added,
        missing,
        checked: w.seen.len() as u64,
        hashed: w.hash.len() as u64,
        total,
    })
}

/// Whether the entry's content (a file's bytes, a symlink's target) is the
/// recorded one. Unreadable counts as changed.
fn content_matches(slot: &Path, e: &Entry, buf: &mut [u8]) -> bool {
    let full = slot.join(&e.path);
    if e.stat.kind == Kind::Symlink {
        return std::fs::read_link(&full).is_ok_and(|t| link_digest(&t) == e.digest);
    }
    hash_file(&full, buf).is_ok_and(|(d, n)| d == e.digest && n == e.stat.size)
}

/// The sha256 and length of a file, never following a symlink.
pub fn hash_file(path: &Path, buf: &mut [u8]) -> std::io::Result<([u8; 32], u64)> {
    let mut f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    hash_open(&mut f, buf)
}

/// The sha256 and length of what `r` yields.
pub fn hash_open(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<([u8; 32], u64)> {
    let mut h = Sha256::new();
    let mut n = 0u64;
    loop {
        let k = r.read(buf)?;
        if k == 0 {
            return Ok((h.finalize().into(), n));
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
}

fn joined<T>(t: std::thread::ScopedJoinHandle<'_, Result<T>>, slot: &Path) -> Result<T> {
    t.join().unwrap_or_else(|_| {
        Err(Error::Internal(format!(
            "a slot check thread panicked on {}",
            slot.display()
        )))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::integrity::record::{stamp, Header, Mechanism};
    use crate::manifest::Sha256Sum;

    /// A slot of three files and its record, written after them.
    fn slot() -> (tempfile::TempDir, SlotRecord) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("slot");
        std::fs::create_dir_all(dir.join("d")).unwrap();
        let mut entries = vec![];
        for (p, body) in [("a", "one"), ("d/b", "two"), ("d/c", "three")] {
            std::fs::write(dir.join(p), body).unwrap();
            let meta = std::fs::metadata(dir.join(p)).unwrap();
            entries.push(Entry::new(Path::new(p), &meta, Sha256::digest(body).into()));
        }
        let meta = std::fs::metadata(dir.join("d")).unwrap();
        entries.push(Entry::new(Path::new("d"), &meta, [0; 32]));
        let newest = entries.iter().map(|e| e.stat.ctime_ns).max().unwrap();
        let header = Header {
            build: "b1".into(),
            sha256: Sha256Sum::from_bytes([0; 32]),
            mechanism: Mechanism::Written,
            written_at_ns: stamp(tmp.path(), newest).unwrap(),
        };
        (tmp, SlotRecord::new(header, entries))
    }

    #[test]
    fn an_untouched_slot_is_proven_by_stat_alone() {
        let (tmp, rec) = slot();
        let d = verify(&tmp.path().join("slot"), &rec, false).unwrap();
        assert!(d.is_clean(), "{d:?}");
        assert_eq!((d.checked, d.hashed), (4, 0));
        let d = verify(&tmp.path().join("slot"), &rec, true).unwrap();
        assert_eq!((d.is_clean(), d.hashed), (true, 3));
    }

    #[test]
    fn modified_added_and_missing_paths_are_named() {
        let (tmp, rec) = slot();
        let dir = tmp.path().join("slot");
        std::fs::write(dir.join("a"), "ONE").unwrap();
        std::fs::remove_file(dir.join("d/b")).unwrap();
        std::fs::write(dir.join("d/new"), "x").unwrap();
        let d = verify(&dir, &rec, false).unwrap();
        assert_eq!(d.modified, ["a"]);
        assert_eq!(d.missing, ["d/b"]);
        assert_eq!(d.added, ["d/new"]);
        assert_eq!(d.summary(), "modified a; added d/new; missing d/b");
    }

    /// The digests a full unpack leaves out are filled in from files whose
    /// stat proves them untouched; a file changed before that stays
    /// without one, and counts as modified.
    #[test]
    fn digests_are_filled_in_only_from_untouched_files() {
        let (tmp, mut rec) = slot();
        let dir = tmp.path().join("slot");
        for e in rec.entries.iter_mut().filter(|e| e.stat.kind == Kind::File) {
            (e.known, e.digest) = (false, [0; 32]);
        }
        std::fs::write(dir.join("d/c"), "THREE").unwrap();
        assert_eq!(crate::integrity::slot::complete(&dir, &mut rec), 2);
        let c = rec
            .entries
            .iter()
            .find(|e| &*e.path == Path::new("d/c"))
            .unwrap();
        assert!(!c.known);
        let d = verify(&dir, &rec, true).unwrap();
        assert_eq!(d.modified, ["d/c"], "{d:?}");
        assert_eq!(d.hashed, 2);
    }

    /// The racy case: a record whose stat of `a` was taken after an edit
    /// in the same clock tick as the record (its ctime is not older than
    /// the record) holds the stat of the edited file: stat alone would call
    /// it unchanged. It is hashed, and the edit is found.
    #[test]
    fn a_racy_entry_is_hashed_and_an_edit_in_the_same_tick_is_caught() {
        let (tmp, mut rec) = slot();
        let dir = tmp.path().join("slot");
        std::fs::write(dir.join("a"), "ONE").unwrap();
        let meta = std::fs::metadata(dir.join("a")).unwrap();
        let i = rec
            .entries
            .iter()
            .position(|e| &*e.path == Path::new("a"))
            .unwrap();
        let digest = rec.entries[i].digest;
        rec.entries[i] = Entry::new(Path::new("a"), &meta, digest);
        rec.header.written_at_ns = rec.entries[i].stat.ctime_ns;
        let d = verify(&dir, &rec, false).unwrap();
        assert_eq!(d.modified, ["a"], "{d:?}");
        assert_eq!(d.hashed, 1);
    }
}
