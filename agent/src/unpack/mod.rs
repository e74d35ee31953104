//! Streaming, defensive unpack of a build archive (tar, tar.gz, tar.zst)
//! into an empty slot directory.
//!
//! The parsing thread reads tar headers with the `tar` crate, validates each
//! path in memory against what this unpack has created so far (directories,
//! files, symlinks), creates directories and symlinks itself and hands file
//! contents to writer threads through a bounded channel. There is no
//! per-entry `readlink`/`stat`: the slot starts empty, so the in-memory map is
//! the truth, and files are opened `O_CREAT|O_EXCL|O_NOFOLLOW`, so a surprise
//! on disk fails loudly instead of being followed.
//!
//! Refused (the whole archive, with [`Error::UnsafeArchive`]): absolute paths,
//! `..`, paths through a symlink or a file, symlinks whose target leaves the
//! slot or is absolute, hard links to anything but a regular file this archive
//! already wrote, devices, fifos, sparse files, duplicate non-directory entries.
//! Setuid/setgid/sticky and group/other write bits are dropped.
//!
//! Crash guarantees: none needed. A crash (or an error) leaves a partly
//! written slot; the caller never wrote its ready-marker, so it is garbage
//! and is cleared before the next use. Nothing is fsynced here; the caller
//! runs one `syncfs` over the slot after a successful unpack.

pub mod delta;
pub mod reuse;
mod writeback;

use std::collections::{HashMap, HashSet};
use std::fs::{File, FileTimes, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use tar::EntryType;
use tracing::{debug, instrument};

pub use crate::config::UnpackLimits;
use crate::error::{Error, Result};
use crate::integrity::Entry;
pub use crate::manifest::Format;
use crate::progress::Progress;

/// What one unpack wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub bytes_written: u64,
}

/// Files at most this big are read into memory and written by a writer
/// thread; bigger ones are streamed by the parsing thread itself so memory
/// stays bounded whatever the build holds.
const SMALL_FILE_MAX: u64 = 1 << 20;
/// Bytes of small-file contents in flight between parser and writers. With
/// the zstd window below and the download buffers this keeps the agent
/// under its 64 MiB RSS target during a deploy. 8 MiB (was 24): with 24 the
/// peak grew with the build (37 MiB on the 40 MB build, 62 MiB on the
/// 400 MB one) whenever the writers fell behind; 8 MiB still queues about
/// 1,400 typical source files.
const IN_FLIGHT_BUDGET: u64 = 8 << 20;
/// Largest zstd window accepted (16 MiB): enough for every level up to 19
/// without `--long`; a bigger window is refused as a corrupt archive.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;
/// Headers, padding and extension records allowed on top of `max_bytes` of
/// contents before the decompressed stream counts as a bomb.
const PER_ENTRY_OVERHEAD: u64 = 3 * 512;

/// The tar stream inside `reader`, an archive in `format`. Every reader of
/// an archive goes through here, so all get the same limits: a zstd
/// window over 16 MiB is refused as a corrupt archive. `context` names the
/// file or slot in errors.
pub(crate) fn decoded<'a, R: Read + 'a>(
    reader: R,
    format: Format,
    context: &Path,
) -> Result<Box<dyn Read + 'a>> {
    Ok(match format {
        Format::Tar => Box::new(reader),
        Format::TarGz => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Format::TarZst => {
            let mut decoder =
                zstd::stream::read::Decoder::new(reader).map_err(|e| Error::io(context, e))?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| Error::io(context, e))?;
            Box::new(decoder)
        }
    })
}

