//! The record of one slot: what its build wrote, entry by entry, and the
//! stat each file had when the record was written; its binary encoding; the
//! rule that decides whether a stat proves a file unchanged.
//!
//! Encoding: `MAGIC`, a JSON header (build, artifact sha256, how the shared
//! files were made, the record's write time), the entries, and a sha256 of
//! everything before it, so a torn or edited record is refused rather than
//! trusted. About 100 bytes per file: 4 MB for 40,000 files, decoded in a
//! few milliseconds (JSON would take tens, on the rollback's critical path).
//! In memory an entry is its path, six integers and the raw 32-byte digest.
//!
//! Crash guarantees: [`SlotRecord::write`] is temp file, fsync, rename, fsync
//! of the directory: a crash leaves the old record or the new one, and a temp
//! name that the deploy root's recovery removes.

use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::manifest::Sha256Sum;

const MAGIC: &[u8; 8] = b"DAGTREC1";
/// Set in an entry's kind byte when its digest is not known yet.
const UNHASHED: u8 = 0x80;
/// Fixed part of an encoded entry after its path.
const ENTRY_FIXED: usize = 1 + 8 + 4 + 8 + 8 + 8 + 32;

/// How a slot's files came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mechanism {
    /// Every file written from the artifact (a full deploy).
    Written,
    /// Unchanged files reflinked from the base slot (FICLONE: XFS with
    /// reflink, btrfs): shared extents, copied on write, so a write to one
    /// slot never shows in the other.
    Reflink,
    /// Unchanged files copied from the base slot inside the kernel
    /// (copy_file_range), where the filesystem cannot share extents (ext4).
    Copy,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Written => "written",
            Mechanism::Reflink => "reflink",
            Mechanism::Copy => "copy",
        }
    }
}

/// What a record entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Anything else found in a slot (a fifo, a socket): never recorded.
    Other,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::File => 0,
            Kind::Dir => 1,
            Kind::Symlink => 2,
            Kind::Other => 3,
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            0 => Kind::File,
            1 => Kind::Dir,
            2 => Kind::Symlink,
            _ => return None,
        })
    }

    fn of(meta: &Metadata) -> Kind {
        let t = meta.file_type();
        if t.is_file() {
            Kind::File
        } else if t.is_dir() {
            Kind::Dir
        } else if t.is_symlink() {
            Kind::Symlink
        } else {
            // A fifo, a socket or a device: never in a build (the unpack
            // refuses them), so found in a slot it is an addition.
            Kind::Other
        }
    }
}

/// A stat as the record compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub kind: Kind,
    pub size: u64,
    /// Permission bits only.
    pub mode: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

impl Observed {
    /// The same fields from a raw `fstatat` (the slot check's walk, which
    /// stats by name relative to an open directory without allocating).
    pub fn of_stat(st: &nix::sys::stat::FileStat) -> Observed {
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        };
        Observed {
            kind,
            size: st.st_size as u64,
            mode: st.st_mode & 0o7777,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
            ino: st.st_ino,
        }
    }

    pub fn of(meta: &Metadata) -> Observed {
        Observed {
            kind: Kind::of(meta),
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            ino: meta.ino(),
        }
    }
}

/// One entry of a slot: a regular file, a directory or a symlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the slot.
    pub path: Box<Path>,
    pub stat: Observed,
    /// A file's sha256, a symlink's target's; zero for a directory. Raw
    /// bytes, not a [`Sha256Sum`] (64 hex digits on the heap), to keep the
    /// record at a path and a few words per file.
    pub digest: [u8; 32],
    /// Whether `digest` is known. A full unpack records stats only (hashing
    /// every file there would cost a full deploy 5-50%, benches/hot_paths.rs
    /// `unpack/*`); the digests are filled in after the deploy, off its
    /// path, from files whose stat still proves them untouched
    /// ([`super::slot::complete`]).
    pub known: bool,
}

impl Entry {
    /// The entry for `path` as `meta` describes it now, with `digest`.
    pub fn new(path: &Path, meta: &Metadata, digest: [u8; 32]) -> Entry {
        Entry {
            path: path.into(),
            stat: Observed::of(meta),
            digest,
            known: true,
        }
    }

