//! A deploy root: two slots, the `current` symlink, the state file, the
//! ready-markers and the lock.
//!
//! ```text
//! <root>/current -> slot-a       relative symlink, what the web server serves
//! <root>/slot-a/  <root>/slot-b/ the two build directories
//! <root>/.deploy/state.json      which slot is hot, builds, flip history
//! <root>/.deploy/slot-?.ready    ready-markers (outside the served tree)
//! <root>/.deploy/lock            flock(2), holds the owner's pid
//! <root>/.deploy/trash/          old slot contents, deleted off the critical path
//! ```
//!
//! Crash guarantees: `current` only ever changes by rename(2) of a complete
//! symlink over it, and only towards a slot with a valid marker; a marker is
//! removed durably before its slot is touched and written only after the
//! slot is durable. [`DeployRoot::open`] repairs everything else (temp
//! names, a stale state file, a missing `current`, trash) so that a process
//! killed at any instruction leaves a root that serves a complete build.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{renameat2, Flock, FlockArg, RenameFlags};
use serde::Serialize;
use tracing::{info, warn};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{self, is_tmp_name, unique_tmp_name};
use crate::slot::{now_secs, validate_build_id, BuildInfo, Marker, Slot, MARKER_VERSION};
use crate::state::{FlipKind, FlipRecord, State};

const CURRENT: &str = "current";
const META: &str = ".deploy";
const STATE: &str = "state.json";
const LOCK: &str = "lock";
const TRASH: &str = "trash";
/// Old cold-slot contents a caller is still reading (a delta's base).
const KEPT: &str = "kept";

/// An open, locked deploy root. Dropping it releases the lock.
#[derive(Debug)]
pub struct DeployRoot {
    root: PathBuf,
    state: State,
    // Held for its flock(2); closing the descriptor releases the lock, so a
    // SIGKILLed owner never leaves the root locked.
    _lock: Flock<File>,
}

/// What [`DeployRoot::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    /// Leftover temporary names removed.
    pub removed_temp: Vec<PathBuf>,
    /// Slots whose marker was missing or invalid and that count as empty.
    pub invalid_slots: Vec<Slot>,
    /// The state file disagreed with `current` (or was unreadable) and was
    /// rebuilt from it.
    pub state_repaired: bool,
    /// `current` was missing (or pointed at an unmarked slot) and was
    /// pointed at this slot.
    pub current_restored: Option<Slot>,
    /// An existing deploy was adopted: a description of what.
    pub adopted: Option<String>,
    /// Entries waiting in the trash; delete them with [`purge_trash`].
    pub trash_entries: usize,
}

/// The result of a flip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlipReport {
    pub from: Option<Slot>,
    pub to: Slot,
    pub build_id: String,
    /// Time from creating the temp link to the directory fsync.
    pub took: Duration,
}

impl DeployRoot {
    /// Opens (creating it if needed) and locks the deploy root at `root`,
    /// adopts an existing deploy found there, and recovers from any crash.
    /// Idempotent: opening a healthy root changes nothing on disk.
    pub fn open(root: impl Into<PathBuf>) -> Result<(DeployRoot, RecoveryReport)> {
        let root = root.into();
        fs::create_dir_all(&root).at(&root)?;
        let root = fs::canonicalize(&root).at(&root)?;
        let meta = root.join(META);
        fs::create_dir_all(meta.join(TRASH)).at(&meta)?;
        fs::create_dir_all(meta.join(KEPT)).at(&meta)?;
        let lock = lock(&meta.join(LOCK))?;
        let mut report = RecoveryReport::default();
        let mut dr = DeployRoot {
            root,
            state: State::default(),
            _lock: lock,
        };
        dr.remove_temp_names(&mut report)?;
        // Whoever read a kept slot died with this process: it is garbage.
        for entry in fs::read_dir(meta.join(KEPT)).at(&meta)?.flatten() {
            dr.discard_kept(&entry.path())?;
        }
        let loaded = dr.load_state();
        dr.adopt_if_needed(&mut report)?;
        dr.recover(loaded, &mut report)?;
        report.trash_entries = fs::read_dir(dr.trash_dir()).map(|d| d.count()).unwrap_or(0);
        Ok((dr, report))
    }

    /// The root directory (canonical).
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The `current` symlink's path.
    pub fn current_path(&self) -> PathBuf {
        self.root.join(CURRENT)
    }

