//! Fleets of real agents: release commands against one in-process agent, and 20 real agents
//! in their own network and mount namespaces.
//!
//! One test binary for the area (docs/testing.md); each file is a module. Nothing
//! persists between tests: each uses its own temp dirs, servers and processes.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod namespaces;
mod release;
