//! The agent's one error type. Every variant names what it concerns (path,
//! URL, key, build) and its message says what the operator should do next.
//! Errors carry no state of their own, so nothing here matters on a crash.

use std::path::PathBuf;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("deploy root: {0}")]
    Swapper(#[from] swapper::Error),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    // ---- watch / consul (watch/*, testserver/consul.rs) ----
    /// The Consul agent could not be reached or the connection broke.
    #[error("Consul request to {url} failed: {message}; check CONSUL_HTTP_ADDR and that the local Consul agent is running")]
    ConsulConnect { url: String, message: String },

    /// No answer within the per-request timeout (wait * 17/16 + margin).
    #[error("Consul request to {url} timed out after {timeout:?}; check the local Consul agent and any proxy idle timeout on the path")]
    ConsulTimeout {
        url: String,
        timeout: std::time::Duration,
    },

    /// 403: the ACL token is missing, unknown or lacks permission.
    #[error("Consul refused {url} with 403 ({body}): check the ACL token (config, CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE) has key:read on {key}")]
    ConsulForbidden {
        url: String,
        key: String,
        body: String,
    },

    /// 429: the agent's rate limit is hit; the watch retries soon.
    #[error("Consul rate-limited {url} (429); the agent's limits (limits.http_max_conns_per_client, rpc_rate) are too low for this host")]
    ConsulRateLimited { url: String },

    /// Any other unexpected status (5xx, 400, ...).
    #[error("Consul answered {status} for {url}: {body}; check the Consul agent's logs")]
    ConsulStatus {
        url: String,
        status: u16,
        body: String,
    },

    /// A 200 whose body or headers we cannot decode.
    #[error("Consul answered {url} with something undecodable: {message}; is CONSUL_HTTP_ADDR really a Consul agent?")]
    ConsulDecode { url: String, message: String },

    /// A key name outside `[A-Za-z0-9._/-]`, with a leading `/` or `..`.
    #[error("invalid Consul key {key:?}: {reason}; use only A-Z a-z 0-9 . _ / - without a leading / or ..")]
    ConsulKey { key: String, reason: &'static str },

    /// A value over Consul's 512 KiB limit.
    #[error("Consul value for {key} is {size} bytes, over the 512 KiB Consul accepts; publish a smaller manifest")]
    ConsulValueTooLarge { key: String, size: usize },

    /// Settings that cannot work (bad address, unreadable token file or
    /// certificate, ...).
    #[error("Consul setting {setting}: {message}")]
    ConsulConfig { setting: String, message: String },

    /// The local file source could not be watched.
    #[error("cannot watch {path}: {message}; check the directory exists and is readable")]
    WatchFile { path: PathBuf, message: String },
    // ---- fetch / verify / unpack (fetch.rs, verify.rs, unpack.rs, testserver/artifact.rs) ----

    // ---- config / manifest / deploy / daemon ----
}

/// Result with the agent's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
