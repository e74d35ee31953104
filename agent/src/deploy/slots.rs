//! The deploy's side of issue 20: every slot gets its record before its
//! ready-marker, and no flip goes to an existing slot (a rollback by the
//! key, the health gate's flip back) without checking the slot against
//! its record first. A slot that no longer matches is rebuilt from its
//! artifact (the deploy falls back to a normal deploy into it) or, where
//! nothing can be rebuilt, the flip is refused; both are logged and shown.
//!
//! A build published with a file index gets its record's digests from it
//! (downloaded beside the artifact); without one, they are hashed after
//! the deploy, off its path.
//!
//! Crash guarantees: the record is durable before the marker (see
//! `integrity::slot`); a check only reads. A crash during a rebuild leaves
//! an unmarked cold slot, as any deploy does: the next start deploys again.

use std::path::PathBuf;
use std::sync::Arc;

use swapper::Slot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Deployer, Event, Run};
use crate::clock::now_secs;
use crate::error::{Error, Result};
use crate::integrity::{Entry, FileIndex, Filled, Mechanism, SlotCheck, SlotRecord, SlotVerdict};
use crate::manifest::{Manifest, Sha256Sum};

/// The record of a delta's base slot, if it has a usable one for the base
/// artifact `base`; read on a blocking thread (about 4 MB for 40,000 files).
pub(super) async fn base_record(path: PathBuf, base: Sha256Sum) -> Option<Box<SlotRecord>> {
    let loaded = tokio::task::spawn_blocking(move || SlotRecord::load(&path)).await;
    match loaded {
        Ok(Ok(Some(r))) if r.header.sha256 == base => Some(Box::new(r)),
        Ok(Err(e)) => {
            warn!(error = %e, "delta base record unusable; its files are hashed");
            None
        }
        _ => None,
    }
}

impl Deployer {
    /// How deltas reuse files on this root's filesystem (probed once).
    pub(super) async fn reuse_mechanism(&self) -> Mechanism {
        if let Some(how) = self.reuse.get() {
            return *how;
        }
        let meta = self.root_path.join(".deploy");
        let how = tokio::task::spawn_blocking(move || crate::unpack::reuse::probe(&meta))
            .await
            .unwrap_or(Mechanism::Copy);
        *self.reuse.get_or_init(|| how)
    }

    /// Writes the record of `slot`, just built for `m`, before its marker,
    /// with the digests `index` gives (the rest are hashed after the
    /// deploy, by [`Deployer::complete_digests`]).
    pub(super) async fn write_record(
        &self,
        m: &Manifest,
        slot: Slot,
        (how, mut entries): (Mechanism, Vec<Entry>),
        index: Option<FileIndex>,
    ) -> Result<()> {
        let path = self.slot_record_path(slot);
        let (build, sha) = (m.spec.build.clone(), m.spec.sha256.clone());
        tokio::task::spawn_blocking(move || {
            if let Some(index) = index {
                let Filled { filled, unmatched } = index.fill(&mut entries);
                match unmatched {
                    0 => info!(build, filled, "file digests from the publisher's index"),
                    _ => warn!(build, filled, unmatched, "the publisher's index does not list every file as unpacked; hashing the rest after the deploy"),
                }
            }
            crate::integrity::write_record(&path, (&build, &sha), how, entries)
        })
        .await
        .map_err(|e| Error::Internal(format!("record task: {e}")))?
    }