/// Unpacks `reader` (an archive in `format`) into `slot_dir`, which must be
/// an empty directory the caller owns. Blocking: call it from a dedicated
/// thread or `spawn_blocking`.
///
/// Returns once every entry is written and every directory has its mtime.
/// Any refused or corrupt entry fails the whole unpack; the slot is then
/// garbage. Reads stop at the tar end-of-archive marker; the caller drains
/// the rest of `reader` if it needs every byte (e.g. for hashing).
#[instrument(skip_all, fields(slot = %slot_dir.display(), ?format))]
pub fn unpack<R: Read>(
    reader: R,
    format: Format,
    slot_dir: &Path,
    limits: &UnpackLimits,
    progress: &Progress,
) -> Result<UnpackStats> {
    unpack_inner(reader, format, slot_dir, limits, progress, false).map(|(stats, _)| stats)
}

/// [`unpack`], and the record entry of everything it wrote: each file's
/// stat taken with `fstat` on the descriptor it wrote with (after its mode
/// and mtime). File digests are left to be filled in after the deploy
/// (`integrity::slot::complete`): hashing here cost the unpack 48% on the
/// DEMO build (benches/hot_paths.rs), a full deploy more than 3%.
pub fn unpack_recorded<R: Read>(
    reader: R,
    format: Format,
    slot_dir: &Path,
    limits: &UnpackLimits,
    progress: &Progress,
) -> Result<(UnpackStats, Vec<Entry>)> {
    unpack_inner(reader, format, slot_dir, limits, progress, true)
}

fn unpack_inner<R: Read>(
    reader: R,
    format: Format,
    slot_dir: &Path,
    limits: &UnpackLimits,
    progress: &Progress,
    record: bool,
) -> Result<(UnpackStats, Vec<Entry>)> {
    // The in-memory view of the slot is only the truth if the slot starts empty.
    let mut existing = std::fs::read_dir(slot_dir).map_err(|e| Error::io(slot_dir, e))?;
    if existing.next().is_some() {
        return Err(Error::io(
            slot_dir,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the slot is not empty; clear it before unpacking a build into it",
            ),
        ));
    }
    let guard = Arc::new(StreamGuard::default());
    let stream_limit = limits
        .max_bytes
        .saturating_add(
            limits
                .max_entries
                .saturating_add(4)
                .saturating_mul(PER_ENTRY_OVERHEAD),
        )
        .saturating_add(1 << 20);
    let decoded = decoded(reader, format, slot_dir)?;
    let mut unpacker = Unpacker::new(slot_dir, limits, progress, record);
    let result = unpacker.run(
        LimitedReader {
            inner: decoded,
            left: stream_limit,
            guard: Arc::clone(&guard),
        },
        &guard,
    );
    let result = match result {
        Err(Error::CorruptArchive { .. }) if guard.metadata_exceeded.load(Ordering::Relaxed) => {
            Err(Error::ArchiveTooLarge {
                slot: slot_dir.to_path_buf(),
                what: "metadata bytes (long names, PAX records) per entry",
                limit: METADATA_BUDGET,
            })
        }
        Err(Error::CorruptArchive { .. }) if guard.stream_exceeded.load(Ordering::Relaxed) => {
            Err(Error::ArchiveTooLarge {
                slot: slot_dir.to_path_buf(),
                what: "decompressed stream bytes",
                limit: stream_limit,
            })
        }
        other => other,
    };
    // Writers are joined on every path so no thread outlives the call.
    let finished = unpacker.finish(result.is_ok());
    let stats = result.and(finished)?;
    debug!(
        entries = stats.entries,
        bytes = stats.bytes_written,
        "unpacked"
    );
    let entries = match record {
        true => unpacker.recorded()?,
        false => Vec::new(),
    };
    Ok((stats, entries))
}

/// What this unpack created at a slot-relative path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Dir,
    File,
    Symlink,
}

/// Every path this unpack created, and what it is. Directories and symlinks
/// (a few per cent of a build) are kept by path, because later entries are
/// checked against them. Files are kept as a keyed 64-bit hash of their
/// path: a file only ever answers "is this path taken" or "is this a file",
/// and 8 bytes instead of a path keep the unpack's memory flat however many
/// files a build has (about 4 MB less for 40,000 files). A collision (odds
/// about 1e-10 for 40,000 files; the key is random per process, so an
/// archive cannot be built to collide) can only make the unpack refuse an
/// entry or fail a hard link, never accept something it should refuse.
#[derive(Debug, Default)]
struct Nodes {
    by_path: HashMap<PathBuf, Node>,
    files: HashSet<u64>,
    key: std::collections::hash_map::RandomState,
}

