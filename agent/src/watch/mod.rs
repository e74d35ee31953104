//! Sources of the desired state: Consul KV (`consul`) and a local file (`file`).
//!
//! Both only read: if the process dies, nothing is lost; the next start
//! reads the current value again and the deploy state machine decides
//! whether anything is left to do.

pub mod consul;
pub mod file;
