//! What the agent must remember across restarts to avoid acting twice on
//! something it already judged: the build quarantined after a failed health
//! check, and the highest Consul `ModifyIndex` it has acted on (docs/consul-watch-rules.md
//! rule 12).
//!
//! Kept in `<root>/.deploy/guard.json`, replaced atomically
//! (`swapper::fsutil::write_atomic`: temp file, fsync, rename, fsync dir) on
//! every change, so after a crash the file holds either the old or the new
//! state, never a mix. An unreadable file is logged and treated as empty:
//! the agent then behaves as on a fresh host (it may try a quarantined
//! build once more, and the health gate catches it again).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::clock::now_secs;
use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// File name under `.deploy/`.
pub const FILE: &str = "guard.json";

/// A build this host refuses to deploy again on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub build: String,
    pub sha256: String,
    /// Why (the health check's verdict).
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// The persisted state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuardState {
    /// Highest Consul `ModifyIndex` of a desired state the agent acted on.
    pub applied_modify_index: u64,
    pub quarantined: Option<Quarantined>,
}

/// The guard file and its in-memory copy. Every method that changes the
/// state writes the file before returning (blocking: call it from
/// `spawn_blocking` on async paths).
#[derive(Debug)]
pub struct Guard {
    path: PathBuf,
    state: Mutex<GuardState>,
}

impl Guard {
    /// Loads `<root>/.deploy/guard.json` (missing = empty). Reads memory only.
    pub fn open(root: &Path) -> Guard {
        let path = root.join(".deploy").join(FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "unreadable guard file; starting without quarantine or applied index");
                GuardState::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => GuardState::default(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the guard file; starting without quarantine or applied index");
                GuardState::default()
            }
        };
        Guard {
            path,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GuardState> {
        // Plain data written whole: a panic elsewhere cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the state (memory only).
    pub fn state(&self) -> GuardState {
        self.lock().clone()
    }

    /// The quarantine entry matching `m`'s build and artifact, if any.
    pub fn quarantined(&self, m: &Manifest) -> Option<Quarantined> {
        self.lock()
            .quarantined
            .clone()
            .filter(|q| q.build == m.spec.build && m.spec.sha256 == *q.sha256)
    }

    /// Quarantines `m`'s build (replacing any earlier entry) and writes the file.
    pub fn quarantine(&self, m: &Manifest, reason: &str) -> Result<()> {
        self.change(|s| {
            s.quarantined = Some(Quarantined {
                build: m.spec.build.clone(),
                sha256: m.spec.sha256.to_string(),
                reason: reason.to_string(),
                at: now_secs(),
            });
        })
    }

    /// Lifts the quarantine when `m` names a different build (or always,
    /// with `m = None`: the operator's `redeploy`), writing the file if it
    /// changed. Returns the lifted entry.
    pub fn lift(&self, m: Option<&Manifest>) -> Result<Option<Quarantined>> {
        let current = self.lock().quarantined.clone();
        let Some(q) = current else { return Ok(None) };
        if m.is_some_and(|m| q.build == m.spec.build && m.spec.sha256 == *q.sha256) {
            return Ok(None);
        }
        self.change(|s| s.quarantined = None)?;
        info!(build = %q.build, "quarantine lifted");
        Ok(Some(q))
    }

    /// Raises the applied `ModifyIndex` to `index` (never lowers it) and
    /// writes the file if it changed.
    pub fn applied(&self, index: u64) -> Result<()> {
        if index <= self.lock().applied_modify_index {
            return Ok(());
        }
        self.change(|s| s.applied_modify_index = s.applied_modify_index.max(index))
    }

    fn change(&self, f: impl FnOnce(&mut GuardState)) -> Result<()> {
        // The lock is held across the write so two changes cannot
        // interleave their read-modify-write.
        let mut g = self.lock();
        let mut next = g.clone();
        f(&mut next);
        let bytes = serde_json::to_vec_pretty(&next)
            .map_err(|e| Error::Internal(format!("cannot encode the guard state: {e}")))?;
        swapper::fsutil::write_atomic(&self.path, &bytes)?;
        *g = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(build: &str, sha: char) -> Manifest {
        let json = serde_json::json!({"build": build, "url": "http://h/a", "sha256": sha.to_string().repeat(64),
            "size": 1, "format": "tar"});
        Manifest::parse(json.to_string().as_bytes(), Default::default()).unwrap()
    }

    #[test]
    fn state_survives_a_reopen_and_the_index_never_goes_down() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join(".deploy")).unwrap();
        let g = Guard::open(tmp.path());
        let b = manifest("b", 'a');
        g.quarantine(&b, "503").unwrap();
        g.applied(40).unwrap();
        g.applied(7).unwrap();
        let g = Guard::open(tmp.path());
        assert_eq!(g.state().applied_modify_index, 40);
        assert!(g.quarantined(&b).is_some());
        assert!(
            g.quarantined(&manifest("b", 'b')).is_none(),
            "other artifact"
        );
        assert!(g.lift(Some(&b)).unwrap().is_none(), "same build keeps it");
        assert!(g.lift(Some(&manifest("c", 'a'))).unwrap().is_some());
        assert!(Guard::open(tmp.path()).state().quarantined.is_none());
    }
}