    /// The entry of a file whose digest is filled in later.
    pub fn unhashed(path: &Path, meta: &Metadata) -> Entry {
        Entry {
            known: false,
            ..Entry::new(path, meta, [0; 32])
        }
    }

    /// The entry of a symlink whose target is `target`.
    pub fn symlink(path: &Path, meta: &Metadata, target: &Path) -> Entry {
        Entry::new(path, meta, link_digest(target))
    }

    pub fn sha256(&self) -> Sha256Sum {
        Sha256Sum::from_bytes(self.digest)
    }
}

/// The digest a symlink is recorded with: its target's bytes.
pub fn link_digest(target: &Path) -> [u8; 32] {
    Sha256::digest(target.as_os_str().as_bytes()).into()
}

/// What a record says about the slot as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub build: String,
    /// The artifact the slot was built from.
    pub sha256: Sha256Sum,
    pub mechanism: Mechanism,
    /// The filesystem's clock when the record was written (nanoseconds
    /// since the epoch, read from a probe file's ctime): every recorded
    /// ctime is older. A file changed at or after it may carry a stat equal
    /// to the recorded one (same clock tick), so it is hashed ("racy").
    pub written_at_ns: i64,
}

/// A slot's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    pub header: Header,
    /// Sorted by path.
    pub entries: Vec<Entry>,
}

/// What one stat says about one recorded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Proven unchanged by stat.
    Same,
    /// The stat cannot prove it either way: hash the content.
    Hash,
    /// Changed (type, size, mode or mtime differ): no need to hash.
    Changed,
}

/// The racy rule and the stat comparison. A write to a file changes its
/// ctime (nobody can set a ctime), and replacing it changes its inode; so
/// an equal inode and ctime, both recorded after the file's last write,
/// prove the content unchanged. Unless the ctime is not strictly older
/// than the record: then a write in the same clock tick could have left
/// it equal, and only the content can tell. `full` hashes every file and
/// symlink whatever its stat.
pub fn classify(rec: &Entry, now: &Observed, written_at_ns: i64, full: bool) -> Verdict {
    let r = &rec.stat;
    if r.kind != now.kind {
        return Verdict::Changed;
    }
    match r.kind {
        Kind::Dir | Kind::Other => return Verdict::Same,
        Kind::File if r.size != now.size || r.mode != now.mode || r.mtime_ns != now.mtime_ns => {
            return Verdict::Changed
        }
        Kind::File | Kind::Symlink => {}
    }
    let racy = now.ctime_ns >= written_at_ns || now.mtime_ns >= written_at_ns;
    let stat_proves = !racy && r.ino == now.ino && r.ctime_ns == now.ctime_ns;
    match (rec.known, stat_proves) {
        // Nothing to hash against: only the stat can speak.
        (false, true) => Verdict::Same,
        (false, false) => Verdict::Changed,
        (true, true) if !full => Verdict::Same,
        (true, _) => Verdict::Hash,
    }
}

impl SlotRecord {
    /// The record of `entries` (any order) for `header`.
    pub fn new(header: Header, mut entries: Vec<Entry>) -> SlotRecord {
        entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        SlotRecord { header, entries }
    }