impl Nodes {
    fn file_hash(&self, path: &Path) -> u64 {
        use std::hash::BuildHasher;
        self.key.hash_one(path)
    }

    fn get(&self, path: &Path) -> Option<Node> {
        match self.by_path.get(path) {
            Some(n) => Some(*n),
            None => self
                .files
                .contains(&self.file_hash(path))
                .then_some(Node::File),
        }
    }

    fn insert(&mut self, path: PathBuf, node: Node) {
        if node == Node::File {
            let h = self.file_hash(&path);
            self.files.insert(h);
        } else {
            self.by_path.insert(path, node);
        }
    }
}

/// One file for a writer thread.
struct FileJob {
    path: PathBuf,
    mode: u32,
    mtime: SystemTime,
    data: Vec<u8>,
}

/// Work shared between the parser and the writer threads.
struct WriteBudget {
    budget: Mutex<u64>,
    budget_freed: Condvar,
    failed: Mutex<Option<Error>>,
    failed_flag: AtomicBool,
    bytes_written: AtomicU64,
}

impl WriteBudget {
    fn fail(&self, err: Error) {
        if let Ok(mut slot) = self.failed.lock() {
            slot.get_or_insert(err);
        }
        self.failed_flag.store(true, Ordering::Release);
        self.budget_freed.notify_all();
    }

    /// Blocks until `n` bytes fit in the in-flight budget (or a writer failed).
    fn acquire(&self, n: u64) {
        let Ok(mut used) = self.budget.lock() else {
            return;
        };
        while *used > 0 && *used + n > IN_FLIGHT_BUDGET && !self.failed_flag.load(Ordering::Acquire)
        {
            used = match self.budget_freed.wait(used) {
                Ok(g) => g,
                Err(_) => return,
            };
        }
        *used += n;
    }

    fn release(&self, n: u64) {
        if let Ok(mut used) = self.budget.lock() {
            *used = used.saturating_sub(n);
        }
        self.budget_freed.notify_all();
    }

    fn take_error(&self) -> Option<Error> {
        self.failed.lock().ok().and_then(|mut e| e.take())
    }
}

struct Unpacker<'a> {
    slot: &'a Path,
    limits: &'a UnpackLimits,
    progress: &'a Progress,
    nodes: Nodes,
    /// Directory (slot-relative) -> (mode, mtime), applied at the end so
    /// writing into a read-only directory still works and the mtimes are not
    /// bumped by later entries.
    dir_meta: Vec<(PathBuf, u32, SystemTime)>,
    /// Hard links (link, target), made after the writers finished the targets.
    hardlinks: Vec<(PathBuf, PathBuf)>,
    stats: UnpackStats,
    content_bytes: u64,
    sender: Option<SyncSender<FileJob>>,
    writers: Vec<std::thread::JoinHandle<Vec<Entry>>>,
    shared: Arc<WriteBudget>,
    writeback: writeback::Writeback,
    /// Record entries of the files written (`None`: not recording).
    record: Option<Vec<Entry>>,
}