    /// A slot's directory.
    pub fn slot_path(&self, slot: Slot) -> PathBuf {
        Self::slot_path_at(&self.root, slot)
    }

    /// [`DeployRoot::slot_path`] of the deploy root at `root`, for callers
    /// that must not wait for the root's owner to know a path.
    pub fn slot_path_at(root: &Path, slot: Slot) -> PathBuf {
        root.join(slot.dir_name())
    }

    /// The directory for the agent's own files (state, cache) beside ours.
    pub fn meta_dir(&self) -> PathBuf {
        self.root.join(META)
    }

    /// Where claimed slot contents wait to be deleted.
    pub fn trash_dir(&self) -> PathBuf {
        self.meta_dir().join(TRASH)
    }

    /// Where the caller keeps its record of what `slot` holds (one file
    /// per slot beside the marker; the agent writes it before marking the
    /// slot ready). A claim removes it after the marker, so a record never
    /// outlives the build it describes.
    pub fn record_path(&self, slot: Slot) -> PathBuf {
        Self::record_path_at(&self.root, slot)
    }

    /// [`DeployRoot::record_path`] of the deploy root at `root`.
    pub fn record_path_at(root: &Path, slot: Slot) -> PathBuf {
        root.join(META).join(slot.record_name())
    }

    fn marker_path(&self, slot: Slot) -> PathBuf {
        self.meta_dir().join(slot.marker_name())
    }

    fn state_path(&self) -> PathBuf {
        self.meta_dir().join(STATE)
    }

    /// The state as last persisted (in memory copy).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The slot that serves, if any build is live.
    pub fn hot(&self) -> Option<Slot> {
        self.state.hot
    }

    /// The slot that receives the next build.
    pub fn cold(&self) -> Slot {
        self.state.hot.map(Slot::other).unwrap_or(Slot::A)
    }

    /// The valid marker of `slot`, if it holds a complete build.
    pub fn marker(&self, slot: Slot) -> Option<&Marker> {
        self.state.marker(slot)
    }

    /// Reads which slot `current` points at right now, from disk.
    pub fn served(&self) -> Result<Option<Slot>> {
        let link = self.current_path();
        Ok(fsutil::read_link_opt(&link)?.and_then(|t| self.slot_of_target(&t)))
    }

    /// Claims the cold slot for a new build: invalidates its marker durably,
    /// then empties it by renaming its contents into the trash (deleting
    /// tens of thousands of files takes seconds; a rename takes
    /// microseconds). Returns the empty slot's path.
    pub fn claim_cold(&mut self) -> Result<(Slot, PathBuf)> {
        let (slot, dir, _) = self.claim(false)?;
        Ok((slot, dir))
    }

    /// [`DeployRoot::claim_cold`], but the old contents go to
    /// `.deploy/kept/` instead of the trash, so the caller can still read
    /// them (the base of a delta, when the cold slot held it) while the
    /// trash is emptied. Returns their path, if there were any; the caller
    /// hands it back with [`DeployRoot::discard_kept`], and after a crash
    /// [`DeployRoot::open`] moves it into the trash.
    pub fn claim_cold_keeping(&mut self) -> Result<(Slot, PathBuf, Option<PathBuf>)> {
        self.claim(true)
    }

    /// Moves a kept slot's old contents into the trash (a rename).
    pub fn discard_kept(&self, kept: &Path) -> Result<()> {
        let to = self.trash_dir().join(unique_tmp_name("kept"));
        fs::rename(kept, &to).at(kept)
    }

