//! The operator surface: a local HTTP/1.1 API on a Unix socket
//! (`/run/deploy-agent/agent.sock`) serving status, history and metrics and
//! accepting hold/resume/rollback/redeploy, plus the CLI client that talks
//! to it.
//!
//! - [`model`]: the JSON contract and the [`StatusSource`] trait the daemon
//!   implements.
//! - [`metrics`]: a Prometheus text registry the daemon updates.
//! - [`server`]: the bounded socket server; it only reads snapshots and
//!   forwards commands over a bounded channel, so a misbehaving client can
//!   never stall the daemon.
//! - [`client`] and [`render`]: the `deploy-agent status|history|hold|...`
//!   subcommands and their human output.
//!
//! Nothing here is persisted; if the process dies, the socket file is left
//! behind and removed by the next start (after checking no live agent
//! answers on it).

pub mod client;
pub mod metrics;
pub mod model;
pub mod render;
pub mod server;

/// The one exit-code table of the `deploy-agent` binary: host commands
/// (`status`, `hold`, ...), `run`/`check-config`, and the commander's
/// `release`/`fleet` commands all use it, so a code means the same thing
/// whichever command returned it (docs/operating.md, Exit codes).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other failure (bad answer, I/O error, agent or Consul error).
    pub const FAILURE: u8 = 1;
    /// Bad command line or bad config (clap uses 2 as well).
    pub const USAGE: u8 = 2;
    /// Nothing listens on the status socket: the agent is not running (or
    /// went away during `status --watch`).
    pub const NOT_RUNNING: u8 = 3;
    /// The socket's mode or the agent (403) refused this user.
    pub const PERMISSION_DENIED: u8 = 4;
    /// The agent refused the command (e.g. nothing to roll back to).
    pub const REFUSED: u8 = 5;
    /// A release command's check-and-set lost: another commander wrote the
    /// key first.
    pub const CONFLICT: u8 = 6;
    /// `release freeze` while the app is already frozen.
    pub const FROZEN: u8 = 7;
    /// The Consul address answered, but not like Consul.
    pub const NOT_CONSUL: u8 = 8;

    /// Every code, for the distinctness test and the README table check.
    pub const ALL: [u8; 9] = [
        OK,
        FAILURE,
        USAGE,
        NOT_RUNNING,
        PERMISSION_DENIED,
        REFUSED,
        CONFLICT,
        FROZEN,
        NOT_CONSUL,
    ];
}

pub use client::{run_cli, OperatorCommand};
pub use metrics::Metrics;
pub use model::{
    Command, CommandReply, CommandRequest, HistoryEntry, Peer, StatusReport, StatusSource,
};
pub use server::{GroupSpec, SocketSettings, StatusConfig, StatusServer, DEFAULT_SOCKET};
/// Re-exported so the daemon and tests use the same type as [`StatusServer::start`].
pub use tokio_util::sync::CancellationToken;