impl<'a> Unpacker<'a> {
    fn new(slot: &'a Path, limits: &'a UnpackLimits, progress: &'a Progress, record: bool) -> Self {
        let shared = Arc::new(WriteBudget {
            budget: Mutex::new(0),
            budget_freed: Condvar::new(),
            failed: Mutex::new(None),
            failed_flag: AtomicBool::new(false),
            bytes_written: AtomicU64::new(0),
        });
        let (sender, receiver) = sync_channel::<FileJob>(1024);
        let receiver = Arc::new(Mutex::new(receiver));
        let mut writers = Vec::new();
        for i in 0..limits.writer_threads.clamp(1, 16) {
            let receiver = Arc::clone(&receiver);
            let thread_shared = Arc::clone(&shared);
            let slot_for_thread = slot.to_path_buf();
            let spawned = std::thread::Builder::new()
                .name(format!("unpack-writer-{i}"))
                .spawn(move || writer_loop(&slot_for_thread, &receiver, &thread_shared, record));
            match spawned {
                Ok(handle) => writers.push(handle),
                Err(e) => shared.fail(Error::io(slot, e)),
            }
        }
        let mut nodes = Nodes::default();
        nodes.insert(PathBuf::new(), Node::Dir);
        Unpacker {
            slot,
            limits,
            progress,
            nodes,
            writeback: writeback::Writeback::start(slot, limits.writeback_every),
            dir_meta: Vec::new(),
            hardlinks: Vec::new(),
            stats: UnpackStats::default(),
            content_bytes: 0,
            sender: Some(sender),
            writers,
            shared,
            record: record.then(Vec::new),
        }
    }

