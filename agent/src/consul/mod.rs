//! The Consul KV client the agent (source/), the fleet member and the
//! commander (fleet/) share: settings, the client, and the key rules.
//! Nothing here writes to disk; see each module for what a crash mid-request
//! leaves in Consul.

pub mod client;
pub mod keys;
pub mod settings;

use std::time::Duration;

pub use client::{ConsulClient, KvPair, KvRead, QueryOptions};
pub use keys::validate_key;
pub use settings::ConsulSettings;

/// Largest value Consul stores (`kv_max_value_size`), docs/consul-watch-rules.md rule 15.
pub const MAX_VALUE_SIZE: usize = 512 * 1024;
/// Consul caps `wait` at 10 minutes (rule 2).
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Largest JSON body read for a single key: a 512 KiB value is ~700 KiB of
/// base64 plus a little JSON.
pub(crate) const MAX_SINGLE_BODY: usize = 1024 * 1024;
/// Largest body read for a prefix listing.
pub(crate) const MAX_LIST_BODY: usize = 64 * 1024 * 1024;
/// TCP (and TLS) connect timeout: the agent is local, so a slow connect
/// means it is down.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