    fn claim(&mut self, keep: bool) -> Result<(Slot, PathBuf, Option<PathBuf>)> {
        let slot = self.cold();
        if self.served()? == Some(slot) {
            return Err(Error::ClaimHot {
                root: self.root.clone(),
                slot,
            });
        }
        // Invalidate first: from here on a crash leaves an unmarked slot,
        // which recovery treats as empty.
        Marker::invalidate(&self.marker_path(slot))?;
        if self.state.marker(slot).is_some() {
            self.state.set_marker(slot, None);
            self.persist()?;
        }
        // (An unmarked slot needs no state write: this keeps a claim
        // possible on a disk a failed unpack filled to the last block.)
        // The record of the build leaves with its marker: an unmarked slot
        // has no record, so a crash here leaves nothing that describes it.
        let record = self.record_path(slot);
        match fs::remove_file(&record) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).at(&record),
        }
        let dir = self.slot_path(slot);
        let non_empty = match fs::read_dir(&dir) {
            Ok(mut d) => d.next().is_some(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).at(&dir),
        };
        let mut aside = None;
        if non_empty {
            let to = if keep { KEPT } else { TRASH };
            let a = self
                .meta_dir()
                .join(to)
                .join(unique_tmp_name(slot.dir_name()));
            fs::rename(&dir, &a).at(&dir)?;
            aside = Some(a);
        }
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            // The old contents filled the disk: delete them now rather
            // than off the critical path, and try again.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && aside.is_some() => {
                if let Some(a) = aside.take() {
                    fsutil::remove_tree(&a)?;
                }
                fs::create_dir(&dir).at(&dir)?;
            }
            Err(e) => return Err(e).at(&dir),
        }
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).at(&dir)?;
        fsutil::fsync_dir(&self.root)?;
        info!(slot = %slot, root = %self.root.display(), kept = aside.is_some() && keep, "claimed cold slot");
        Ok((slot, dir, aside.filter(|_| keep)))
    }

    /// Marks `slot` ready: makes its contents durable with one syncfs(2),
    /// then writes its marker atomically. Call only after the contents are
    /// complete and verified.
    pub fn mark_ready(&mut self, slot: Slot, build: BuildInfo) -> Result<Marker> {
        if !validate_build_id(&build.build_id) {
            return Err(Error::BadBuildId {
                path: self.slot_path(slot),
                id: build.build_id,
            });
        }
        if self.served()? == Some(slot) {
            return Err(Error::ClaimHot {
                root: self.root.clone(),
                slot,
            });
        }
        let dir = self.slot_path(slot);
        fsutil::syncfs(&dir)?;
        let marker = Marker {
            version: MARKER_VERSION,
            slot,
            build,
            marked_at: now_secs(),
        };
        marker.write(&self.marker_path(slot))?;
        self.state.set_marker(slot, Some(marker.clone()));
        self.persist()?;
        info!(slot = %slot, build = %marker.build.build_id, entries = marker.build.entries, "slot marked ready");
        Ok(marker)
    }

    /// Flips `current` to `slot`, which must carry a valid marker on disk.
    pub fn flip_to(&mut self, slot: Slot) -> Result<FlipReport> {
        self.flip(slot, FlipKind::Deploy)
    }

    /// Flips back to the other slot while it still holds a valid build.
    pub fn rollback(&mut self) -> Result<FlipReport> {
        let target = self.cold();
        if self.state.hot.is_none() || Marker::read(&self.marker_path(target), target).is_none() {
            return Err(Error::NoPreviousBuild {
                root: self.root.clone(),
                slot: target,
            });
        }
        self.flip(target, FlipKind::Rollback)
    }

    fn flip(&mut self, slot: Slot, kind: FlipKind) -> Result<FlipReport> {
        // The marker on disk, not our memory of it, decides: it is what a
        // restarted agent would see.
        let Some(marker) = Marker::read(&self.marker_path(slot), slot) else {
            return Err(Error::SlotNotReady {
                root: self.root.clone(),
                slot,
            });
        };
        let from = self.state.hot;
        let took = self.swap_current(slot)?;
        self.state.hot = Some(slot);
        self.state.set_marker(slot, Some(marker.clone()));
        self.state.record(FlipRecord {
            at: now_secs(),
            kind,
            from,
            to: slot,
            build_id: marker.build.build_id.clone(),
        });
        // `current` has already changed. If persisting the state fails the
        // flip still stands (it is what serves), and the next open repairs
        // the state file from `current`; so report the error but do not undo.
        if let Err(e) = self.persist() {
            warn!(error = %e, "flip done but state file not updated; it is repaired on next start");
        }
        info!(from = ?from, to = %slot, build = %marker.build.build_id, kind = ?kind, took_us = took.as_micros() as u64, "flipped current");
        Ok(FlipReport {
            from,
            to: slot,
            build_id: marker.build.build_id,
            took,
        })
    }

    /// The atomic switch: a new symlink at a unique temp name in the same
    /// directory, rename(2) over `current` (atomic for every reader: they see
    /// the old link or the new one, never none), then fsync the directory so
    /// the switch survives a power cut.
    fn swap_current(&self, slot: Slot) -> Result<Duration> {
        let start = Instant::now();
        let tmp = self.root.join(unique_tmp_name(CURRENT));
        symlink(slot.dir_name(), &tmp).at(&tmp)?;
        if let Err(e) = fs::rename(&tmp, self.current_path()) {
            let _ = fs::remove_file(&tmp);
            return Err(e).at(self.current_path());
        }
        fsutil::fsync_dir(&self.root)?;
        Ok(start.elapsed())
    }

    fn persist(&self) -> Result<()> {
        let path = self.state_path();
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(|e| Error::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        fsutil::write_atomic(&path, &bytes)
    }

    fn load_state(&self) -> Option<State> {
        let path = self.state_path();
        let bytes = fs::read(&path).ok()?;
        match serde_json::from_slice::<State>(&bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                let err = Error::BadState {
                    path,
                    reason: e.to_string(),
                };
                warn!(error = %err, "rebuilding state");
                None
            }
        }
    }

    /// Maps a `current` link target to a slot of this root. Accepts the
    /// relative form we write and an absolute path into this root.
    fn slot_of_target(&self, target: &Path) -> Option<Slot> {
        let rel = if target.is_absolute() {
            target.strip_prefix(&self.root).ok()?
        } else {
            target
        };
        let comps: Vec<Component> = rel
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect();
        match comps.as_slice() {
            [Component::Normal(n)] => Slot::from_dir_name(n.to_str()?),
            _ => None,
        }
    }

    fn remove_temp_names(&self, report: &mut RecoveryReport) -> Result<()> {
        for dir in [self.root.clone(), self.meta_dir()] {
            for entry in fs::read_dir(&dir).at(&dir)?.flatten() {
                if is_tmp_name(&entry.file_name()) {
                    let p = entry.path();
                    fsutil::remove_tree(&p)?;
                    report.removed_temp.push(p);
                }
            }
        }
        if !report.removed_temp.is_empty() {
            fsutil::fsync_dir(&self.root)?;
            fsutil::fsync_dir(&self.meta_dir())?;
        }
        Ok(())
    }

    /// Adopts a deploy that was not made by us, without downtime:
    /// - `current` is a plain directory that is served today: it becomes
    ///   slot A and `current` a symlink to it, in one renameat2(2)
    ///   RENAME_EXCHANGE, so `current` never stops resolving and processes
    ///   inside keep their cwd (same inode);
    /// - `current` is a symlink into a Capistrano-style `releases/` tree: the
    ///   release is copied into slot A with hard links (no data copied), made
    ///   durable and marked, then `current` is flipped to it; `releases/` is
    ///   left for the operator to remove.
    fn adopt_if_needed(&mut self, report: &mut RecoveryReport) -> Result<()> {
        let current = self.current_path();
        let meta = match fs::symlink_metadata(&current) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).at(&current),
        };
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&current).at(&current)?;
            if self.slot_of_target(&target).is_some() {
                return Ok(());
            }
            return self.adopt_symlinked_release(&current, &target, report);
        }
        if !meta.is_dir() {
            return Err(Error::Adopt {
                path: current,
                reason: "`current` is neither a directory nor a symlink".into(),
            });
        }
        self.adopt_plain_dir(&current, report)
    }

    /// `current` links outside the slots (a Capistrano `releases/` entry):
    /// the release is hard-linked into the cold slot, made durable and
    /// marked, then `current` is flipped to it.
    fn adopt_symlinked_release(
        &mut self,
        current: &Path,
        target: &Path,
        report: &mut RecoveryReport,
    ) -> Result<()> {
        let resolved = if target.is_absolute() {
            target.to_path_buf()
        } else {
            self.root.join(target)
        };
        let rmeta = fs::metadata(&resolved).map_err(|e| Error::Adopt {
            path: current.to_path_buf(),
            reason: format!("it points at {} which is unusable: {e}", target.display()),
        })?;
        if !rmeta.is_dir() {
            return Err(Error::Adopt {
                path: current.to_path_buf(),
                reason: format!("it points at {}, not a directory", target.display()),
            });
        }
        let slot = self.cold_for_adoption();
        Marker::invalidate(&self.marker_path(slot))?;
        self.state.set_marker(slot, None);
        let dir = self.slot_path(slot);
        if dir.exists() {
            let aside = self.trash_dir().join(unique_tmp_name(slot.dir_name()));
            fs::rename(&dir, &aside).at(&dir)?;
        }
        fs::create_dir(&dir).at(&dir)?;
        let (entries, bytes) = link_tree(&resolved, &dir)?;
        let name = resolved
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "release".into());
        let build_id = sanitize_build_id(&format!("adopted-{name}"));
        self.mark_ready(
            slot,
            BuildInfo {
                build_id,
                sha256: None,
                entries,
                bytes,
            },
        )?;
        self.flip(slot, FlipKind::Adopt)?;
        report.adopted = Some(format!(
            "`current` symlink to {} copied into {slot} with hard links",
            target.display()
        ));
        Ok(())
    }

    /// `current` is a plain served directory: it becomes slot A, and
    /// `current` a symlink to it, in one exchange.
    fn adopt_plain_dir(&mut self, current: &Path, report: &mut RecoveryReport) -> Result<()> {
        // Slot A must be free for it.
        let slot = Slot::A;
        let dir = self.slot_path(slot);
        Marker::invalidate(&self.marker_path(slot))?;
        if fs::symlink_metadata(&dir).is_ok() {
            let aside = self.trash_dir().join(unique_tmp_name(slot.dir_name()));
            fs::rename(&dir, &aside).at(&dir)?;
        }
        // A symlink named `slot-a` whose text is "slot-a": meaningless until
        // the exchange, after which `current` carries that text and the
        // directory carries the name slot-a.
        symlink(slot.dir_name(), &dir).at(&dir)?;
        exchange(current, &dir)?;
        fsutil::fsync_dir(&self.root)?;
        let (entries, bytes) = count_tree(&dir)?;
        fsutil::syncfs(&dir)?;
        let marker = Marker {
            version: MARKER_VERSION,
            slot,
            build: BuildInfo {
                build_id: "adopted".into(),
                sha256: None,
                entries,
                bytes,
            },
            marked_at: now_secs(),
        };
        marker.write(&self.marker_path(slot))?;
        self.state.hot = Some(slot);
        self.state.set_marker(slot, Some(marker));
        self.state.record(FlipRecord {
            at: now_secs(),
            kind: FlipKind::Adopt,
            from: None,
            to: slot,
            build_id: "adopted".into(),
        });
        self.persist()?;
        report.adopted = Some("plain `current` directory renamed to slot-a in place".into());
        info!(root = %self.root.display(), "adopted plain current directory as slot-a");
        Ok(())
    }

    fn cold_for_adoption(&self) -> Slot {
        match (self.served().ok().flatten(), self.state.hot) {
            (Some(s), _) => s.other(),
            (None, Some(h)) => h.other(),
            _ => Slot::A,
        }
    }

    /// Rebuilds the in-memory state from the truth on disk and repairs
    /// `current` and the state file where they disagree.
    fn recover(&mut self, loaded: Option<State>, report: &mut RecoveryReport) -> Result<()> {
        for slot in Slot::ALL {
            let dir = self.slot_path(slot);
            if fs::symlink_metadata(&dir).is_err() {
                fs::create_dir(&dir).at(&dir)?;
            }
        }
        let mut truth = State {
            version: State::VERSION,
            hot: None,
            slot_a: Marker::read(&self.marker_path(Slot::A), Slot::A),
            slot_b: Marker::read(&self.marker_path(Slot::B), Slot::B),
            history: loaded
                .as_ref()
                .map(|s| s.history.clone())
                .unwrap_or_default(),
        };
        // Keep the adoption record made a moment ago.
        if loaded.is_none() {
            truth.history = self.state.history.clone();
        }
        for slot in Slot::ALL {
            if truth.marker(slot).is_none() {
                report.invalid_slots.push(slot);
            }
        }
        let served = self.served()?;
        match served {
            Some(s) if truth.marker(s).is_some() => truth.hot = Some(s),
            _ => {
                // `current` is missing, or points at an unmarked slot (which
                // must never serve). Point it at the last valid hot slot, or
                // the newest valid one.
                let previous_hot = loaded.as_ref().and_then(|l| l.hot);
                let candidate = previous_hot
                    .filter(|s| truth.marker(*s).is_some())
                    .or_else(|| {
                        Slot::ALL
                            .into_iter()
                            .filter_map(|s| truth.marker(s).map(|m| (m.marked_at, s)))
                            .max()
                            .map(|(_, s)| s)
                    });
                if let Some(s) = candidate {
                    self.swap_current(s)?;
                    truth.hot = Some(s);
                    truth.record(FlipRecord {
                        at: now_secs(),
                        kind: FlipKind::Recovery,
                        from: served,
                        to: s,
                        build_id: truth
                            .marker(s)
                            .map(|m| m.build.build_id.clone())
                            .unwrap_or_default(),
                    });
                    report.current_restored = Some(s);
                    warn!(slot = %s, "restored `current` to the last valid build");
                } else if served.is_some() {
                    // No valid build anywhere: leave `current` alone rather
                    // than stop serving whatever it shows.
                    warn!(root = %self.root.display(), "`current` points at an unmarked slot and no slot is valid");
                }
            }
        }
        let same = loaded.as_ref().is_some_and(|l| {
            l.hot == truth.hot && l.slot_a == truth.slot_a && l.slot_b == truth.slot_b
        });
        self.state = truth;
        if !same {
            report.state_repaired = loaded.is_some() || self.state.hot.is_some();
            self.persist()?;
        }
        Ok(())
    }
}

