//! Delta artifacts: what changed between two builds, and how a host that
//! runs the base builds the target from it.
//!
//! A delta is a zstd-compressed tar. Its first entry, [`INDEX_NAME`], is a
//! JSON [`DeltaIndex`]: the base and target artifacts' sha256, and every
//! regular file the target shares with the base (same path, content, mode
//! and mtime) with its size and sha256. The other entries are the target's
//! own tar entries minus those shared files: directories, symlinks, hard
//! links and every new or changed file, in the target's order. The manifest
//! commits to the delta's sha256, so the index (and through it every shared
//! file's digest) is covered by the manifest and its signature.
//!
//! Applying it (`apply`): the delta's own entries go through the same
//! defensive unpacker as a full artifact; then every shared file of the
//! base slot is checked against the index and reused in the new slot. The
//! check costs a stat when the base slot's record proves the file unchanged
//! since its deploy (same inode and ctime, older than the record: see
//! `integrity::record::classify`), and a sha256 of the file otherwise (no
//! record, or a stat that differs or is racy). A file edited in place in
//! the base fails the delta (the new slot stays unmarked garbage, and the
//! caller downloads the full artifact).
//!
//! Reuse never shares an inode between slots (issue 20: a write to one slot
//! must never change the other, or a rollback would serve the edit): the
//! new slot's file is a reflink of the base's where the filesystem shares
//! extents copy-on-write (XFS with reflink, btrfs; `Mechanism::Reflink`),
//! an in-kernel copy otherwise (`copy_file_range`, `Mechanism::Copy`).
//! Directory mtimes are set last, from the index, as a full unpack leaves
//! them. Every entry of the new slot comes back with its record entry.
//!
//! A host that has the base only as its full artifact in the artifact
//! cache (`Base::Artifact`) streams the delta's entries and then the
//! base artifact's copies of the shared files, hashed against the index on
//! the way, through the same unpacker as one tar: it saves the download,
//! not the writes.
//!
//! Crash guarantees: as for a full unpack. Both ways write only into the
//! claimed cold slot; the base slot or artifact is only read; a crash
//! leaves an unmarked cold slot, which is garbage.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::info;

use super::{bytes_path, dir_mode, file_mode, unpack_recorded, UnpackLimits, UnpackStats};
use crate::artifact::sha256::{hash_file, HashingReader};
use crate::error::{Error, Result};
use crate::integrity::record::{classify, Entry, Mechanism, Observed, SlotRecord, Verdict};
use crate::manifest::{Format, Sha256Sum};
use crate::progress::Progress;

/// The index's name inside the delta: not a path a build can use.
pub const INDEX_NAME: &str = ".deploy-delta/index.json";
/// Largest index accepted: about 2 M shared files.
const MAX_INDEX_BYTES: u64 = 256 << 20;
const VERSION: u32 = 1;

/// The first entry of a delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaIndex {
    pub version: u32,
    /// sha256 of the base build's full artifact.
    pub base: Sha256Sum,
    /// sha256 of the target build's full artifact (the build's identity).
    pub target: Sha256Sum,
    /// Files taken from the base slot, in the target's order.
    pub shared: Vec<SharedFile>,
    /// Every directory of the target with its mtime, set after linking.
    pub dirs: Vec<(String, u64)>,
}

/// A regular file the target shares with the base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedFile {
    pub path: String,
    pub size: u64,
    pub sha256: Sha256Sum,
    pub mode: u32,
    pub mtime: u64,
}

/// What [`write`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaInfo {
    /// sha256 of the base artifact the delta applies to.
    pub base: Sha256Sum,
    pub sha256: Sha256Sum,
    pub size: u64,
    /// Entries of the target (files, directories, links).
    pub entries: u64,
    /// Files the target shares with the base.
    pub shared: u64,
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The unpack of the delta's own entries (written files among them).
    pub unpacked: UnpackStats,
    /// Shared files reflinked from the base slot.
    pub reflinked: u64,
    /// Shared files copied from the base slot.
    pub copied: u64,
    pub reused_bytes: u64,
    /// Shared files the base slot's record proved unchanged by stat alone.
    pub trusted: u64,
    /// Shared files hashed (no record, or a stat that could not prove them).
    pub hashed: u64,
    /// The record entries of everything in the new slot.
    pub entries: Vec<Entry>,
}

