//! The swapper library under real processes and files: flips that readers never see half-done,
//! crash safety at every step, the deploy root's rules and recovery, drain detection.
//!
//! One test binary for the area (docs/testing.md); each file is a module. Nothing
//! persists between tests: each uses its own temp dirs, servers and processes.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod atomicity;
mod crash;
mod drain;
mod root;