/// Deletes everything in the trash of the root at `root`. Safe to run on
/// another thread while the root is in use: trash names are unique and
/// nothing else reads them.
pub fn purge_trash(root: &Path) -> Result<usize> {
    let trash = root.join(META).join(TRASH);
    let mut n = 0;
    for entry in fs::read_dir(&trash).at(&trash)?.flatten() {
        fsutil::remove_tree(&entry.path())?;
        n += 1;
    }
    Ok(n)
}

fn lock(path: &Path) -> Result<Flock<File>> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .at(path)?;
    let me = std::process::id().to_string();
    let mut attempts = 0;
    let mut locked = loop {
        f = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => break locked,
            Err((f, Errno::EWOULDBLOCK)) => f,
            Err((_, errno)) => return Err(std::io::Error::from(errno)).at(path),
        };
        let mut pid = String::new();
        f.seek(SeekFrom::Start(0)).at(path)?;
        let _ = f.read_to_string(&mut pid);
        let pid = pid.trim().to_string();
        // A lock recorded under our own pid that we no longer hold is kept
        // alive by a child forked from this process that has not reached
        // exec (which closes the O_CLOEXEC descriptor) yet: wait that out.
        if pid == me && attempts < 100 {
            attempts += 1;
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        }
        return Err(Error::Locked {
            path: path.to_path_buf(),
            pid: if pid.is_empty() {
                "unknown".into()
            } else {
                pid
            },
        });
    };
    // Record the owner for the "locked by pid N" message. Not fsynced: after
    // a crash the lock is free anyway and the next owner rewrites it.
    locked.set_len(0).at(path)?;
    locked.seek(SeekFrom::Start(0)).at(path)?;
    write!(locked, "{}", std::process::id()).at(path)?;
    Ok(locked)
}

