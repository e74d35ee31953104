//! The two slots and their ready-markers.
//!
//! A marker is a small JSON file outside the slot (`.deploy/<slot>.ready`),
//! written atomically and only after the slot's contents are durable. It is
//! removed, durably, before anything in the slot is touched. So after a crash
//! at any point a slot either has a valid marker and complete contents, or
//! counts as empty.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// One of the two build directories of a deploy root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// Both slots, in a fixed order.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The slot directory's name inside the deploy root; also the text of
    /// the relative `current` symlink.
    pub fn dir_name(self) -> &'static str {
        match self {
            Slot::A => "slot-a",
            Slot::B => "slot-b",
        }
    }

    /// Parses a slot directory name (the `current` link target).
    pub fn from_dir_name(name: &str) -> Option<Slot> {
        match name.trim_end_matches('/') {
            "slot-a" => Some(Slot::A),
            "slot-b" => Some(Slot::B),
            _ => None,
        }
    }

    pub(crate) fn record_name(self) -> &'static str {
        match self {
            Slot::A => "slot-a.record",
            Slot::B => "slot-b.record",
        }
    }

    pub(crate) fn marker_name(self) -> &'static str {
        match self {
            Slot::A => "slot-a.ready",
            Slot::B => "slot-b.ready",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// What the caller knows about a build it has finished writing into a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// The build id from the manifest (`[A-Za-z0-9._-]`, at most 128 chars).
    pub build_id: String,
    /// Hex sha256 of the artifact the slot was unpacked from; `None` for a
    /// build adopted from an existing deploy.
    pub sha256: Option<String>,
    /// Entries (files, directories, links) written.
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// The ready-marker of a slot, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Format version, so a future agent can refuse what it cannot read.
    pub version: u32,
    /// The slot this marker belongs to; a marker copied to the other slot's
    /// name is invalid.
    pub slot: Slot,
    #[serde(flatten)]
    pub build: BuildInfo,
    /// Seconds since the Unix epoch when the slot was marked ready.
    pub marked_at: u64,
}

pub(crate) const MARKER_VERSION: u32 = 1;

/// Checks a build id against the manifest rule: 1 to 128 characters of
/// `[A-Za-z0-9._-]`, the first a letter or a digit. So a build id is safe
/// as a path component (never `.`, `..` or a hidden name) and as a
/// command-line argument of a hook (never an option such as `--help`).
pub fn validate_build_id(id: &str) -> bool {
    id.len() <= 128
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Marker {
    /// Reads the marker of `slot` from `path`. A missing, unreadable or
    /// inconsistent marker is `None`: the slot counts as empty.
    pub(crate) fn read(path: &Path, slot: Slot) -> Option<Marker> {
        let bytes = std::fs::read(path).ok()?;
        let m: Marker = serde_json::from_slice(&bytes).ok()?;
        (m.version == MARKER_VERSION && m.slot == slot && validate_build_id(&m.build.build_id))
            .then_some(m)
    }

    /// Writes the marker durably (atomic replace, then directory fsync).
    pub(crate) fn write(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        fsutil::write_atomic(path, &bytes)
    }

    /// Removes the marker durably: unlink, then fsync its directory, so a
    /// crash right after can never resurrect it.
    pub(crate) fn invalidate(path: &Path) -> Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).at(path),
        }
        fsutil::fsync_dir(&fsutil::parent(path))
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
