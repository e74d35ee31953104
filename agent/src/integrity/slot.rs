//! A slot and its record, as the deploy and the daemon use them: write the
//! record of a slot just built, check a slot before anything flips to it.
//!
//! Crash guarantees: the record is written atomically and durably
//! ([`SlotRecord::write`]) before the caller writes the slot's ready-marker;
//! a crash between the two leaves a record without a marker, which counts
//! for nothing (an unmarked slot is empty) and is removed by the next claim.
//! A check only reads.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::check::{verify, Drift};
use super::record::{stamp, Entry, Header, Kind, Mechanism, SlotRecord};
use crate::error::{Error, Result};
use crate::manifest::Sha256Sum;

/// What a check of a slot against its record found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum SlotVerdict {
    /// Exactly its build.
    Intact {
        mechanism: Mechanism,
        checked: u64,
        hashed: u64,
    },
    /// No record (built before records existed, or adopted): nothing can
    /// be proven either way; flips to it go ahead as before.
    Unrecorded,
    /// Differs from its record.
    Drifted { mechanism: Mechanism, drift: Drift },
    /// The record is unreadable, torn, or describes another build: treated
    /// like a drift (the slot is rebuilt or the flip refused).
    Unprovable { reason: String },
}

impl SlotVerdict {
    /// Whether a flip to the slot may go ahead as it is.
    pub fn flippable(&self) -> bool {
        matches!(self, SlotVerdict::Intact { .. } | SlotVerdict::Unrecorded)
    }

    /// One line for logs, errors and history.
    pub fn summary(&self) -> String {
        match self {
            SlotVerdict::Intact { .. } => "matches its record".into(),
            SlotVerdict::Unrecorded => "has no record".into(),
            SlotVerdict::Drifted { drift, .. } => drift.summary(),
            SlotVerdict::Unprovable { reason } => reason.clone(),
        }
    }

    /// `modified <path>`, `added <path>`, `missing <path>` (at most 20
    /// per kind); for an unprovable slot, why.
    pub fn listed(&self) -> Vec<String> {
        match self {
            SlotVerdict::Drifted { drift, .. } => {
                let d = drift.capped();
                let kinds = [
                    ("modified", d.modified),
                    ("added", d.added),
                    ("missing", d.missing),
                ];
                kinds
                    .into_iter()
                    .flat_map(|(k, v)| v.into_iter().map(move |p| format!("{k} {p}")))
                    .collect()
            }
            SlotVerdict::Unprovable { reason } => vec![format!("unprovable: {reason}")],
            _ => Vec::new(),
        }
    }

    /// Paths that differ (0 unless drifted).
    pub fn changed(&self) -> usize {
        match self {
            SlotVerdict::Drifted { drift, .. } => drift.count(),
            _ => 0,
        }
    }
}

/// The last check of one slot, for status, metrics and host reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotCheck {
    pub build: String,
    /// The slot's marker time: the check speaks only for the build marked
    /// then (a later claim or deploy makes it stale, and it is not shown).
    pub marked_at: u64,
    pub checked_unix: u64,
    #[serde(flatten)]
    pub verdict: SlotVerdict,
}

impl SlotCheck {
    /// For history, when a flip leaves this (changed) live slot behind.
    pub fn left_behind_note(&self) -> String {
        format!(
            "no longer serving the changes made to {} since its deploy ({} path(s)): {}",
            self.build,
            self.verdict.changed(),
            self.verdict.summary()
        )
    }
}

/// `deploy-agent verify`'s answer about `slot`: `Ok` when it is exactly
/// its build (or has no record), else an error listing every path.
pub fn verify_answer(slot: &str, c: &SlotCheck) -> std::result::Result<String, String> {
    let build = &c.build;
    match &c.verdict {
        SlotVerdict::Intact {
            mechanism,
            checked,
            hashed,
        } => Ok(format!(
            "{slot} holds exactly build {build}: {checked} entries checked, {hashed} hashed (files {})",
            mechanism.as_str()
        )),
        SlotVerdict::Unrecorded => Ok(format!(
            "{slot} (build {build}) has no record (deployed before records existed); nothing to compare"
        )),
        SlotVerdict::Unprovable { reason } => Err(format!(
            "{slot} (build {build}) cannot be proven intact: {reason}"
        )),
        SlotVerdict::Drifted { drift, .. } => {
            let mut lines = vec![format!(
                "{slot} no longer holds exactly build {build}: {} path(s) differ from its record",
                drift.count()
            )];
            for (what, list) in [
                ("modified", &drift.modified),
                ("added", &drift.added),
                ("missing", &drift.missing),
            ] {
                lines.extend(list.iter().map(|p| format!("  {what} {p}")));
            }
            lines.push(format!(
                "publish {build} again or run `deploy-agent redeploy` to rebuild it"
            ));
            Err(lines.join("\n"))
        }
    }
}