    fn run(&mut self, decoded: impl Read, guard: &StreamGuard) -> Result<()> {
        let corrupt = |slot: &Path, e: io::Error| Error::CorruptArchive {
            slot: slot.to_path_buf(),
            source: e,
        };
        let mut archive = tar::Archive::new(decoded);
        let mut entries = archive.entries().map_err(|e| corrupt(self.slot, e))?;
        loop {
            // The tar crate reads long names and PAX records into memory
            // while finding the next entry: bound what it may read there.
            guard
                .metadata_left
                .store(METADATA_BUDGET, Ordering::Relaxed);
            let next = entries.next();
            guard.metadata_left.store(u64::MAX, Ordering::Relaxed);
            let Some(entry) = next else {
                break;
            };
            let mut entry = entry.map_err(|e| corrupt(self.slot, e))?;
            if self.shared.failed_flag.load(Ordering::Acquire) {
                break;
            }
            self.entry(&mut entry)?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            // Global PAX records (comments, charset) do not change what we write.
            return Ok(());
        }
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(Error::ArchiveTooLarge {
                slot: self.slot.to_path_buf(),
                what: "entry count",
                limit: self.limits.max_entries,
            });
        }
        let raw_path = entry.path_bytes().into_owned();
        let display = String::from_utf8_lossy(&raw_path).into_owned();
        let rel = self.validate_path(&raw_path, &display)?;
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644);
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(header.mtime().unwrap_or(0));

        if rel.as_os_str().is_empty() {
            // "./" itself: the slot root exists already; nothing else may be the root.
            if kind.is_dir() {
                return Ok(());
            }
            return Err(self.refuse(&display, "names the slot root"));
        }
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        self.ensure_dirs(&parent, &display)?;
        match self.nodes.get(&rel) {
            None => {}
            Some(Node::Dir) if kind.is_dir() => {
                self.dir_meta.push((rel, dir_mode(mode), mtime));
                return Ok(());
            }
            Some(_) => return Err(self.refuse(&display, "appears twice in the archive")),
        }

        match kind {
            EntryType::Directory => {
                self.mkdir(&rel)?;
                self.dir_meta.push((rel, dir_mode(mode), mtime));
            }
            EntryType::Regular | EntryType::Continuous => {
                self.file(entry, rel, file_mode(mode), mtime)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| self.refuse(&display, "is a symlink without a target"))?;
                self.symlink(rel, &parent, &target, &display)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| self.refuse(&display, "is a hard link without a target"))?;
                self.hardlink(rel, &target, &display)?;
            }
            other => {
                return Err(self.refuse(
                    &display,
                    &format!("has type {other:?}; only files, directories and links are allowed"),
                ))
            }
        }
        Ok(())
    }

    /// A symlink whose target stays inside the slot.
    fn symlink(&mut self, rel: PathBuf, parent: &Path, target: &[u8], display: &str) -> Result<()> {
        self.check_symlink_target(parent, target, display)?;
        let full = self.slot.join(&rel);
        std::os::unix::fs::symlink(bytes_path(target), &full).map_err(|e| Error::io(&full, e))?;
        self.nodes.insert(rel, Node::Symlink);
        self.stats.symlinks += 1;
        self.progress.entries.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A hard link, only to a regular file extracted earlier from this
    /// archive; made after the writers finished (`hardlinks`).
    fn hardlink(&mut self, rel: PathBuf, target: &[u8], display: &str) -> Result<()> {
        let target_display = String::from_utf8_lossy(target).into_owned();
        let target_rel = self
            .validate_path(target, display)
            .map_err(|_| self.refuse(display, "is a hard link leaving the slot"))?;
        if self.nodes.get(&target_rel) != Some(Node::File) {
            return Err(self.refuse(
                display,
                &format!(
                    "is a hard link to {target_display:?}, which is not a regular \
                     file extracted earlier from this archive"
                ),
            ));
        }
        // Recorded as a file: a later hard link to this link is fine, a
        // later entry through it is not.
        self.nodes.insert(rel.clone(), Node::File);
        self.hardlinks.push((rel, target_rel));
        Ok(())
    }

    /// Accepts only `Normal` components (and `.`), in memory.
    fn validate_path(&self, raw: &[u8], display: &str) -> Result<PathBuf> {
        let mut rel = PathBuf::new();
        for component in bytes_path(raw).components() {
            match component {
                Component::Normal(c) => rel.push(c),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    return Err(self.refuse(display, "is an absolute path"))
                }
                Component::ParentDir => return Err(self.refuse(display, "contains `..`")),
            }
        }
        Ok(rel)
    }

    /// Creates each missing ancestor once; refuses a path through a symlink or file.
    fn ensure_dirs(&mut self, dir: &Path, display: &str) -> Result<()> {
        match self.nodes.get(dir) {
            Some(Node::Dir) => return Ok(()),
            Some(Node::Symlink) => {
                return Err(self.refuse(display, "goes through a symlink in the archive"))
            }
            Some(Node::File) => return Err(self.refuse(display, "goes through a file")),
            None => {}
        }
        if let Some(parent) = dir.parent() {
            self.ensure_dirs(parent, display)?;
        }
        self.mkdir(dir)
    }

    fn mkdir(&mut self, rel: &Path) -> Result<()> {
        let full = self.slot.join(rel);
        // 0o700 while unpacking: the final mode is applied at the end, and
        // until then nobody else should see a half-filled tree.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&full)
            .map_err(|e| Error::io(&full, e))?;
        self.nodes.insert(rel.to_path_buf(), Node::Dir);
        self.stats.dirs += 1;
        self.progress.entries.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Only relative targets made of leading `..` then normal components, that
    /// stay inside the slot when resolved from the link's directory. Because
    /// the link's directory is a real directory (entries never pass through
    /// symlinks) and no `..` follows a normal component, following any chain
    /// of such links never leaves the slot, whatever is created later.
    fn check_symlink_target(&self, link_dir: &Path, target: &[u8], display: &str) -> Result<()> {
        let mut depth = link_dir.components().count();
        let mut seen_normal = false;
        for component in bytes_path(target).components() {
            match component {
                Component::Normal(_) => seen_normal = true,
                Component::CurDir => {}
                Component::ParentDir if !seen_normal && depth > 0 => depth -= 1,
                Component::ParentDir => {
                    return Err(self.refuse(
                        display,
                        "is a symlink whose target leaves the slot or uses `..` after a name",
                    ))
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(self.refuse(display, "is a symlink with an absolute target"))
                }
            }
        }
        if target.is_empty() {
            return Err(self.refuse(display, "is a symlink with an empty target"));
        }
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: PathBuf,
        mode: u32,
        mtime: SystemTime,
    ) -> Result<()> {
        let size = entry.size();
        self.content_bytes = self.content_bytes.saturating_add(size);
        if self.content_bytes > self.limits.max_bytes {
            return Err(Error::ArchiveTooLarge {
                slot: self.slot.to_path_buf(),
                what: "unpacked bytes",
                limit: self.limits.max_bytes,
            });
        }
        let corrupt = |slot: &Path, e: io::Error| Error::CorruptArchive {
            slot: slot.to_path_buf(),
            source: e,
        };
        self.nodes.insert(rel.clone(), Node::File);
        self.stats.files += 1;
        self.writeback.progress(self.content_bytes);
        if size <= SMALL_FILE_MAX {
            self.shared.acquire(size);
            // Capacity from the header is bounded by SMALL_FILE_MAX.
            let mut data = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut data)
                .map_err(|e| corrupt(self.slot, e))?;
            let job = FileJob {
                path: rel,
                mode,
                mtime,
                data,
            };
            // Progress counts files when they are handed to a writer; the
            // writers are never more than IN_FLIGHT_BUDGET behind.
            self.progress.entries.fetch_add(1, Ordering::Relaxed);
            self.progress
                .bytes_written
                .fetch_add(size, Ordering::Relaxed);
            let Some(sender) = &self.sender else {
                return Ok(());
            };
            if sender.send(job).is_err() {
                // Every writer is gone; their error is reported by `finish`.
                self.shared.failed_flag.store(true, Ordering::Release);
            }
            return Ok(());
        }
        // Big file: stream it here so at most one buffer of it is in memory.
        let full = self.slot.join(&rel);
        let mut file = create_file(&full, mode)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf).map_err(|e| corrupt(self.slot, e))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n]).map_err(|e| Error::io(&full, e))?;
            self.shared
                .bytes_written
                .fetch_add(n as u64, Ordering::Relaxed);
            self.progress
                .bytes_written
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        finish_file(&file, &full, mode, mtime)?;
        if let Some(rec) = self.record.as_mut() {
            let meta = file.metadata().map_err(|e| Error::io(&full, e))?;
            rec.push(Entry::unhashed(&rel, &meta));
        }
        self.progress.entries.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn refuse(&self, entry: &str, reason: &str) -> Error {
        Error::UnsafeArchive {
            slot: self.slot.to_path_buf(),
            entry: entry.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Joins the writers, then (if everything so far succeeded) makes hard
    /// links and applies directory modes and mtimes, deepest first.
    fn finish(&mut self, ok: bool) -> Result<UnpackStats> {
        if !ok {
            // The slot is garbage already: writers skip what is still queued.
            self.shared.failed_flag.store(true, Ordering::Release);
        }
        self.sender = None;
        for writer in self.writers.drain(..) {
            match writer.join() {
                Ok(entries) => {
                    if let Some(rec) = self.record.as_mut() {
                        rec.extend(entries);
                    }
                }
                Err(_) => self.shared.fail(Error::io(
                    self.slot,
                    io::Error::other("an unpack writer thread panicked"),
                )),
            }
        }
        self.writeback.stop();
        if let Some(err) = self.shared.take_error() {
            return Err(err);
        }
        if !ok {
            return Ok(self.stats);
        }
        for (link, target) in &self.hardlinks {
            let (link_full, target_full) = (self.slot.join(link), self.slot.join(target));
            std::fs::hard_link(&target_full, &link_full).map_err(|e| Error::io(&link_full, e))?;
            self.stats.hardlinks += 1;
            self.progress.entries.fetch_add(1, Ordering::Relaxed);
        }
        let mut dirs: HashMap<&Path, (u32, SystemTime)> = self
            .nodes
            .by_path
            .iter()
            .filter(|(p, n)| **n == Node::Dir && !p.as_os_str().is_empty())
            .map(|(p, _)| (p.as_path(), (0o755, SystemTime::now())))
            .collect();
        // Implicit directories get 0755 and "now"; explicit entries override.
        for (path, mode, mtime) in &self.dir_meta {
            dirs.insert(path.as_path(), (*mode, *mtime));
        }
        let mut ordered: Vec<_> = dirs.into_iter().collect();
        ordered.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, (mode, mtime)) in ordered {
            let full = self.slot.join(rel);
            let dir = File::open(&full).map_err(|e| Error::io(&full, e))?;
            dir.set_permissions(Permissions::from_mode(mode))
                .map_err(|e| Error::io(&full, e))?;
            dir.set_times(FileTimes::new().set_modified(mtime))
                .map_err(|e| Error::io(&full, e))?;
        }
        self.stats.bytes_written = self.shared.bytes_written.load(Ordering::Relaxed);
        Ok(self.stats)
    }
}