impl Applied {
    /// Shared files reused from the base slot.
    pub fn reused(&self) -> u64 {
        self.reflinked + self.copied
    }

    /// How the shared files were made: a reflink if any was.
    pub fn mechanism(&self) -> Mechanism {
        match (self.reflinked, self.copied) {
            (0, 0) => Mechanism::Written,
            (0, _) => Mechanism::Copy,
            _ => Mechanism::Reflink,
        }
    }
}

// ---- publishing ----

/// One regular file of an artifact, as the delta compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileKey {
    sha256: [u8; 32],
    size: u64,
    mode: u32,
    mtime: u64,
}

/// Writes the delta from the base artifact to the target artifact into
/// `out` (a temp name renamed into place).
pub fn write(base: (&Path, Format), target: (&Path, Format), out: &Path) -> Result<DeltaInfo> {
    let (base_files, base_sha256) = regular_files(base.0, base.1)?;
    let (index, entries) = plan(&base_files, base_sha256, target)?;
    let tmp = out.with_extension("partial-delta");
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let io = |e: std::io::Error| Error::io(&tmp, e);
    let encoder = zstd::Encoder::new(BufWriter::new(file), 3).map_err(io)?;
    let mut tar = tar::Builder::new(encoder);
    let json = serde_json::to_vec(&index).map_err(|e| Error::Internal(e.to_string()))?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(json.len() as u64);
    tar.append_data(&mut h, INDEX_NAME, &json[..]).map_err(io)?;
    let shared: HashSet<&str> = index.shared.iter().map(|f| f.path.as_str()).collect();
    let mut archive = tar::Archive::new(decoder(target.0, target.1)?);
    copy_entries(&mut archive, &mut tar, |path| !shared.contains(path))
        .map_err(|e| Error::io(target.0, e))?;
    let mut w = tar.into_inner().map_err(io)?.finish().map_err(io)?;
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    let (sha256, size) = hash_file(out)?;
    Ok(DeltaInfo {
        base: index.base.clone(),
        sha256,
        size,
        entries,
        shared: index.shared.len() as u64,
    })
}