    /// Regular files in the record.
    pub fn files(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.stat.kind == Kind::File)
            .count()
    }

    /// The binary form (see the module comment).
    pub fn encode(&self) -> Vec<u8> {
        // Invariant: a struct of strings and integers always serializes.
        let header = serde_json::to_vec(&self.header).unwrap_or_default();
        let mut out = Vec::with_capacity(64 + header.len() + self.entries.len() * 100);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            let p = e.path.as_os_str().as_bytes();
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
            out.push(e.stat.kind.code() | if e.known { 0 } else { UNHASHED });
            out.extend_from_slice(&e.stat.size.to_le_bytes());
            out.extend_from_slice(&e.stat.mode.to_le_bytes());
            out.extend_from_slice(&e.stat.mtime_ns.to_le_bytes());
            out.extend_from_slice(&e.stat.ctime_ns.to_le_bytes());
            out.extend_from_slice(&e.stat.ino.to_le_bytes());
            out.extend_from_slice(&e.digest);
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Parses [`SlotRecord::encode`]'s output; `path` names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<SlotRecord> {
        let bad = |reason: &str| Error::SlotRecord {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if bytes.len() < MAGIC.len() + 32 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad("not a slot record of this agent version"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(bad("its checksum does not match (torn or edited)"));
        }
        let mut r = Cursor(&body[MAGIC.len()..]);
        let hlen = r.u32().ok_or_else(|| bad("truncated header"))? as usize;
        let header: Header = serde_json::from_slice(r.take(hlen).ok_or_else(|| bad("truncated"))?)
            .map_err(|e| bad(&format!("header: {e}")))?;
        let n = r.u64().ok_or_else(|| bad("truncated"))?;
        // Each entry takes at least ENTRY_FIXED bytes: bound the allocation.
        if n > (body.len() / ENTRY_FIXED) as u64 {
            return Err(bad("entry count larger than the file"));
        }
        let mut entries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            entries.push(r.entry().ok_or_else(|| bad("truncated or invalid entry"))?);
        }
        Ok(SlotRecord { header, entries })
    }

    /// Writes the record durably at `path` (temp, fsync, rename, fsync dir).
    pub fn write(&self, path: &Path) -> Result<()> {
        swapper::fsutil::write_atomic(path, &self.encode()).map_err(|e| Error::SlotRecord {
            path: path.to_path_buf(),
            reason: format!("cannot write it: {e}"),
        })
    }

    /// Reads the record at `path`: `None` when there is none (a slot built
    /// before records existed, or adopted).
    pub fn load(path: &Path) -> Result<Option<SlotRecord>> {
        match std::fs::read(path) {
            Ok(bytes) => SlotRecord::decode(&bytes, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn arr<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u32(&mut self) -> Option<u32> {
        self.arr().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.arr().map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.arr().map(i64::from_le_bytes)
    }
    fn entry(&mut self) -> Option<Entry> {
        let plen = self.u32()? as usize;
        let path = PathBuf::from(OsStr::from_bytes(self.take(plen)?));
        let code = self.take(1)?[0];
        let kind = Kind::from_code(code & !UNHASHED)?;
        let stat = Observed {
            kind,
            size: self.u64()?,
            mode: self.u32()?,
            mtime_ns: self.i64()?,
            ctime_ns: self.i64()?,
            ino: self.u64()?,
        };
        Some(Entry {
            path: path.into_boxed_path(),
            stat,
            digest: self.arr()?,
            known: code & UNHASHED == 0,
        })
    }
}

/// The filesystem clock of `dir`'s filesystem, strictly after `newest_ns`
/// (the newest ctime the record holds): read as the ctime of a probe file,
/// so it is the same clock, with the same granularity, that stamps every
/// later write. Waits for the next tick when needed (a few milliseconds
/// at most; after 1 s it gives up and returns what it read, and the racy
/// rule then makes the newest files hashed instead of trusted).
pub fn stamp(dir: &Path, newest_ns: i64) -> Result<i64> {
    let probe = dir.join(format!(".record-stamp.tmp.{}", std::process::id()));
    let started = std::time::Instant::now();
    loop {
        let file = std::fs::File::create(&probe).map_err(|e| Error::io(&probe, e))?;
        let meta = file.metadata().map_err(|e| Error::io(&probe, e));
        let _ = std::fs::remove_file(&probe);
        let now = Observed::of(&meta?).ctime_ns;
        if now > newest_ns || started.elapsed() > std::time::Duration::from_secs(1) {
            return Ok(now);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn file(ino: u64, ctime_ns: i64) -> Observed {
        Observed {
            kind: Kind::File,
            size: 10,
            mode: 0o644,
            mtime_ns: 1_000,
            ctime_ns,
            ino,
        }
    }

    fn entry(stat: Observed) -> Entry {
        Entry {
            path: Path::new("app/f3.php").into(),
            stat,
            digest: [7; 32],
            known: true,
        }
    }

    /// A digest not filled in yet: the stat alone decides, and anything
    /// it cannot prove counts as changed.
    #[test]
    fn without_a_digest_only_the_stat_can_prove_a_file_unchanged() {
        let mut rec = entry(file(5, 2_000));
        rec.known = false;
        assert_eq!(classify(&rec, &file(5, 2_000), 3_000, true), Verdict::Same);
        assert_eq!(
            classify(&rec, &file(6, 2_000), 3_000, false),
            Verdict::Changed
        );
        assert_eq!(
            classify(&rec, &file(5, 3_000), 3_000, false),
            Verdict::Changed
        );
        let bytes = SlotRecord::new(
            Header {
                build: "b".into(),
                sha256: Sha256Sum::from_bytes([0; 32]),
                mechanism: Mechanism::Written,
                written_at_ns: 1,
            },
            vec![rec.clone()],
        )
        .encode();
        assert_eq!(
            SlotRecord::decode(&bytes, Path::new("r")).unwrap().entries,
            [rec]
        );
    }

    #[test]
    fn an_equal_stat_older_than_the_record_proves_a_file_unchanged() {
        let rec = entry(file(5, 2_000));
        assert_eq!(classify(&rec, &file(5, 2_000), 3_000, false), Verdict::Same);
        // --full hashes it anyway.
        assert_eq!(classify(&rec, &file(5, 2_000), 3_000, true), Verdict::Hash);
    }

    #[test]
    fn a_new_inode_or_ctime_with_the_same_size_and_mtime_is_hashed() {
        let rec = entry(file(5, 2_000));
        assert_eq!(classify(&rec, &file(6, 2_000), 3_000, false), Verdict::Hash);
        assert_eq!(classify(&rec, &file(5, 2_500), 3_000, false), Verdict::Hash);
    }

    #[test]
    fn the_racy_case_is_hashed_not_trusted() {
        // Recorded and seen with the same stat, but the ctime is not
        // strictly older than the record: a write in the same tick could
        // have kept every field equal.
        let rec = entry(file(5, 3_000));
        assert_eq!(classify(&rec, &file(5, 3_000), 3_000, false), Verdict::Hash);
        assert_eq!(classify(&rec, &file(5, 3_000), 2_000, false), Verdict::Hash);
        assert_eq!(classify(&rec, &file(5, 3_000), 3_001, false), Verdict::Same);
    }

    #[test]
    fn size_mode_mtime_or_type_changes_need_no_hash() {
        let rec = entry(file(5, 2_000));
        let mut s = file(5, 2_000);
        s.size = 11;
        assert_eq!(classify(&rec, &s, 3_000, false), Verdict::Changed);
        let mut s = file(5, 2_000);
        s.mode = 0o600;
        assert_eq!(classify(&rec, &s, 3_000, false), Verdict::Changed);
        let mut s = file(5, 2_000);
        s.mtime_ns += 1;
        assert_eq!(classify(&rec, &s, 3_000, false), Verdict::Changed);
        let mut s = file(5, 2_000);
        s.kind = Kind::Symlink;
        assert_eq!(classify(&rec, &s, 3_000, false), Verdict::Changed);
    }

    #[test]
    fn a_record_round_trips_and_a_torn_one_is_refused() {
        let header = Header {
            build: "b1".into(),
            sha256: Sha256Sum::from_bytes([1; 32]),
            mechanism: Mechanism::Reflink,
            written_at_ns: 42,
        };
        let rec = SlotRecord::new(
            header,
            vec![entry(file(9, 8)), {
                let mut e = entry(file(1, 2));
                e.path = Path::new("a").into();
                e
            }],
        );
        let bytes = rec.encode();
        let back = SlotRecord::decode(&bytes, Path::new("r")).unwrap();
        assert_eq!(back, rec);
        assert_eq!(&*back.entries[0].path, Path::new("a"));
        for cut in [0, 8, bytes.len() / 2, bytes.len() - 1] {
            assert!(SlotRecord::decode(&bytes[..cut], Path::new("r")).is_err());
        }
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        let e = SlotRecord::decode(&flipped, Path::new("r")).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }
}
