//! The swapper's one error type. Every variant names the path it concerns and
//! its message tells the operator what to do next. Holds no state, so a crash
//! cannot leave anything of it behind.

use std::path::PathBuf;

use crate::drain::Holder;
use crate::slot::Slot;

/// Everything that can go wrong while managing a deploy root.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "I/O error on {path}: {source} (check the path exists, its permissions and free space)"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "deploy root {path} is locked by pid {pid}: another deploy-agent (or an operator command) \
         is using it; stop it or wait for it to finish"
    )]
    Locked { path: PathBuf, pid: String },

    #[error(
        "refusing to flip {root} to slot {slot}: it has no valid ready-marker, so its build is \
         incomplete or unverified; deploy a build into it first"
    )]
    SlotNotReady { root: PathBuf, slot: Slot },

    #[error(
        "cannot roll back {root}: the previous slot {slot} holds no valid build (it was emptied \
         or never finished); publish the build you want instead"
    )]
    NoPreviousBuild { root: PathBuf, slot: Slot },

    #[error(
        "refusing to claim slot {slot} of {root}: `current` points at it, so it is serving; \
         this is a bug in the caller, report it"
    )]
    ClaimHot { root: PathBuf, slot: Slot },

    #[error(
        "state file {path} is unreadable ({reason}); it is rebuilt from `current` and the \
         ready-markers, move it aside if this repeats"
    )]
    BadState { path: PathBuf, reason: String },

    #[error(
        "cannot adopt {path}: {reason}; move it aside or point deploy-agent at an empty directory"
    )]
    Adopt { path: PathBuf, reason: String },

    #[error(
        "{count} process(es) still use {path} after {waited_ms} ms: {}; let them finish, raise \
         the drain deadline, or stop them",
        format_holders(holders)
    )]
    DrainTimeout {
        path: PathBuf,
        count: usize,
        waited_ms: u128,
        holders: Vec<Holder>,
    },

    #[error("invalid build id {id:?} for {path}: use 1-128 characters of [A-Za-z0-9._-]")]
    BadBuildId { path: PathBuf, id: String },
}

fn format_holders(holders: &[Holder]) -> String {
    let mut parts: Vec<String> = holders
        .iter()
        .take(8)
        .map(|h| format!("pid {} ({}) via {}", h.pid, h.command, h.uses_summary()))
        .collect();
    if holders.len() > 8 {
        parts.push(format!("and {} more", holders.len() - 8));
    }
    parts.join(", ")
}

/// Result with the swapper's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds the path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
