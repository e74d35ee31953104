//! Test servers that the tests and the demo (`cargo run -p testkit --bin demo`) run in-process.
//! They keep everything in memory: when the process dies, they are gone,
//! and nothing of the agent's depends on them.

pub mod artifact;
pub mod consul;
pub mod imds;
pub mod s3;
