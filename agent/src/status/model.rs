//! The status contract between the daemon and everything that reads it: the
//! JSON served on `GET /v1/status` and `GET /v1/history`, the commands the
//! socket forwards to the daemon, and the trait the daemon implements.
//!
//! These are plain in-memory snapshots; nothing here is persisted, so a
//! crash loses nothing that the daemon's own state file does not hold.
//!
//! Times are unix seconds (UTC) everywhere, in fields named `*_unix`, so the
//! CLI and scripts can do arithmetic without parsing dates.
//! Every field has a default and unknown fields are ignored, so an older CLI
//! can read a newer agent's report and the other way round.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// How many entries `GET /v1/history` returns at most.
pub const HISTORY_LIMIT: usize = 50;

/// Everything `GET /v1/status` reports: one consistent snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StatusReport {
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Seconds since the agent started.
    pub uptime_seconds: u64,
    /// The build the host should be on, and where that came from.
    pub desired: Option<DesiredBuild>,
    /// The slot `current` points at.
    pub hot: Option<SlotInfo>,
    /// The other slot, where the next build is unpacked.
    pub cold: Option<SlotInfo>,
    /// The agent's state: why it is or is not deploying (`held`,
    /// `frozen`, `retry-wait`, ...), with who and when.
    pub state: AgentState,
    /// What the deploy is doing now.
    pub phase: Phase,
    /// When the current phase was entered.
    pub phase_since_unix: Option<u64>,
    /// Progress of the current phase (downloading, unpacking).
    pub progress: Option<ProgressInfo>,
    /// Processes the drain is waiting on (phase `draining`, or the cold slot
    /// still in use in `waiting-for-cold-slot`).
    pub drain_holders: Vec<DrainHolder>,
    /// The most recent error, kept until a deploy succeeds.
    pub last_error: Option<LastError>,
    /// The Consul watch, when the desired build comes from Consul.
    pub consul: Option<ConsulInfo>,
    /// Whether deploys are held by an operator.
    pub hold: HoldState,
    /// Fleet membership: rollout bucket and decision, freeze.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetInfo>,
}

impl StatusReport {
    /// A report with this crate's version and everything else empty; the
    /// daemon fills in the rest.
    pub fn new(uptime_seconds: u64) -> Self {
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds,
            ..StatusReport::default()
        }
    }
}

/// The desired build and its origin.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DesiredBuild {
    /// Build id, e.g. `web-2026.11.26-1`.
    pub build: String,
    /// Expected sha256 of the artifact (hex), if the manifest names one.
    pub sha256: Option<String>,
    /// Where the manifest came from.
    pub source: Source,
    /// Consul's `ModifyIndex` of the key, when from Consul.
    pub modify_index: Option<u64>,
}

/// Where the desired build was read from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Source {
    /// `consul` or `file`.
    pub kind: SourceKind,
    /// `http://127.0.0.1:8500` key path for Consul, the file path otherwise.
    pub location: String,
}

impl std::fmt::Display for Source {
    /// `consul:<address>/<key>` or `file:<path>`, for logs and errors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            SourceKind::Consul => "consul",
            SourceKind::File => "file",
        };
        write!(f, "{kind}:{}", self.location)
    }
}

/// Kinds of manifest sources.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    #[default]
    Consul,
    File,
}

/// One slot as the status shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SlotInfo {
    /// Slot name (`a` / `b`).
    pub name: String,
    /// Build in the slot, if it carries a valid ready-marker.
    pub build: Option<String>,
    /// Without a valid marker: bytes the slot still holds (a failed or
    /// interrupted deploy's leftovers, cleared by the next deploy).
    pub unmarked_bytes: Option<u64>,
    /// Artifact sha256 recorded in the marker.
    pub sha256: Option<String>,
    /// When the ready-marker was written.
    pub marked_unix: Option<u64>,
    /// The slot's last check against its record (issue 20): intact, or
    /// which paths were modified, added or missing since the deploy, and
    /// how its unchanged files were made (written, reflink, copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integrity: Option<crate::integrity::SlotCheck>,
}

/// The phases and outcomes of a deploy: one vocabulary, defined by the
/// per-deploy state machine and shown on the wire as is.
/// What `status` shows about the fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetInfo {
    pub host_id: String,
    pub tier: Option<String>,
    /// The rollout bucket in `[0, 100)` under the last manifest.
    pub bucket: Option<f64>,
    pub percent: Option<f64>,
    /// `all`, `new`, `previous` or `stay`.
    pub choice: Option<String>,
    /// The build the decision names.
    pub decided_build: Option<String>,
    pub frozen: bool,
    pub freeze_key: Option<String>,
    pub report_key: Option<String>,
    /// Why the freeze watch is failing, while it is (with its time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_error: Option<String>,
    /// Why the last host report could not be written, until one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_error: Option<String>,
}

