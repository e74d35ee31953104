//! The long real-system suites: hosts as containers under a real systemd, the self-healing
//! soak, the fleet page in a real browser, and randomized intent on real agents.
//!
//! One test binary for the area (docs/testing.md); each file is a module. Nothing
//! persists between tests: each uses its own temp dirs, servers and processes.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod browser;
mod containers;
mod intent_random;
mod soak;
