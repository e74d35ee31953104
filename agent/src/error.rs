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

    // ---- status / operator ----
    #[error(
        "status socket {path} is answered by a running agent; stop it first \
         (systemctl stop deploy-agent) or configure another socket path"
    )]
    StatusSocketInUse { path: PathBuf },

    #[error(
        "status socket path {path} exists and is not a socket; remove it or configure another path"
    )]
    StatusSocketNotSocket { path: PathBuf },

    #[error("cannot set up status socket {path}: {source}")]
    StatusSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("group {group:?} does not exist; create it (groupadd {group}) or fix the status socket config")]
    UnknownGroup { group: String },

    #[error("cannot set up logging: {detail}")]
    Logging { detail: String },

    #[error(
        "the deploy agent is not running: nothing answers on {path} ({reason}); \
         check `systemctl status deploy-agent` and `journalctl -u deploy-agent`"
    )]
    AgentNotRunning { path: PathBuf, reason: String },

    #[error("permission denied on {path}: {hint}, or run the command with sudo")]
    SocketPermissionDenied { path: PathBuf, hint: String },

    #[error("{message}")]
    Forbidden { message: String },

    #[error("the agent refused {command}: {message}")]
    AgentRefused { command: String, message: String },

    #[error("the agent answered {command} with HTTP {status}: {message}")]
    AgentFailed {
        command: String,
        status: u16,
        message: String,
    },

    #[error("bad answer from the agent on {path}: {detail}; is another program listening there?")]
    AgentProtocol { path: PathBuf, detail: String },
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
