//! The persisted state file (`.deploy/state.json`): which slot is hot, which
//! build each slot holds, and a short flip history.
//!
//! It is a cache of the truth, which is `current` plus the ready-markers:
//! written atomically after every change, and repaired from the truth by
//! recovery when a crash left it behind.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::slot::{Marker, Slot};

/// How many flips the state file remembers.
pub const HISTORY_LEN: usize = 20;

/// The persisted state of a deploy root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct State {
    pub version: u32,
    /// The slot `current` points at, if any build was ever made live.
    pub hot: Option<Slot>,
    /// The marker of slot A, if it holds a valid build.
    pub slot_a: Option<Marker>,
    /// The marker of slot B, if it holds a valid build.
    pub slot_b: Option<Marker>,
    /// Most recent flips, newest last.
    pub history: VecDeque<FlipRecord>,
}

/// Why a flip happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlipKind {
    Deploy,
    Rollback,
    Recovery,
    Adopt,
}

/// One flip, as remembered in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlipRecord {
    pub at: u64,
    pub kind: FlipKind,
    pub from: Option<Slot>,
    pub to: Slot,
    pub build_id: String,
}

impl State {
    pub(crate) const VERSION: u32 = 1;

    /// The marker held for `slot` (in memory).
    pub fn marker(&self, slot: Slot) -> Option<&Marker> {
        match slot {
            Slot::A => self.slot_a.as_ref(),
            Slot::B => self.slot_b.as_ref(),
        }
    }

    /// Sets the marker held for `slot` (in memory only).
    pub(crate) fn set_marker(&mut self, slot: Slot, marker: Option<Marker>) {
        match slot {
            Slot::A => self.slot_a = marker,
            Slot::B => self.slot_b = marker,
        }
    }

    /// Appends a flip to the history (in memory only), keeping it short.
    pub(crate) fn record(&mut self, rec: FlipRecord) {
        self.history.push_back(rec);
        while self.history.len() > HISTORY_LEN {
            self.history.pop_front();
        }
    }
}
