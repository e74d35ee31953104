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

pub use client::{run_cli, OperatorCommand};
pub use metrics::Metrics;
pub use model::{
    Command, CommandReply, CommandRequest, HistoryEntry, Peer, StatusReport, StatusSource,
};
pub use server::{SocketSettings, StatusServer, DEFAULT_SOCKET};
/// Re-exported so the daemon and tests use the same type as [`StatusServer::start`].
pub use tokio_util::sync::CancellationToken;
