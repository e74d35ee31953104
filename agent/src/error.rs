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
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),

    #[error("rejected manifest from {source_name}: {error}; fix the published value, the current build keeps serving")]
    Manifest {
        source_name: String,
        #[source]
        error: crate::manifest::ManifestError,
    },

    #[error("hook {name} {reason}; output: {output:?}")]
    Hook {
        name: String,
        reason: String,
        output: String,
    },

    #[error("drain condition ({what}) did not hold within {waited:?}; the flip was not done, check the workers or raise drain.hot-deadline")]
    DrainCondition { what: String, waited: std::time::Duration },

    #[error("deploy of {build} cancelled: {reason}")]
    Cancelled { build: String, reason: String },

    #[error("invalid phase transition: {event} in phase {phase}; this is a bug, report it")]
    Transition { phase: String, event: String },

    #[error("internal error: {0}")]
    Internal(String),
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