/// Fills in the digests the unpack left out: each file whose stat still
/// proves it untouched since the record (same inode and ctime, not racy)
/// is read and hashed; a file whose stat does not is left without a digest
/// (it already counts as changed). Returns how many were filled in.
/// Blocking, and reads every such file: run it after the deploy, off its
/// path.
pub fn complete(slot_dir: &Path, record: &mut SlotRecord) -> usize {
    use std::os::unix::fs::OpenOptionsExt;
    let at = record.header.written_at_ns;
    let mut buf = vec![0u8; 256 << 10];
    let mut filled = 0;
    for e in record.entries.iter_mut().filter(|e| !e.known) {
        let full = slot_dir.join(&e.path);
        let opened = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&full);
        let Ok(mut f) = opened else { continue };
        let Ok(meta) = f.metadata() else { continue };
        let now = super::record::Observed::of(&meta);
        if super::record::classify(e, &now, at, false) != super::record::Verdict::Same {
            continue;
        }
        if let Ok((digest, n)) = super::check::hash_open(&mut f, &mut buf) {
            // The stat again: a write while it was read makes the digest moot.
            let after = f.metadata().map(|m| super::record::Observed::of(&m));
            if n == e.stat.size && after.is_ok_and(|a| a == now) {
                e.digest = digest;
                e.known = true;
                filled += 1;
            }
        }
    }
    filled
}

/// Writes the record of the slot at `slot_dir`, just built: `entries` as
/// the unpack (and the delta) reported them. Blocking.
pub fn write_record(
    record_path: &Path,
    (build, sha256): (&str, &Sha256Sum),
    mechanism: Mechanism,
    entries: Vec<Entry>,
) -> Result<()> {
    let newest = entries
        .iter()
        .filter(|e| e.stat.kind != Kind::Dir)
        .map(|e| e.stat.ctime_ns.max(e.stat.mtime_ns))
        .max()
        .unwrap_or(i64::MIN);
    let dir = record_path.parent().unwrap_or(Path::new("."));
    let header = Header {
        build: build.to_string(),
        sha256: sha256.clone(),
        mechanism,
        written_at_ns: stamp(dir, newest)?,
    };
    let record = SlotRecord::new(header, entries);
    record.write(record_path)?;
    info!(build, path = %record_path.display(), entries = record.entries.len(), files = record.files(), how = mechanism.as_str(), "slot record written");
    Ok(())
}

/// Checks the slot at `slot_dir`, which the marker says holds `build` from
/// the artifact `sha256`, against its record at `record_path`: by stat,
/// hashing only what the stat cannot prove (everything with `full`).
/// Blocking: call it off the async threads.
pub fn check(
    slot_dir: &Path,
    record_path: &Path,
    (build, sha256): (&str, Option<&str>),
    full: bool,
) -> Result<SlotVerdict> {
    let started = Instant::now();
    let record = match SlotRecord::load(record_path) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(SlotVerdict::Unrecorded),
        Err(e @ Error::SlotRecord { .. }) => {
            warn!(build, slot = %slot_dir.display(), error = %e, "slot record unusable");
            return Ok(SlotVerdict::Unprovable {
                reason: e.to_string(),
            });
        }
        Err(e) => return Err(e),
    };
    if record.header.build != build || sha256.is_some_and(|s| record.header.sha256 != *s) {
        return Ok(SlotVerdict::Unprovable {
            reason: format!(
                "its record describes build {} ({}), not {build}",
                record.header.build, record.header.sha256
            ),
        });
    }
    // A slot that cannot be read (removed, a directory made unreadable)
    // is not provably its build: rebuilt or refused like a changed one,
    // never a deploy that fails on every retry.
    let drift = match verify(slot_dir, &record, full) {
        Ok(d) => d,
        Err(e) => {
            warn!(build, slot = %slot_dir.display(), error = %e, "cannot read the slot to check it");
            return Ok(SlotVerdict::Unprovable {
                reason: format!("cannot read it: {e}"),
            });
        }
    };
    let mechanism = record.header.mechanism;
    info!(
        build,
        slot = %slot_dir.display(),
        checked = drift.checked,
        hashed = drift.hashed,
        modified = drift.modified.len(),
        added = drift.added.len(),
        missing = drift.missing.len(),
        full,
        check_us = started.elapsed().as_micros() as u64,
        "slot checked against its record"
    );
    Ok(if drift.is_clean() {
        SlotVerdict::Intact {
            mechanism,
            checked: drift.checked,
            hashed: drift.hashed,
        }
    } else {
        SlotVerdict::Drifted { mechanism, drift }
    })
}
