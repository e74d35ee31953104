//! deploy-agent keeps one host on the build its Consul key names.
//!
//! The pipeline, one module per stage:
//!
//! `watch` (Consul blocking queries, or a local file) -> `manifest` (parse and
//! validate the desired state) -> `fetch` (parallel ranged download into the
//! artifact cache, resumable) -> `verify` (size and sha256 while the bytes
//! stream) -> `unpack` (safe streaming tar into the claimed cold slot) ->
//! `drain` (wait for processes, run hooks) -> flip (in the `swapper` crate) ->
//! `status` (local socket, history, metrics).
//!
//! `fleet` makes the host a member of a fleet: tier keys, the percentage
//! rollout decided on each host, splay, host reports, the freeze key, and
//! the commander's `release` and `fleet status` commands.
//!
//! `deploy` holds the state machine that drives one deploy through these
//! stages; `daemon` is the long-running loop that feeds it manifests.
//!
//! Crash guarantees come from `swapper`: the cold slot's ready-marker is
//! removed before the slot is touched and written only after its contents
//! are durable and verified, so a build that was interrupted anywhere is
//! never served.

pub mod artifact;
pub mod clock;
pub mod config;
pub mod consul;
pub mod control;
pub mod daemon;
pub mod deploy;
pub mod error;
pub mod exit;
pub mod fleet;
pub mod integrity;
pub mod logging;
pub mod manifest;
pub mod pacing;
pub mod progress;
pub mod redact;
pub mod sign;
pub mod source;
pub mod status;
pub mod store;
pub mod unpack;

pub use error::{Error, Result};
