//! The agent's pipeline, stage by stage and end to end: the Consul watch (and the test server it
//! runs against), fetch, unpack, delta, the deploy itself, sd_notify and the real process,
//! the health gate and signatures.
//!
//! One test binary for the area (docs/testing.md); each file is a module. Nothing
//! persists between tests: each uses its own temp dirs, servers and processes.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod consul_reference;
mod consul_wakeups;
mod delta;
mod e2e;
mod fetch;
mod file_index;
mod notify;
mod object_store;
mod process;
mod reliability;
mod slot_integrity;
mod unpack;
mod watch;
