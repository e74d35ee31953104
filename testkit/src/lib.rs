//! Test-only code, kept out of the packaged `deploy-agent` binary: the
//! Consul-compatible and artifact HTTP servers (with fault injection), the
//! deterministic build generator, the fuzz target bodies and the demo.
//!
//! Nothing here is persisted beyond the files a caller asks for: the
//! servers keep their state in memory, and the build generator writes each
//! artifact under a temp name renamed into place, so a process that dies
//! midway leaves no half-written artifact under its final name.

pub mod buildgen;
pub mod demo;
pub mod fuzzing;
pub mod testserver;