fn exchange(a: &Path, b: &Path) -> Result<()> {
    renameat2(None, a, None, b, RenameFlags::RENAME_EXCHANGE).map_err(|errno| Error::Adopt {
        path: a.to_path_buf(),
        reason: format!(
            "renameat2(RENAME_EXCHANGE) failed: {} (the filesystem must support it)",
            std::io::Error::from(errno)
        ),
    })
}

/// Recreates the tree `src` under `dst` with hard links for files (a copy
/// where links are impossible), directories and symlinks recreated.
/// Returns (entries, file bytes).
fn link_tree(src: &Path, dst: &Path) -> Result<(u64, u64)> {
    let mut entries = 0;
    let mut bytes = 0;
    for entry in fs::read_dir(src).at(src)? {
        let entry = entry.at(src)?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = fs::symlink_metadata(&from).at(&from)?;
        let ft = meta.file_type();
        entries += 1;
        if ft.is_dir() {
            fs::create_dir(&to).at(&to)?;
            fs::set_permissions(&to, meta.permissions()).at(&to)?;
            let (e, b) = link_tree(&from, &to)?;
            entries += e;
            bytes += b;
        } else if ft.is_symlink() {
            let t = fs::read_link(&from).at(&from)?;
            symlink(&t, &to).at(&to)?;
        } else if ft.is_file() {
            bytes += meta.size();
            if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to).at(&to)?;
            }
        }
    }
    Ok((entries, bytes))
}

fn count_tree(dir: &Path) -> Result<(u64, u64)> {
    let mut entries = 0;
    let mut bytes = 0;
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let meta = fs::symlink_metadata(entry.path()).at(entry.path())?;
        entries += 1;
        if meta.is_dir() {
            let (e, b) = count_tree(&entry.path())?;
            entries += e;
            bytes += b;
        } else if meta.is_file() {
            bytes += meta.size();
        }
    }
    Ok((entries, bytes))
}

fn sanitize_build_id(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(128);
    out
}
