//! Wall-clock time for records, reports and the status socket (the one
//! place the agent reads `SystemTime`), and durations as people read them. Durations and timers use
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

/// `45s`, `4m05s`, `3h12m`, `2d04h`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A duration for messages, to the precision a reader can use: `250ms`,
/// `2.5s`, `30s`, `4m05s`, `3h12m` (never `2.521672156s`).
pub fn human_duration(d: std::time::Duration) -> String {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 60_000 {
        // Tenths, rounded; a whole number of seconds has no `.0`.
        let tenths = (ms + 50) / 100;
        return if tenths % 10 == 0 {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        };
    }
    duration(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_are_rounded() {
        use std::time::Duration;
        assert_eq!(human_duration(Duration::from_nanos(2_521_672_156)), "2.5s");
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_secs(2)), "2s");
        assert_eq!(human_duration(Duration::from_millis(59_990)), "60s");
        assert_eq!(human_duration(Duration::from_secs(245)), "4m05s");
    }
}