impl Unpacker<'_> {
    /// The record entries of everything written, after [`Unpacker::finish`]:
    /// the files from the writers, then hard links, symlinks and
    /// directories by `lstat` (a few per cent of a build). A hard link's
    /// target is stat'ed again: linking changed its ctime.
    fn recorded(&mut self) -> Result<Vec<Entry>> {
        let mut entries = self.record.take().unwrap_or_default();
        let stat = |rel: &Path| {
            let full = self.slot.join(rel);
            std::fs::symlink_metadata(&full).map_err(|e| Error::io(&full, e))
        };
        if !self.hardlinks.is_empty() {
            let mut at: HashMap<PathBuf, usize> = entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.path.to_path_buf(), i))
                .collect();
            for (link, target) in &self.hardlinks {
                let Some(&t) = at.get(target) else { continue };
                let meta = stat(target)?;
                entries[t] = Entry::unhashed(target, &meta);
                at.insert(link.clone(), entries.len());
                entries.push(Entry::unhashed(link, &meta));
            }
            // Every name of one inode carries its last ctime.
            for (link, target) in &self.hardlinks {
                if let (Some(&l), Some(&t)) = (at.get(link), at.get(target)) {
                    entries[l].stat = entries[t].stat;
                }
            }
        }
        for (rel, node) in &self.nodes.by_path {
            let full = self.slot.join(rel);
            match node {
                _ if rel.as_os_str().is_empty() => {}
                Node::Dir => entries.push(Entry::new(rel, &stat(rel)?, [0; 32])),
                Node::Symlink => {
                    let target = std::fs::read_link(&full).map_err(|e| Error::io(&full, e))?;
                    entries.push(Entry::symlink(rel, &stat(rel)?, &target));
                }
                Node::File => {}
            }
        }
        Ok(entries)
    }
}

