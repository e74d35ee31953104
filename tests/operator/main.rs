//! What operators and release engineers touch: the CLI and the status socket, the control path,
//! intent across restarts, the docs' promises, the package and the demo.
//!
//! One test binary for the area (docs/testing.md); each file is a module. Nothing
//! persists between tests: each uses its own temp dirs, servers and processes.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod commands;
mod decisions;
mod demo;
mod fuzz_smoke;
mod intent;
mod package;
mod readme;
mod registered;
mod shipped_binary;
mod status_socket;
mod surfaces;
mod systemd_unit;
