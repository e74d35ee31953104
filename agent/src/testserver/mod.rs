//! Test servers that the tests and `deploy-agent demo` run in-process.

pub mod artifact;
pub mod consul;