/// The index of the delta from `base_files` to `target`, and the target's
/// entry count. A file is shared when the base has it at the same path
/// with the same content, mode and mtime, and no hard link in the target
/// involves it (a link must point at a file the delta itself writes).
fn plan(
    base_files: &HashMap<String, FileKey>,
    base: Sha256Sum,
    target: (&Path, Format),
) -> Result<(DeltaIndex, u64)> {
    let mut linked_paths = HashSet::new();
    let mut candidates = Vec::new();
    let mut dirs = Vec::new();
    let mut entries = 0u64;
    let target_sha256 = read_artifact(target.0, target.1, |entry| {
        entries += 1;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let header = entry.header();
        let (mode, mtime) = (header.mode().unwrap_or(0), header.mtime().unwrap_or(0));
        match header.entry_type() {
            tar::EntryType::Directory if !normal(&path).is_empty() => {
                dirs.push((normal(&path), mtime))
            }
            tar::EntryType::Link => {
                linked_paths.insert(path);
                if let Some(t) = entry.link_name_bytes() {
                    linked_paths.insert(String::from_utf8_lossy(&t).into_owned());
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let key = file_key(entry, mode, mtime)?;
                if base_files.get(&path) == Some(&key) {
                    candidates.push((path, key));
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    let shared = candidates
        .into_iter()
        .filter(|(p, _)| !linked_paths.contains(p))
        .map(|(path, k)| SharedFile {
            path,
            size: k.size,
            sha256: Sha256Sum::from_bytes(k.sha256),
            mode: k.mode,
            mtime: k.mtime,
        })
        .collect();
    let index = DeltaIndex {
        version: VERSION,
        base,
        target: target_sha256,
        shared,
        dirs,
    };
    Ok((index, entries))
}

/// Every regular file of an artifact by path, and the artifact's sha256.
fn regular_files(path: &Path, format: Format) -> Result<(HashMap<String, FileKey>, Sha256Sum)> {
    let mut files = HashMap::new();
    let sha256 = read_artifact(path, format, |entry| {
        let header = entry.header();
        if matches!(
            header.entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            let (mode, mtime) = (header.mode().unwrap_or(0), header.mtime().unwrap_or(0));
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            files.insert(name, file_key(entry, mode, mtime)?);
        }
        Ok(())
    })?;
    Ok((files, sha256))
}

/// Hands every entry of an artifact to `each`, and returns the sha256 of
/// the artifact's bytes, hashed on the same single read of the file.
pub(crate) fn read_artifact(
    path: &Path,
    format: Format,
    mut each: impl FnMut(&mut tar::Entry<'_, Box<dyn Read + '_>>) -> std::io::Result<()>,
) -> Result<Sha256Sum> {
    let io = |e: std::io::Error| Error::io(path, e);
    // Nothing watches a publish's reads.
    let unwatched = Progress::default();
    let mut raw = HashingReader::new(File::open(path).map_err(io)?, &unwatched);
    {
        let decoded = super::decoded(BufReader::new(&mut raw), format, path)?;
        let mut archive = tar::Archive::new(decoded);
        for entry in archive.entries().map_err(io)? {
            each(&mut entry.map_err(io)?).map_err(io)?;
        }
        // Past the end-of-archive blocks, so the decoder reads all its input.
        std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(io)?;
    }
    // Whatever the decoder left unread (nothing for a well-formed file).
    raw.drain().map_err(io)?;
    Ok(Sha256Sum::from_bytes(raw.finish().0))
}

fn file_key(r: &mut impl Read, mode: u32, mtime: u64) -> std::io::Result<FileKey> {
    let mut hasher = Sha256::new();
    let size = std::io::copy(r, &mut hasher)?;
    Ok(FileKey {
        sha256: hasher.finalize().into(),
        size,
        mode,
        mtime,
    })
}

/// Appends the entries of `archive` whose path `keep` accepts to `tar`,
/// each with its header: links with their target, the rest with their data.
/// An error says which side failed only through the io error itself, so
/// callers name the file.
fn copy_entries<R: Read, W: Write>(
    archive: &mut tar::Archive<R>,
    tar: &mut tar::Builder<W>,
    mut keep: impl FnMut(&str) -> bool,
) -> std::io::Result<()> {
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if !keep(&path) {
            continue;
        }
        let mut header = entry.header().clone();
        if let Some(long) = entry.link_name_bytes() {
            let long = long.into_owned();
            tar.append_link(&mut header, &path, bytes_path(&long))?;
        } else {
            tar.append_data(&mut header, &path, &mut entry)?;
        }
    }
    Ok(())
}

fn decoder(path: &Path, format: Format) -> Result<Box<dyn Read>> {
    let f = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    super::decoded(f, format, path)
}

// ---- applying ----

/// Opens the verified delta file: its tar stream past the index, and the
/// index, checked against what the manifest says (`base`, `target`); a
/// delta made for anything else is refused.
fn open_delta(
    delta: &Path,
    expect: (&Sha256Sum, &Sha256Sum),
) -> Result<(Box<dyn Read>, DeltaIndex)> {
    let file = BufReader::new(File::open(delta).map_err(|e| Error::io(delta, e))?);
    let mut stream = super::decoded(file, Format::TarZst, delta)?;
    let index = read_index(&mut stream, delta)?;
    if &index.base != expect.0 || &index.target != expect.1 {
        return Err(refused(format!(
            "it was made from base {} to {}, the manifest names base {} to {}",
            short(&index.base),
            short(&index.target),
            short(expect.0),
            short(expect.1)
        )));
    }
    Ok((stream, index))
}

/// Where a delta's base is read from.
#[derive(Debug, Clone)]
pub enum Base {
    /// A slot holding the base build, and its record if it has one: shared
    /// files are verified (by the record's stat, else by sha256) and
    /// reused the way `how` says.
    Slot {
        dir: PathBuf,
        record: Option<Box<SlotRecord>>,
        how: Mechanism,
    },
    /// The base build's full artifact (from the artifact cache): shared
    /// files are verified and written.
    Artifact(PathBuf),
}

/// Builds the target in the empty, claimed `slot` from the verified delta
/// file and its `base`. `expect` is the base and target sha256 the manifest
/// names; a delta made for anything else is refused.
pub fn apply(
    delta: &Path,
    base: &Base,
    slot: &Path,
    expect: (&Sha256Sum, &Sha256Sum),
    limits: &UnpackLimits,
    progress: &Progress,
) -> Result<Applied> {
    let (stream, index) = open_delta(delta, expect)?;
    let started = std::time::Instant::now();
    let applied = match base {
        Base::Slot { dir, record, how } => {
            let base = (dir.as_path(), record.as_deref(), *how);
            from_slot(stream, &index, base, slot, limits, progress)?
        }
        Base::Artifact(artifact) => {
            from_artifact(stream, &index, artifact, slot, limits, progress)?
        }
    };
    set_dir_mtimes(&index, slot)?;
    info!(
        reflinked = applied.reflinked,
        copied = applied.copied,
        trusted = applied.trusted,
        hashed = applied.hashed,
        written = applied.unpacked.files,
        ms = started.elapsed().as_millis() as u64,
        "delta applied"
    );
    Ok(applied)
}

/// The delta's entries through the unpacker, then every shared file of the
/// base slot verified and reused.
fn from_slot(
    stream: impl Read,
    index: &DeltaIndex,
    base: (&Path, Option<&SlotRecord>, Mechanism),
    slot: &Path,
    limits: &UnpackLimits,
    progress: &Progress,
) -> Result<Applied> {
    let rels = index
        .shared
        .iter()
        .map(|f| relative(&f.path))
        .collect::<Result<Vec<_>>>()?;
    let started = std::time::Instant::now();
    let (unpacked, mut entries) = unpack_recorded(stream, Format::Tar, slot, limits, progress)?;
    let written = started.elapsed();
    let mut applied = reuse_shared(&index.shared, &rels, base, slot, progress)?;
    applied.unpacked = unpacked;
    entries.append(&mut applied.entries);
    applied.entries = entries;
    info!(
        unpack_ms = written.as_millis() as u64,
        verify_and_reuse_ms = (started.elapsed() - written).as_millis() as u64,
        how = base.2.as_str(),
        "delta: base slot files verified and reused"
    );
    Ok(applied)
}

/// The delta's own entries, then the base artifact's copies of the shared
/// files, through the unpacker as one tar stream (no slot holds the base
/// any more), so they get every check a full unpack gets. Each shared
/// file's content is compared with the index on its way through and a
/// mismatch fails the delta (the caller then downloads the full artifact).
/// Every file is written, none linked: what this saves is the download.
fn from_artifact(
    stream: impl Read,
    index: &DeltaIndex,
    base_artifact: &Path,
    slot: &Path,
    limits: &UnpackLimits,
    progress: &Progress,
) -> Result<Applied> {
    let (reader, writer) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::io(slot, e.into()))?;
    let (mut reader, writer) = (File::from(reader), File::from(writer));
    let (unpacked, merged) = std::thread::scope(|s| {
        let unpacker = s.spawn(move || {
            let unpacked = unpack_recorded(&mut reader, Format::Tar, slot, limits, progress);
            if unpacked.is_ok() {
                // Past the end-of-archive block the unpacker stops at, so
                // the merger's last write does not fail.
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
            }
            // The reader drops here: after a failed unpack the merger's
            // next write fails instead of blocking on a full pipe.
            unpacked
        });
        let merged = merge(stream, index, base_artifact, writer);
        let unpacked = unpacker
            .join()
            .unwrap_or_else(|_| Err(refused("a delta thread panicked".into())));
        (unpacked, merged)
    });
    // The merger's own error (a base file that differs, a missing one)
    // explains a cut-short stream better than the unpacker's.
    let (from_base, n) = match (unpacked, merged) {
        (Ok((u, entries)), Ok(n)) => (
            Applied {
                unpacked: u,
                entries,
                ..Applied::default()
            },
            n,
        ),
        (_, Err(e)) if !is_broken_pipe(&e) => return Err(e),
        (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
    };
    info!(
        from_base_artifact = n,
        "delta: shared files written from the cached base artifact"
    );
    Ok(from_base)
}

/// Writes one tar stream into `out`: the delta's own entries, then every
/// shared file as the base artifact holds it, with the mode and mtime the
/// index gives and its content checked against the index's sha256.
/// Returns how many shared files it wrote.
fn merge(delta: impl Read, index: &DeltaIndex, base_artifact: &Path, out: File) -> Result<u64> {
    let to_pipe = |e: std::io::Error| Error::io(base_artifact, e);
    let mut tar = tar::Builder::new(BufWriter::with_capacity(256 << 10, out));
    copy_entries(&mut tar::Archive::new(delta), &mut tar, |_| true).map_err(to_pipe)?;
    let mut wanted: HashMap<&str, &SharedFile> =
        index.shared.iter().map(|f| (f.path.as_str(), f)).collect();
    // The deploy's progress counts the delta's bytes, not the base's.
    let unwatched = Progress::default();
    let mut file = BufReader::new(File::open(base_artifact).map_err(to_pipe)?);
    // The first bytes, peeked in the buffer, name the format.
    let format = Format::sniff(std::io::BufRead::fill_buf(&mut file).map_err(to_pipe)?);
    let mut archive = tar::Archive::new(super::decoded(file, format, base_artifact)?);
    for entry in archive.entries().map_err(to_pipe)? {
        let mut entry = entry.map_err(to_pipe)?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(f) = wanted.remove(path.as_str()) else {
            continue;
        };
        let changed = |why: String| Error::DeltaBaseChanged {
            path: base_artifact.join(&f.path),
            why,
        };
        if !matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) || entry.size() != f.size
        {
            return Err(changed("not a regular file of the indexed size".into()));
        }
        let mut header = entry.header().clone();
        header.set_mode(f.mode);
        header.set_mtime(f.mtime);
        let mut hashing = HashingReader::new(&mut entry, &unwatched);
        tar.append_data(&mut header, &f.path, &mut hashing)
            .map_err(to_pipe)?;
        if Sha256Sum::from_bytes(hashing.finish().0) != f.sha256 {
            return Err(changed("its content is not the indexed one".into()));
        }
    }
    if let Some(missing) = wanted.keys().next() {
        return Err(refused(format!(
            "the base artifact lacks {} shared files, {missing:?} among them",
            wanted.len()
        )));
    }
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(to_pipe)?;
    Ok(index.shared.len() as u64)
}

fn is_broken_pipe(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Directory mtimes as a full unpack leaves them: set last, since adding
/// entries to a directory changes its mtime.
fn set_dir_mtimes(index: &DeltaIndex, slot: &Path) -> Result<()> {
    for (dir, mtime) in &index.dirs {
        let full = slot.join(relative(dir)?);
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(*mtime);
        if let Ok(f) = File::open(&full) {
            let _ = f.set_modified(t);
        }
    }
    Ok(())
}

/// Reads the index, the delta's first entry, without going past it: the
/// rest of the stream is a tar of the delta's own entries.
fn read_index(stream: &mut impl Read, delta: &Path) -> Result<DeltaIndex> {
    let mut block = [0u8; 512];
    stream
        .read_exact(&mut block)
        .map_err(|e| refused(format!("cannot read its index: {e}")))?;
    let header = tar::Header::from_byte_slice(&block);
    let name = header.path_bytes();
    if name.as_ref() != INDEX_NAME.as_bytes() {
        return Err(refused(format!(
            "its first entry is {:?}, not {INDEX_NAME}",
            String::from_utf8_lossy(&name)
        )));
    }
    let size = header
        .entry_size()
        .ok()
        .filter(|s| *s <= MAX_INDEX_BYTES)
        .ok_or_else(|| refused("its index is too large".into()))?;
    let mut json = vec![0u8; size as usize];
    stream
        .read_exact(&mut json)
        .map_err(|e| Error::io(delta, e))?;
    let pad = (512 - size % 512) % 512;
    std::io::copy(&mut stream.take(pad), &mut std::io::sink()).map_err(|e| Error::io(delta, e))?;
    let index: DeltaIndex =
        serde_json::from_slice(&json).map_err(|e| refused(format!("its index: {e}")))?;
    if index.version != VERSION {
        return Err(refused(format!(
            "index version {} is not {VERSION}",
            index.version
        )));
    }
    Ok(index)
}

/// Checks every shared file of the base slot against the index and reuses
/// it in `slot`, on two threads (checking and reusing are all of a
/// delta's CPU; the profile is in docs/performance.md). A file that is not
/// the base build's any more fails the whole delta: the slot is then
/// unmarked garbage and the caller downloads the full artifact.
fn reuse_shared(
    shared: &[SharedFile],
    rels: &[PathBuf],
    base: (&Path, Option<&SlotRecord>, Mechanism),
    slot: &Path,
    progress: &Progress,
) -> Result<Applied> {
    let (base_slot, record, how) = base;
    let recorded: HashMap<&Path, &Entry> = record
        .map(|r| r.entries.iter().map(|e| (&*e.path, e)).collect())
        .unwrap_or_default();
    let written_at = record.map_or(i64::MIN, |r| r.header.written_at_ns);
    let half = shared.len() / 2;
    let work = |files: &[SharedFile], rels: &[PathBuf]| -> Result<Applied> {
        let mut buf = vec![0u8; 256 << 10];
        let mut applied = Applied::default();
        for (f, rel) in files.iter().zip(rels) {
            let from = base_slot.join(rel);
            let known = recorded.get(rel.as_path()).copied();
            let file = verify_one(f, &from, (known, written_at), &mut buf, &mut applied)?;
            let entry = reuse_one((&file, &from), (&slot.join(rel), rel), f, how, &mut applied)?;
            applied.entries.push(entry);
            progress.entries.fetch_add(1, Ordering::Relaxed);
        }
        Ok(applied)
    };
    let (first, second) = std::thread::scope(|s| {
        let t = s.spawn(|| work(&shared[..half], &rels[..half]));
        let second = work(&shared[half..], &rels[half..]);
        let first = t
            .join()
            .unwrap_or_else(|_| Err(refused("a delta thread panicked".into())));
        (first, second)
    });
    let (mut a, b) = (first?, second?);
    a.entries.extend(b.entries);
    Ok(Applied {
        unpacked: UnpackStats::default(),
        reflinked: a.reflinked + b.reflinked,
        copied: a.copied + b.copied,
        reused_bytes: a.reused_bytes + b.reused_bytes,
        trusted: a.trusted + b.trusted,
        hashed: a.hashed + b.hashed,
        entries: a.entries,
    })
}

/// Opens one shared file of the base slot and checks it against the index:
/// type, size, mode, mtime, and its content: proven by the base record's
/// stat when `known` (its record entry, with the record's write time)
/// proves it unchanged and records the index's digest, else by the sha256
/// of exactly the size fstat gave. Returns the open file, so the inode
/// reused is the one verified.
fn verify_one(
    f: &SharedFile,
    full: &Path,
    known: (Option<&Entry>, i64),
    buf: &mut [u8],
    applied: &mut Applied,
) -> Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let tampered = |why: String| Error::DeltaBaseChanged {
        path: full.to_path_buf(),
        why,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(full)
        .map_err(|e| tampered(format!("cannot open it: {e}")))?;
    let meta = file.metadata().map_err(|e| Error::io(full, e))?;
    if !meta.is_file() || meta.len() != f.size {
        return Err(tampered(format!(
            "{} bytes, the index says {}",
            meta.len(),
            f.size
        )));
    }
    if meta.mode() & 0o7777 != file_mode(f.mode) || meta.mtime() != f.mtime as i64 {
        return Err(tampered("its mode or mtime changed".into()));
    }
    let proven = known.0.is_some_and(|e| {
        e.known
            && e.digest == f.sha256.to_bytes()
            && classify(e, &Observed::of(&meta), known.1, false) == Verdict::Same
    });
    if proven {
        applied.trusted += 1;
        return Ok(file);
    }
    applied.hashed += 1;
    let mut hasher = Sha256::new();
    let mut reader = (&file).take(f.size);
    let mut read = 0;
    loop {
        let n = reader.read(buf).map_err(|e| Error::io(full, e))?;
        if n == 0 {
            break;
        }
        read += n as u64;
        hasher.update(&buf[..n]);
    }
    if read != f.size || Sha256Sum::from_bytes(hasher.finalize().into()) != f.sha256 {
        return Err(tampered("its content changed".into()));
    }
    Ok(file)
}

/// Makes the new slot's copy of one verified shared file (reflink where
/// `how` says the filesystem can, else an in-kernel copy) with the index's
/// mode and mtime, and returns its record entry. The source is stat'ed
/// again afterwards: a write to it during the copy fails the delta rather
/// than let the record vouch for bytes nobody checked.
fn reuse_one(
    (src, from): (&File, &Path),
    (to, rel): (&Path, &Path),
    f: &SharedFile,
    how: Mechanism,
    applied: &mut Applied,
) -> Result<Entry> {
    let before = src.metadata().map_err(|e| Error::io(from, e))?;
    let dst = create_with_parents(to, file_mode(f.mode))?;
    let used = super::reuse::clone_or_copy(src, &dst, f.size, how).map_err(|e| Error::io(to, e))?;
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(f.mtime);
    super::finish_file(&dst, to, file_mode(f.mode), mtime)?;
    let after = src.metadata().map_err(|e| Error::io(from, e))?;
    if Observed::of(&after) != Observed::of(&before) {
        return Err(Error::DeltaBaseChanged {
            path: from.to_path_buf(),
            why: "it was written while it was being reused".into(),
        });
    }
    match used {
        Mechanism::Reflink => applied.reflinked += 1,
        _ => applied.copied += 1,
    }
    applied.reused_bytes += f.size;
    let meta = dst.metadata().map_err(|e| Error::io(to, e))?;
    Ok(Entry::new(rel, &meta, f.sha256.to_bytes()))
}

/// Creates `to` (O_EXCL, no symlink followed) and any parent directory the
/// target tar only implies (the unpacker makes those 0755 too).
fn create_with_parents(to: &Path, mode: u32) -> Result<File> {
    match super::create_file(to, mode) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            if let Some(parent) = to.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(dir_mode(0o755))
                    .create(parent)
                    .map_err(|e| Error::io(parent, e))?;
            }
            super::create_file(to, mode)
        }
        other => other,
    }
}

/// A path the index names, relative and without `..`.
fn relative(path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok {
        // Only the normal components: `./app/x` (as `tar -C dir .` writes
        // it) is the slot's `app/x`, the path the unpack records and the
        // base record is looked up by.
        Ok(p.components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect())
    } else {
        Err(refused(format!("its index names the path {path:?}")))
    }
}

fn normal(path: &str) -> String {
    path.trim_end_matches('/')
        .trim_start_matches("./")
        .to_string()
}

fn short(d: &Sha256Sum) -> &str {
    &d.as_str()[..12]
}

fn refused(reason: String) -> Error {
    Error::DeltaRefused { reason }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn shared(path: &str, content: &[u8], file: &Path) -> SharedFile {
        let meta = std::fs::metadata(file).unwrap();
        SharedFile {
            path: path.into(),
            size: content.len() as u64,
            sha256: Sha256Sum::from_bytes(Sha256::digest(content).into()),
            mode: meta.mode() & 0o7777,
            mtime: meta.mtime() as u64,
        }
    }

    /// A verified shared file is reused in an inode of its own: a write to
    /// the new slot's file leaves the base slot's file as it was.
    #[test]
    fn a_reused_file_is_its_own_inode() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, slot) = (tmp.path().join("base"), tmp.path().join("slot"));
        std::fs::create_dir_all(base.join("d")).unwrap();
        std::fs::create_dir(&slot).unwrap();
        let from = base.join("d/a");
        std::fs::write(&from, b"base").unwrap();
        let f = shared("d/a", b"base", &from);
        let mut applied = Applied::default();
        let file = verify_one(&f, &from, (None, 0), &mut [0u8; 16], &mut applied).unwrap();
        assert_eq!((applied.hashed, applied.trusted), (1, 0));
        let to = slot.join("d/a");
        let e = reuse_one(
            (&file, &from),
            (&to, Path::new("d/a")),
            &f,
            Mechanism::Copy,
            &mut applied,
        )
        .unwrap();
        assert_eq!(applied.reused(), 1);
        assert_eq!(e.digest, f.sha256.to_bytes());
        let (a, b) = (
            std::fs::metadata(&from).unwrap(),
            std::fs::metadata(&to).unwrap(),
        );
        assert_ne!(a.ino(), b.ino());
        assert_eq!((b.mode() & 0o7777, b.mtime()), (f.mode, f.mtime as i64));
        std::fs::write(&to, b"HOTFIX").unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), b"base");
    }

    /// The base slot's record proves an unchanged file by stat (no hash);
    /// the same file written in place, size and mtime kept, is hashed and
    /// refused.
    #[test]
    fn a_record_spares_the_hash_and_an_edit_is_still_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("f");
        std::fs::write(&from, b"abc").unwrap();
        let f = shared("f", b"abc", &from);
        let meta = std::fs::metadata(&from).unwrap();
        let entry = Entry::new(Path::new("f"), &meta, f.sha256.to_bytes());
        let at = crate::integrity::record::stamp(tmp.path(), entry.stat.ctime_ns).unwrap();
        let mut applied = Applied::default();
        verify_one(&f, &from, (Some(&entry), at), &mut [0u8; 2], &mut applied).unwrap();
        assert_eq!((applied.trusted, applied.hashed), (1, 0));
        std::fs::write(&from, b"abd").unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(f.mtime);
        File::options()
            .write(true)
            .open(&from)
            .unwrap()
            .set_modified(t)
            .unwrap();
        let e = verify_one(&f, &from, (Some(&entry), at), &mut [0u8; 2], &mut applied).unwrap_err();
        assert!(e.to_string().contains("its content changed"), "{e}");
        assert_eq!(applied.hashed, 1);
    }

    /// A file whose content no longer matches the index is refused, even
    /// with its size, mode and mtime unchanged.
    #[test]
    fn a_changed_content_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("f");
        std::fs::write(&from, b"abc").unwrap();
        let f = shared("f", b"abd", &from);
        let mut applied = Applied::default();
        let e = verify_one(&f, &from, (None, 0), &mut [0u8; 2], &mut applied).unwrap_err();
        assert!(e.to_string().contains("its content changed"), "{e}");
    }
}