impl Drop for Unpacker<'_> {
    fn drop(&mut self) {
        // Only reached with writers still running if `finish` was skipped
        // (a panic); closing the channel lets them exit.
        self.sender = None;
    }
}

/// Writes the files the parser hands over; when `record` is set, returns
/// the record entry of each (its stat from `fstat` after the mode and
/// mtime are set: the last change the unpack makes to it).
fn writer_loop(
    slot: &Path,
    receiver: &Mutex<Receiver<FileJob>>,
    shared: &WriteBudget,
    record: bool,
) -> Vec<Entry> {
    let mut entries = Vec::new();
    loop {
        let job = {
            let Ok(guard) = receiver.lock() else {
                return entries;
            };
            match guard.recv() {
                Ok(job) => job,
                Err(_) => return entries,
            }
        };
        let size = job.data.len() as u64;
        if !shared.failed_flag.load(Ordering::Acquire) {
            let full = slot.join(&job.path);
            let written = create_file(&full, job.mode).and_then(|mut file| {
                file.write_all(&job.data).map_err(|e| Error::io(&full, e))?;
                finish_file(&file, &full, job.mode, job.mtime)?;
                if record {
                    let meta = file.metadata().map_err(|e| Error::io(&full, e))?;
                    entries.push(Entry::unhashed(&job.path, &meta));
                }
                Ok(())
            });
            match written {
                Ok(()) => {
                    shared.bytes_written.fetch_add(size, Ordering::Relaxed);
                }
                Err(e) => shared.fail(e),
            }
        }
        shared.release(size);
    }
}

