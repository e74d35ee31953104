//! The fault matrix: each fault keeps the live build serving, grows nothing, shows its error
//! in status and the log, and the next good build deploys.
//!
//! One test binary for the area (docs/testing.md); each file is a module. Nothing
//! persists between tests: each uses its own temp dirs, servers and processes.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod archive;
mod artifact;
mod consul;
mod disk;
mod kill;
mod lock;
mod manifest;
mod socket;
