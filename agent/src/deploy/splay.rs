//! The splay: a random wait before a download so a fleet that sees a new
//! key in the same second does not hit the artifact server in that second.
//!
//! The wait is uniform in `[1 ms, max]` and cancellable; a build already in the
//! cold slot or the cache needs no download and skips it (a rollback is
//! instant). Nothing is persisted: a restart simply draws a new delay.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// A uniformly random delay of 1 ms to `max` (zero when `max` is zero):
/// never zero otherwise, so that a fleet member's download deploys always
/// pass through phase `splay` and status and history show it.
pub fn delay(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let ms = max.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(1..=ms.max(1)))
}

/// Waits `d` (a [`delay`]); returns `false` when cancelled first.
pub async fn wait(d: Duration, build: &str, cancel: &CancellationToken) -> bool {
    if d.is_zero() {
        return true;
    }
    info!(
        build,
        splay_ms = d.as_millis() as u64,
        "splay before download"
    );
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_below_the_maximum_and_spread() {
        assert_eq!(delay(Duration::ZERO), Duration::ZERO);
        let max = Duration::from_secs(10);
        let ds: Vec<Duration> = (0..1000).map(|_| delay(max)).collect();
        assert!(ds.iter().all(|d| !d.is_zero() && *d <= max));
        assert_eq!(delay(Duration::from_millis(1)), Duration::from_millis(1));
        let early = ds.iter().filter(|d| **d < max / 2).count();
        assert!(
            (350..650).contains(&early),
            "{early} of 1000 in the first half"
        );
    }

    #[tokio::test]
    async fn cancel_ends_the_wait() {
        let c = CancellationToken::new();
        c.cancel();
        assert!(!wait(delay(Duration::from_secs(3600)), "b", &c).await);
    }
}
