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

    /// The agent's control state file (`.deploy/agent.json`) cannot be
    /// read or written.
    #[error("agent state file {path}: {message}")]
    StateFile { path: PathBuf, message: String },

    // ---- watch / consul (watch/*, testserver/consul.rs) ----
    /// The Consul agent could not be reached or the connection broke.
    #[error("Consul request to {url} failed: {message}; check CONSUL_HTTP_ADDR and that the local Consul agent is running")]
    ConsulConnect { url: String, message: String },

    /// No answer within the per-request timeout (wait * 17/16 + margin).
    #[error("Consul request to {url} timed out after {}; check the local Consul agent and any proxy idle timeout on the path", crate::clock::human_duration(*timeout))]
    ConsulTimeout {
        url: String,
        timeout: std::time::Duration,
    },

    /// 403: the ACL token is missing, unknown or lacks permission.
    #[error("Consul refused {url} with 403 ({body}): check the ACL token (config token/token-file, CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE) has {permission} on {key}")]
    ConsulForbidden {
        url: String,
        key: String,
        body: String,
        /// The permission this request needs (`key:read`, `key:write`, ...).
        permission: &'static str,
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

    /// The manifest source holds something that cannot be a manifest.
    #[error("manifest from {source_name} rejected: {reason}")]
    ManifestSource { source_name: String, reason: String },

    /// The local file source could not be watched.
    #[error("cannot watch {path}: {message}; check the directory exists and is readable")]
    WatchFile { path: PathBuf, message: String },
    // ---- fetch / verify / unpack (fetch.rs, verify.rs, unpack.rs, testserver/artifact.rs) ----
    /// The cache or slot filesystem cannot hold the artifact and its unpacked tree.
    /// `reclaimable` is what the agent's own leftovers (a failed deploy's
    /// cold slot, the trash, unused partial downloads) would add: it is
    /// counted and cleared before this error is raised.
    #[error(
        "not enough free space on {path}: need {needed} bytes, {free} free and {reclaimable} \
         more in the agent's own leftovers (cleared automatically); free space outside the \
         agent's directories or raise the disk size: the next retry notices"
    )]
    NotEnoughSpace {
        path: PathBuf,
        needed: u64,
        free: u64,
        reclaimable: u64,
    },

    /// Every mirror failed (network errors, timeouts, HTTP errors) after retries.
    /// The `.partial` file is kept so the next attempt resumes.
    #[error(
        "download of artifact {sha256} failed from every mirror; last error from {url}: {reason}; \
         check the mirrors are reachable and serve the build, the next attempt resumes"
    )]
    Download {
        sha256: String,
        url: String,
        reason: String,
    },

    // ---- S3-compatible object stores (store/*, testserver/s3.rs) ----
    /// The store refused the request (403): wrong secret, a policy without
    /// the permission, a bucket policy, or a credential it does not know.
    #[error(
        "{object}: the object store refused {action} ({detail}) for {identity}; check that \
         this identity's policy grants {permission} on the object (arn:aws:s3:::bucket/prefix/*) \
         and that its secret key is the one the store has"
    )]
    StoreDenied {
        object: String,
        action: &'static str,
        /// `HTTP 403 <Code> <Message>` as the store sent them.
        detail: String,
        /// `access key AKIA… from <source>` (the key id is not a secret).
        identity: String,
        permission: &'static str,
    },

    /// 404: no such bucket or key.
    #[error("{object}: the object store has no such {what} ({code}); check the bucket and key in the manifest and that the build was uploaded (`deploy-agent release publish --upload`)")]
    StoreNotFound {
        object: String,
        what: &'static str,
        code: String,
    },

    /// The bucket lives in another region than the one requests are signed for.
    #[error("{object}: the bucket is not in region {region} ({detail}); set [store] region (or AWS_REGION) to the bucket's region")]
    StoreWrongRegion {
        object: String,
        region: String,
        detail: String,
    },

    /// No credentials could be had from the source the chain chose.
    #[error("object store credentials from {source_name}: {reason}; {fix}")]
    StoreCredentials {
        source_name: String,
        reason: String,
        fix: &'static str,
    },

    /// Any other failed request to the store (network, 5xx after retries,
    /// an answer that cannot be read).
    #[error("object store request {action} {object} failed: {reason}; check [store] endpoint (or AWS_ENDPOINT_URL_S3) and that the store is reachable")]
    StoreRequest {
        object: String,
        action: &'static str,
        reason: String,
    },

    /// An `s3://` URL that cannot name an object, or a `[store]` setting
    /// that cannot work.
    #[error("object store setting {setting}: {reason}")]
    StoreSetting { setting: String, reason: String },

    /// A server announced or delivered a size other than the manifest's.
    #[error(
        "size mismatch for {url}: expected {expected} bytes, server has {actual}; \
         the mirror serves a different file than the manifest names, fix the manifest or the mirror"
    )]
    SizeMismatch {
        url: String,
        expected: u64,
        actual: u64,
    },

    /// The downloaded (or cached) bytes do not hash to the manifest's sha256.
    /// The partial / cached file has been deleted.
    #[error(
        "checksum mismatch for {url}: expected sha256 {expected}, calculated {calculated}; \
         the download was deleted; check the mirror's file and the manifest's digest"
    )]
    ChecksumFailed {
        url: String,
        expected: String,
        calculated: String,
    },

    /// The archive tries something a build must never do (escape the slot,
    /// create devices, ...). The whole slot is garbage.
    #[error(
        "refusing archive unpacked into {slot}: entry {entry:?} {reason}; \
         the build artifact is unsafe, rebuild it"
    )]
    UnsafeArchive {
        slot: PathBuf,
        entry: String,
        reason: String,
    },

    /// The archive exceeds the configured entry count or unpacked size.
    #[error(
        "archive unpacked into {slot} exceeds the {what} limit of {limit}; \
         raise the unpack limits in the config if the build really is this large"
    )]
    ArchiveTooLarge {
        slot: PathBuf,
        what: &'static str,
        limit: u64,
    },

    /// The archive stream is corrupt (bad compression or tar framing).
    #[error("corrupt archive unpacking into {slot}: {source}; the build artifact is damaged, rebuild it")]
    CorruptArchive {
        slot: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The artifact spec itself is unusable (no URLs, bad digest, file URL not allowed).
    #[error("invalid artifact spec: {reason}; fix the manifest")]
    InvalidArtifact { reason: String },

    /// A delta artifact that does not fit: made for another base or target,
    /// or malformed. The agent downloads the full artifact instead.
    #[error("delta artifact refused: {reason}; using the full artifact")]
    DeltaRefused { reason: String },

    /// The publisher's file index of a build cannot be used. The deploy
    /// goes on; the slot's digests are hashed after it instead.
    #[error("file index {} refused: {reason}; hashing the slot instead", path.display())]
    FileIndexRefused { path: PathBuf, reason: String },

    /// A file the delta would reuse from its base (a slot, or the base's
    /// cached artifact) is not the base build's any more (edited in place):
    /// the delta is not used.
    #[error("delta base file {path} is not the base build's ({why}); using the full artifact instead of the delta")]
    DeltaBaseChanged { path: PathBuf, why: String },

    /// A slot's record (`.deploy/slot-?.record`) cannot be read or written.
    #[error(
        "slot record {path}: {reason}; the slot's build can no longer be proven intact, so it \
         is rebuilt from its artifact before it serves again (or run `deploy-agent redeploy`)"
    )]
    SlotRecord { path: PathBuf, reason: String },

    /// A slot no longer holds exactly the build its record describes (a
    /// file written, replaced, added or removed since it was deployed).
    #[error(
        "{slot} no longer holds exactly build {build}: {summary}; not flipping to it as it is: \
         publish {build} again (`deploy-agent release rollback`, or set the key back) and the \
         agent rebuilds the slot from its artifact before flipping"
    )]
    SlotDrift {
        slot: String,
        build: String,
        summary: String,
    },

    /// The freeze could not be read right before a flip: the flip does not
    /// happen, and the deploy is retried.
    #[error("not flipping to {build}: cannot confirm the fleet freeze ({message}); the deploy is retried")]
    FreezeUnconfirmed { build: String, message: String },

    /// The operation was cancelled (shutdown or a newer build); partial downloads are kept.
    #[error("{what} cancelled; a later attempt resumes from the partial download")]
    Cancelled { what: String },
    // ---- config / manifest / deploy / daemon ----
    /// The config file cannot be read.
    #[error("cannot read config {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The config file (or a setting derived from it) is invalid.
    #[error("config {path}: {message}")]
    ConfigInvalid { path: PathBuf, message: String },

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

    #[error("drain condition ({what}) did not hold within {}; the flip was not done, check the workers or raise drain.hot-deadline", crate::clock::human_duration(*waited))]
    DrainCondition {
        what: String,
        waited: std::time::Duration,
    },

    #[error("invalid phase transition: {event} in phase {phase}; this is a bug, report it")]
    Transition { phase: String, event: String },

    #[error("internal error: {0}")]
    Internal(String),

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

    /// The agent closed the connection before it had read the whole
    /// command (its parts restart on a config reload): nothing was run.
    #[error("the agent on {} closed the connection before reading the command ({source}); it was not run", path.display())]
    CommandNotRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("permission denied on {path}: {hint}, or run the command with sudo")]
    SocketPermissionDenied { path: PathBuf, hint: String },

    /// The socket (or its directory) belongs to group root: joining a
    /// group cannot help, only root may connect.
    #[error(
        "permission denied on {path}: only root may connect (it belongs to group root); \
         run the command with sudo, or ask for a socket-group in the agent's [status] config"
    )]
    SocketRootOnly { path: PathBuf },

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

    // ---- reliability: health gate, quarantine, signing (health.rs, guard.rs, sign.rs) ----
    /// The build failed its health check and the agent flipped back.
    #[error(
        "build {build} failed its health check ({reason}); rolled back to {rolled_back_to} and \
         quarantined {build} on this host: fix the build and publish a new one, or run \
         `deploy-agent redeploy` to try it again"
    )]
    HealthCheckFailed {
        build: String,
        reason: String,
        rolled_back_to: String,
    },

    /// The build failed its health check and there was nothing to flip back to.
    #[error(
        "build {build} failed its health check ({reason}) but cannot be rolled back: {why}; \
         it keeps serving and is quarantined: publish a fixed build, or run \
         `deploy-agent redeploy` to try it again"
    )]
    HealthRollbackImpossible {
        build: String,
        reason: String,
        why: String,
    },

    /// The desired build is quarantined here after a failed health check.
    #[error(
        "build {build} is quarantined on this host since it failed its health check ({reason}); \
         not deploying it again: publish a different build, or run `deploy-agent redeploy` to retry it"
    )]
    Quarantined { build: String, reason: String },

    /// A signing key file is missing, malformed or cannot be created.
    #[error("signing key {path}: {reason}; create one with `deploy-agent keygen --out <file>`")]
    SigningKey { path: PathBuf, reason: String },

    /// `deploy-agent sign` was given something that is not a valid manifest.
    #[error("cannot sign: {reason}; fix the manifest first")]
    Sign { reason: String },
    // ---- fleet (fleet/*) ----
    /// A release command's check-and-set lost: someone else wrote the key.
    #[error("{key} changed while this command was running (it is no longer at ModifyIndex {expected}): another commander wrote it; run `deploy-agent release show`, then retry")]
    ReleaseConflict { key: String, expected: u64 },

    /// The check-and-set write went through but stored the value already
    /// there: an identical write by someone else came first.
    #[error("{key} already held exactly this value (index {index}, written by an identical command that came first); this command changed nothing")]
    ReleaseNoChange { key: String, index: u64 },

    /// promote/rollback with nothing published.
    #[error("nothing is published at {key}: run `deploy-agent release publish` first")]
    ReleaseMissing { key: String },

    /// A release command that would write a manifest agents reject, or one
    /// that cannot apply to what is published.
    #[error("release {key}: {reason}")]
    ReleaseInvalid { key: String, reason: String },

    /// `fleet serve` cannot listen where asked.
    #[error("fleet page: cannot listen on {addr}: {reason}")]
    FleetPageListen { addr: String, reason: String },

    /// An answer from the Consul address that Consul would never give (a
    /// KV read without `X-Consul-Index`): the address is some other server.
    #[error(
        "{url} did not answer like a Consul agent ({detail}); check --consul, \
         CONSUL_HTTP_ADDR or [consul] address: it must be the HTTP API of a Consul agent"
    )]
    NotConsul { url: String, detail: String },

    /// `release freeze` while a freeze is already in place.
    #[error("{key} is already frozen ({detail}); `deploy-agent release unfreeze` lifts it")]
    ReleaseFrozen { key: String, detail: String },
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
