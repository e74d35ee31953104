//! What each slot must hold, and whether it still does (issue 20).
//!
//! Every slot the agent builds gets a record (`<root>/.deploy/slot-?.record`,
//! [`record`]): per entry its path, type, size, mode, mtime, sha256, and the
//! inode and ctime the file had when the record was written, as git's index
//! keeps them. The record is written atomically (temp file, fsync, rename,
//! fsync of `.deploy/`) before the slot's ready-marker, and a claim removes
//! it after the marker, so a marked slot's record always describes the build
//! in it. [`check`] compares a slot with its record: by stat alone when
//! nothing changed (a file's inode and ctime cannot be kept by a write), by
//! sha256 when a stat differs only in what a write can fake, or is "racy"
//! (changed in the same clock tick the record was written in).
//!
//! Crash guarantees: this module writes only the record, atomically; a crash
//! leaves the old record, the new one, or a temp name recovery removes. A
//! check only reads.

pub mod check;
pub mod index;
pub mod record;
pub mod slot;

pub use check::{verify, Drift};
pub use index::{FileIndex, Filled};
pub use record::{Entry, Kind, Mechanism, Observed, SlotRecord, Verdict};
pub use slot::{check, write_record, SlotCheck, SlotVerdict};
