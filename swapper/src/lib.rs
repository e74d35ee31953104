//! swapper: hot/cold slot management for deploy-agent. A plain library: no
//! async runtime, no network, no Consul.
//!
//! - [`DeployRoot`]: two slots, a relative `current` symlink, a persisted
//!   state file, ready-markers and an exclusive lock.
//! - Claim ([`DeployRoot::claim_cold`]) invalidates the cold slot's marker
//!   durably before emptying it; [`DeployRoot::mark_ready`] makes the slot
//!   durable with one syncfs(2) and only then writes the marker;
//!   [`DeployRoot::flip_to`] swaps `current` with one rename(2) and refuses
//!   unmarked slots; [`DeployRoot::rollback`] flips back while the other
//!   slot is still valid.
//! - [`DeployRoot::open`] recovers from a crash at any point and adopts an
//!   existing deploy (a plain directory or a Capistrano `releases/` tree).
//! - [`drain`] lists the processes that use a directory and waits for them.
//!
//! If the process dies anywhere inside this crate, `current` still resolves
//! to a complete build that was marked ready, and the next
//! [`DeployRoot::open`] makes the state file agree with it.

pub mod drain;
mod error;
pub mod fsutil;
mod root;
mod slot;
mod state;

pub use error::{Error, Result};
pub use root::{purge_trash, DeployRoot, FlipReport, RecoveryReport};
pub use slot::{validate_build_id, BuildInfo, Marker, Slot};
pub use state::{FlipKind, FlipRecord, State, HISTORY_LEN};
