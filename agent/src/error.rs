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
    /// The cache or slot filesystem cannot hold the artifact and its unpacked tree.
    #[error(
        "not enough free space on {path}: need {needed} bytes, {free} free; \
         free space (prune old builds or the artifact cache) or raise the disk size"
    )]
    NotEnoughSpace {
        path: PathBuf,
        needed: u64,
        free: u64,
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

    /// The operation was cancelled (shutdown or a newer build); partial downloads are kept.
    #[error("{what} cancelled; a later attempt resumes from the partial download")]
    Cancelled { what: String },
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