    /// Downloads and reads `m`'s file index, when its manifest names one.
    /// Never fails the deploy: without it the slot is hashed after the
    /// deploy, as for a build published without an index.
    pub(super) async fn file_index(
        &self,
        m: &Manifest,
        cancel: &CancellationToken,
    ) -> Option<FileIndex> {
        let spec = m.spec.index.as_ref()?.download(&m.spec.build);
        // Pinned, as every download is: a prune after the artifact (or the
        // delta) is committed deletes unpinned partials, this one included.
        let _pin = self.cache.pin(&spec.sha256);
        let path = match self.cache.lookup(&spec.sha256) {
            Some(p) => p,
            None => {
                // Its own progress: the deploy's reports the artifact's.
                let progress = Arc::new(crate::progress::Progress::default());
                let fetched = crate::deploy::pipeline::fetch_to_cache(
                    &self.client,
                    &spec,
                    &self.cache,
                    &self.fetch,
                    progress,
                    cancel.clone(),
                )
                .await;
                match fetched {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(build = %m.spec.build, error = %e, "cannot download the file index; hashing the slot after the deploy instead");
                        return None;
                    }
                }
            }
        };
        let artifact = m.spec.sha256.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let index = FileIndex::load(&path, &artifact);
            // Read once, into the record: it has no use in the cache.
            let _ = std::fs::remove_file(&path);
            index
        })
        .await;
        match loaded {
            Ok(Ok(index)) => Some(index),
            Ok(Err(e)) => {
                warn!(build = %m.spec.build, error = %e, "file index not used");
                None
            }
            Err(e) => {
                warn!(build = %m.spec.build, error = %e, "file index task failed");
                None
            }
        }
    }

    /// Checks `slot` against its record (stat, hashing only what the stat
    /// cannot prove; everything with `full`) and keeps the result for
    /// status. `None` when the slot holds no marked build.
    pub async fn check_slot(&self, slot: Slot, full: bool) -> Result<Option<SlotCheck>> {
        let (dir, record) = (self.slot_dir(slot), self.slot_record_path(slot));
        let Some(marker) = self.slots().marker(slot).cloned() else {
            return Ok(None);
        };
        let (build, marked_at) = (marker.build.build_id.clone(), marker.marked_at);
        let verdict = tokio::task::spawn_blocking(move || {
            let b = &marker.build;
            crate::integrity::check(&dir, &record, (&b.build_id, b.sha256.as_deref()), full)
        })
        .await
        .map_err(|e| Error::Internal(format!("slot check task: {e}")))??;
        let check = SlotCheck {
            build,
            marked_at,
            checked_unix: now_secs(),
            verdict,
        };
        let mut kept = check.clone();
        if let SlotVerdict::Drifted { drift, .. } = &mut kept.verdict {
            *drift = drift.capped();
        }
        self.checks.lock().unwrap_or_else(|p| p.into_inner())[index(slot)] = Some(kept);
        let live = self.slots().hot() == Some(slot);
        if let Some(sink) = self.live_sink.get().filter(|_| live) {
            sink.live_checked(check.verdict.listed());
        }
        Ok(Some(check))
    }

    /// Fills in the digests `slot`'s record lacks (a full unpack records
    /// stats only), off the deploy's path, and writes the record again,
    /// under the root's lock and only while the slot still holds the build
    /// it describes (a claim in between removes the record; this must not
    /// bring it back).
    pub async fn complete_digests(&self, slot: Slot) -> Result<()> {
        let (dir, path) = (self.slot_dir(slot), self.slot_record_path(slot));
        let Some(marker) = self.slots().marker(slot).cloned() else {
            return Ok(());
        };
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let Some(mut record) = SlotRecord::load(&path)? else {
                return Ok(());
            };
            if record.entries.iter().all(|e| e.known) {
                return Ok(());
            }
            let started = std::time::Instant::now();
            let filled = crate::integrity::slot::complete(&dir, &mut record);
            let root = root.lock().unwrap_or_else(|p| p.into_inner());
            if root.marker(slot) != Some(&marker) {
                return Ok(());
            }
            record.write(&path)?;
            info!(slot = %slot, build = %record.header.build, filled, ms = started.elapsed().as_millis() as u64, "slot record digests filled in");
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("record digests task: {e}")))?
    }

    /// The last check of `slot`, if it speaks for the build marked there now.
    pub fn last_check(&self, slot: Slot, marker: Option<&swapper::Marker>) -> Option<SlotCheck> {
        let marker = marker?;
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks[index(slot)]
            .clone()
            .filter(|c| c.build == marker.build.build_id && c.marked_at == marker.marked_at)
    }

    /// The live slot's last check, when it found the slot changed since
    /// its deploy (a hot-patch, or any write into it).
    pub fn live_drift(&self) -> Option<SlotCheck> {
        let slots = self.slots();
        let (hot, marker) = slots.served()?;
        self.last_check(hot, Some(marker))
            .filter(|c| !c.verdict.flippable())
    }

    /// The check before a flip to `slot` as it is: `Ok` when it may flip,
    /// else the error naming what differs (logged here).
    pub async fn check_before_flip(&self, slot: Slot) -> Result<()> {
        let Some(SlotCheck { build, verdict, .. }) = self.check_slot(slot, false).await? else {
            // No marker: swapper refuses the flip with its own error.
            return Ok(());
        };
        if verdict.flippable() {
            return Ok(());
        }
        warn!(slot = %slot, build = %build, changed = verdict.changed(), differences = %verdict.summary(), "not flipping to a slot that is not its build");
        Err(Error::SlotDrift {
            slot: slot.dir_name().to_string(),
            build,
            summary: verdict.summary(),
        })
    }

    /// The health gate's flip back goes to the previous (cold) slot only if
    /// it is still exactly its build.
    pub(super) async fn check_previous_slot(&self) -> Result<()> {
        self.check_before_flip(self.slots().cold()).await
    }

    /// A rollback by the key (the cold slot holds `m`): the cold slot, when
    /// it still is exactly its build (then the deploy starts in
    /// `draining`); `None` when it is not, after recording what differed,
    /// so the caller rebuilds it with a normal deploy.
    pub(super) async fn cold_slot_as_it_is(
        &self,
        m: &Manifest,
        run: &mut Run<'_>,
    ) -> Result<Option<Slot>> {
        let cold = self.slots().hot().map(Slot::other).unwrap_or(Slot::A);
        let verdict = match self.check_slot(cold, false).await? {
            Some(c) => c.verdict,
            None => SlotVerdict::Unrecorded,
        };
        if verdict.flippable() {
            run.step(Event::Start { in_cold_slot: true })?;
            return Ok(Some(cold));
        }
        warn!(
            build = %m.spec.build,
            slot = %cold,
            changed = verdict.changed(),
            differences = %verdict.summary(),
            "the slot holding this build is not its build any more; rebuilding it from the artifact"
        );
        info!(build = %m.spec.build, slot = %cold, "repairing the slot with a full deploy");
        run.rec.repaired = Some(match verdict {
            SlotVerdict::Drifted { mechanism, drift } => SlotVerdict::Drifted {
                mechanism,
                drift: drift.capped(),
            },
            other => other,
        });
        Ok(None)
    }
}

fn index(slot: Slot) -> usize {
    match slot {
        Slot::A => 0,
        Slot::B => 1,
    }
}

/// Checks the live slot, then the cold one, every `[integrity]
/// check-interval` and whenever `check_now` is notified (after a deploy or
/// a rollback), until `stop`. Only reads; results go to status, the
/// metrics and the host report through [`Deployer::last_check`].
pub async fn watch(d: std::sync::Arc<Deployer>, stop: tokio_util::sync::CancellationToken) {
    let every = d.config.integrity.check_interval;
    loop {
        let slots = d.slots();
        let (hot, cold) = (slots.hot(), slots.cold());
        for slot in hot.into_iter().chain([cold]) {
            if let Err(e) = d.complete_digests(slot).await {
                warn!(slot = %slot, error = %e, "cannot fill in the slot record's digests");
            }
            if let Err(e) = d.check_slot(slot, false).await {
                warn!(slot = %slot, error = %e, "cannot check the slot against its record");
            }
        }
        let wait = async {
            if every.is_zero() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(every).await
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = d.check_now.notified() => {}
            _ = wait => {}
        }
    }
}