pub use crate::deploy::{Outcome, Phase};

/// The agent's own state (idle, deploying, retry-wait, held, frozen).
pub use crate::control::{AgentState, HistoryEntry, HistoryKind};

/// Progress of a byte- or entry-counting phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ProgressInfo {
    pub bytes_done: u64,
    /// Unknown until the manifest names a size.
    pub bytes_total: Option<u64>,
    /// Recent throughput, bytes per second.
    pub rate_bytes_per_sec: Option<u64>,
    /// Seconds left at the current rate.
    pub eta_seconds: Option<u64>,
    /// Archive entries written so far (unpacking).
    pub entries: Option<u64>,
}

/// A process that keeps the drain (or the cold slot) busy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DrainHolder {
    pub pid: i32,
    /// `comm` or the first words of the command line.
    pub command: String,
    /// How it holds the slot: `cwd`, `open file <path>`, `mmap <path>`, ...
    pub how: String,
}

/// The last error and when it happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LastError {
    pub message: String,
    pub at_unix: u64,
    /// The build it belongs to, when it belongs to one.
    pub build: Option<String>,
    /// `false` once something later succeeded (a deploy, or the watch
    /// answering again): the error is history, not the reason for
    /// anything now.
    pub current: bool,
}

/// Health of the Consul watch.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ConsulInfo {
    pub address: String,
    pub key: String,
    /// `X-Consul-Index` of the last successful blocking query.
    pub last_index: Option<u64>,
    /// Milliseconds since Consul last answered successfully.
    pub last_contact_ms: Option<u64>,
    /// Failed requests in a row (0 when healthy).
    pub consecutive_errors: u32,
    /// The error of the last failed request, while the watch is failing.
    pub last_error: Option<LastError>,
}

/// The operator hold: while held, the daemon does not start new deploys.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HoldState {
    pub held: bool,
    pub reason: Option<String>,
    pub since_unix: Option<u64>,
    /// Uid of the peer that asked for the hold.
    pub by_uid: Option<u32>,
}

/// What the daemon exposes to the status socket. Implementations must be
/// cheap and must not block: they are called on the socket's async tasks
/// (take a snapshot under a short lock, never wait on the deploy).
pub trait StatusSource: Send + Sync + 'static {
    /// A snapshot of the current state.
    fn status(&self) -> StatusReport;
    /// The most recent deploys, newest first; the server truncates to
    /// [`HISTORY_LIMIT`].
    fn history(&self) -> Vec<HistoryEntry>;
    /// Prometheus text exposition, usually
    /// [`Metrics::render`](super::metrics::Metrics::render).
    fn metrics(&self) -> String;
}

/// A mutating request from an operator, forwarded to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Stop acting on new manifests until resumed; a running deploy stops at
    /// its next safe point.
    Hold { reason: String },
    /// Lift the hold.
    Resume,
    /// Flip back to the previous build in the cold slot.
    Rollback,
    /// Run the desired build's deploy again (e.g. after a failure).
    Redeploy,
    /// Check the live slot against its record; `full` hashes every file.
    Verify { full: bool },
}

impl Command {
    /// Name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Hold { .. } => "hold",
            Command::Resume => "resume",
            Command::Rollback => "rollback",
            Command::Redeploy => "redeploy",
            Command::Verify { .. } => "verify",
        }
    }
}

/// Who sent a request, from `SO_PEERCRED` at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// The daemon's answer to a [`Command`]: `Ok(details)` is sent to the client
/// as `200 {"ok": true, "result": details}`, `Err(why)` as
/// `409 {"error": why}` (the CLI exits 5).
pub type CommandReply = Result<serde_json::Value, String>;

/// One command on its way to the daemon.
#[derive(Debug)]
pub struct CommandRequest {
    pub command: Command,
    pub peer: Peer,
    /// Answer here; dropping it tells the client the agent did not answer.
    pub reply: oneshot::Sender<CommandReply>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_match_serde() {
        for p in Phase::ALL {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
        }
        for o in Outcome::ALL {
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(json, format!("\"{}\"", o.as_str()));
        }
    }

    #[test]
    fn report_round_trips_and_tolerates_missing_and_unknown_fields() {
        let mut r = StatusReport::new(5);
        r.phase = Phase::Downloading;
        r.hold.held = true;
        let back: StatusReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let partial: StatusReport =
            serde_json::from_str(r#"{"phase":"draining","future_field":1}"#).unwrap();
        assert_eq!(partial.phase, Phase::Draining);
        assert!(!partial.hold.held);
    }
}
