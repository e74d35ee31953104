//! The artifact: a ranged, resumable download into the artifact cache and
//! the sha256 that proves it complete. A partial download survives a crash
//! with its sidecar of finished ranges; a file is committed to the cache
//! under its digest only after the digest matched.

pub mod fetch;
pub mod sha256;
