//! Wall-clock time for records, reports and the status socket: the one
//! place the agent reads `SystemTime`. Durations and timers use
//! `tokio::time` instead, so a paused test clock steers them; nothing here
//! holds state, so a crash loses nothing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 if the clock is before 1970 (a host
/// that has never synced its clock: a wrong time in a record is better
/// than a panic).
pub fn now_secs() -> u64 {
    since_epoch().map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970.
pub fn now_ms() -> u64 {
    since_epoch().map_or(0, |d| d.as_millis() as u64)
}

fn since_epoch() -> Option<std::time::Duration> {
    SystemTime::now().duration_since(UNIX_EPOCH).ok()
}
