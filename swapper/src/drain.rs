//! Drain detection: which processes use a directory, read from /proc.
//!
//! A process uses a directory when its cwd, root or executable, one of its
//! open file descriptors, or one of its memory-mapped files lies under it.
//! The kernel reports resolved paths, so a process that entered the slot
//! through the `current` symlink is still found under the slot's real path.
//! Read-only: a crash here changes nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// How a process uses the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "path", rename_all = "kebab-case")]
pub enum Use {
    Cwd(PathBuf),
    Root(PathBuf),
    Exe(PathBuf),
    Fd(PathBuf),
    Mmap(PathBuf),
}

/// A process that holds the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: i32,
    /// The command line, arguments joined by spaces (or `[comm]` for kernel
    /// threads and processes whose cmdline is unreadable).
    pub command: String,
    /// Every way it uses the directory (capped, see [`MAX_USES`]).
    pub uses: Vec<Use>,
}

/// At most this many uses are listed per process, so a worker with
/// thousands of open files does not flood the status output.
pub const MAX_USES: usize = 16;

impl Holder {
    /// A short human summary of how it holds the directory.
    pub fn uses_summary(&self) -> String {
        let mut kinds: Vec<&str> = self
            .uses
            .iter()
            .map(|u| match u {
                Use::Cwd(_) => "cwd",
                Use::Root(_) => "root",
                Use::Exe(_) => "exe",
                Use::Fd(_) => "open file",
                Use::Mmap(_) => "mmap",
            })
            .collect();
        kinds.dedup();
        kinds.join("+")
    }
}

/// Lists the processes (other than this one) that use `dir` or anything
/// under it. Processes that vanish or whose /proc entries are unreadable
/// (another user's, without privileges) are skipped.
pub fn holders(dir: &Path) -> Result<Vec<Holder>> {
    let dir = fs::canonicalize(dir).at(dir)?;
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").at("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Some(h) = inspect(pid, &dir) {
            out.push(h);
        }
    }
    out.sort_by_key(|h| h.pid);
    Ok(out)
}

fn under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// The kernel appends " (deleted)" to unlinked paths; a deleted file inside
/// the slot still pins it.
fn strip_deleted(p: PathBuf) -> PathBuf {
    match p.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => PathBuf::from(s),
        None => p,
    }
}

fn inspect(pid: i32, dir: &Path) -> Option<Holder> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let mut uses = Vec::new();
    let push = |u: Use, uses: &mut Vec<Use>| {
        if uses.len() < MAX_USES && !uses.contains(&u) {
            uses.push(u);
        }
    };
    for (name, mk) in [
        ("cwd", Use::Cwd as fn(PathBuf) -> Use),
        ("root", Use::Root),
        ("exe", Use::Exe),
    ] {
        if let Ok(t) = fs::read_link(base.join(name)) {
            let t = strip_deleted(t);
            // A root of "/" is under nothing but "/"; only a chroot into the
            // slot counts.
            if under(&t, dir) {
                push(mk(t), &mut uses);
            }
        }
    }
    if let Ok(fds) = fs::read_dir(base.join("fd")) {
        for fd in fds.flatten() {
            if let Ok(t) = fs::read_link(fd.path()) {
                let t = strip_deleted(t);
                if under(&t, dir) {
                    push(Use::Fd(t), &mut uses);
                }
            }
        }
    }
    if let Ok(maps) = fs::read_to_string(base.join("maps")) {
        for line in maps.lines() {
            // address perms offset dev inode pathname: the path is the sixth
            // field and may contain spaces.
            let Some(path) = line.splitn(6, ' ').nth(5).map(str::trim_start) else {
                continue;
            };
            if !path.starts_with('/') {
                continue;
            }
            let t = strip_deleted(PathBuf::from(path));
            if under(&t, dir) {
                push(Use::Mmap(t), &mut uses);
            }
        }
    }
    if uses.is_empty() {
        return None;
    }
    Some(Holder {
        pid,
        command: command_line(pid),
        uses,
    })
}

fn command_line(pid: i32) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        format!("[{}]", comm.trim())
    } else {
        args.join(" ")
    }
}

/// Waits until no process uses `dir`, polling every `poll`, or fails with
/// [`Error::DrainTimeout`] naming the holders once `deadline` has passed.
/// `on_poll` sees each non-empty list, so a caller can report who it waits
/// on; it returns `false` to stop waiting early (shutdown), which yields the
/// holders seen last.
pub fn wait_until_drained(
    dir: &Path,
    deadline: Duration,
    poll: Duration,
    mut on_poll: impl FnMut(&[Holder]) -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let hs = holders(dir)?;
        if hs.is_empty() {
            return Ok(());
        }
        let keep_going = on_poll(&hs);
        if !keep_going || start.elapsed() >= deadline {
            return Err(Error::DrainTimeout {
                path: dir.to_path_buf(),
                count: hs.len(),
                waited_ms: start.elapsed().as_millis(),
                holders: hs,
            });
        }
        std::thread::sleep(
            poll.min(deadline.saturating_sub(start.elapsed()))
                .max(Duration::from_millis(1)),
        );
    }
}
