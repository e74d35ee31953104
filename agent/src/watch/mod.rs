//! Sources of the desired state: Consul KV (`consul`) and a local file (`file`).
pub mod consul;
pub mod file;