/// Creates a file with `mode` (O_CREAT|O_EXCL, never following a link).
pub(crate) fn create_file(full: &Path, mode: u32) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(full)
        .map_err(|e| Error::io(full, e))
}

/// Mode and mtime on the open fd (fchmod, futimens): no path lookups. The
/// fchmod is skipped when the umask cannot have changed the creation mode,
/// saving one syscall per file.
pub(crate) fn finish_file(file: &File, full: &Path, mode: u32, mtime: SystemTime) -> Result<()> {
    if mode & process_umask() != 0 {
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(|e| Error::io(full, e))?;
    }
    file.set_times(FileTimes::new().set_modified(mtime))
        .map_err(|e| Error::io(full, e))
}

/// The process umask, read once from /proc (reading it with umask(2) would
/// briefly change it for every thread). Unknown means "assume it masks
/// everything", i.e. always fchmod.
fn process_umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o777)
    })
}

/// Keeps the permission bits, drops setuid/setgid/sticky and group/other
/// write (a web build never needs them), and keeps the owner able to read
/// and write so the agent can clear the slot later.
pub fn file_mode(mode: u32) -> u32 {
    (mode & 0o755) | 0o600
}

/// Like [`file_mode`] for directories; the owner can always enter and write.
pub fn dir_mode(mode: u32) -> u32 {
    (mode & 0o755) | 0o700
}

pub(crate) fn bytes_path(bytes: &[u8]) -> &Path {
    use std::os::unix::ffi::OsStrExt;
    Path::new(std::ffi::OsStr::from_bytes(bytes))
}

/// Bytes the tar crate may read while looking for the next entry (headers,
/// GNU long names, PAX records, skipped data of entries that should have
/// none). Real archives use a few KiB; this keeps a metadata bomb from
/// growing memory.
const METADATA_BUDGET: u64 = 1 << 20;

/// Which bound a [`LimitedReader`] hit; shared with the parser, which sets
/// the metadata budget around each `Entries::next`.
#[derive(Debug)]
struct StreamGuard {
    metadata_left: AtomicU64,
    metadata_exceeded: AtomicBool,
    stream_exceeded: AtomicBool,
}

impl Default for StreamGuard {
    fn default() -> Self {
        StreamGuard {
            metadata_left: AtomicU64::new(u64::MAX),
            metadata_exceeded: AtomicBool::new(false),
            stream_exceeded: AtomicBool::new(false),
        }
    }
}

/// Counts decompressed bytes and fails once a bomb exceeds what the limits allow.
struct LimitedReader<R> {
    inner: R,
    left: u64,
    guard: Arc<StreamGuard>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)? as u64;
        if n > self.left {
            self.guard.stream_exceeded.store(true, Ordering::Relaxed);
            return Err(io::Error::other(
                "decompressed stream exceeds the unpack limits",
            ));
        }
        self.left -= n;
        // Only the parser thread reads, so load-then-store does not race.
        let meta = self.guard.metadata_left.load(Ordering::Relaxed);
        if meta != u64::MAX {
            if n > meta {
                self.guard.metadata_exceeded.store(true, Ordering::Relaxed);
                return Err(io::Error::other(
                    "archive metadata exceeds the unpack limits",
                ));
            }
            self.guard.metadata_left.store(meta - n, Ordering::Relaxed);
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_normalised() {
        assert_eq!(file_mode(0o4755), 0o755);
        assert_eq!(file_mode(0o666), 0o644);
        assert_eq!(file_mode(0o400), 0o600);
        assert_eq!(dir_mode(0o1777), 0o755);
        assert_eq!(dir_mode(0o500), 0o700);
    }
}
