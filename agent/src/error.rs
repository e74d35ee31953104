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
