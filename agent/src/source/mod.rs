//! Where the desired state comes from: a Consul key watched with blocking
//! queries, or a local manifest file. A source holds nothing durable: after
//! a crash it starts again from index 0 (or the file as it is), and the
//! deploy record decides whether the build it reads is new.

pub mod consul;
pub mod file;
