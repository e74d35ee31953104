//! The artifact: the cache that owns its files, the partial download and
//! its in-order reader, the ranged download that fills it, and the sha256
//! that proves it complete. A partial download survives a crash with its
//! sidecar of finished ranges; a file is committed to the cache under its
//! digest only after the digest matched.

pub mod cache;
pub mod download;
pub mod partial;
pub mod sha256;

pub use crate::manifest::{BuildSpec, Format, Sha256Sum};
pub use cache::{free_space_check, unpacked_estimate, ArtifactCache, CachePin};
pub use download::{FetchSettings, RANGE_BACKOFF};
