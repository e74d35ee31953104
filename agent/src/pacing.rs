//! Pacing shared by every loop that talks to a server: a token bucket (the
//! Consul watch's requests, the download's bytes) and an exponential
//! backoff with jitter (the watch, the range retries, the deploy retry, the
//! fleet page's feed). Pure in-memory arithmetic on `tokio::time` instants,
//! so a paused test clock steers it; nothing survives a restart, which
//! starts every bucket full and every backoff at its first step.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// Re-exported: [`watch_key`] takes one, and callers (the tests among
/// them) need not depend on tokio-util themselves.
pub use tokio_util::sync::CancellationToken;

/// The token bucket that paces the watch loop (rule 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests that may go out back to back.
    pub burst: u32,
    /// One more request is allowed per interval; zero disables the limit.
    pub refill_interval: Duration,
}

impl Default for RateLimit {
    /// Burst 2, then one request every 15 s when answers come back at once.
    fn default() -> Self {
        RateLimit {
            burst: 2,
            refill_interval: Duration::from_secs(15),
        }
    }
}

/// Exponential backoff after errors (rule 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay; doubles on each consecutive error.
    pub initial: Duration,
    /// Cap of the delay.
    pub max: Duration,
}

impl Default for Backoff {
    /// consul-template's: 250 ms doubling to 1 min.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(60),
        }
    }
}

/// A token bucket on `tokio::time` instants (a paused test clock steers it
/// too). Counts requests for the Consul watch (rule 8: [`TokenBucket::new`]
/// from a [`RateLimit`]) and bytes for the download's bandwidth limit
/// ([`TokenBucket::per_second`]).
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    /// Tokens added per second; zero means no limit.
    per_sec: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate.burst` requests, one more per `refill_interval`.
    pub fn new(rate: RateLimit, now: Instant) -> Self {
        let capacity = f64::from(rate.burst.max(1));
        let per_sec = if rate.refill_interval.is_zero() {
            0.0
        } else {
            1.0 / rate.refill_interval.as_secs_f64()
        };
        TokenBucket {
            capacity,
            tokens: capacity,
            per_sec,
            last: now,
        }
    }

    /// An empty bucket filling at `per_sec` tokens a second that holds a
    /// tenth of a second's worth: a byte rate with small bursts.
    pub fn per_second(per_sec: u64, now: Instant) -> Self {
        let per_sec = per_sec.max(1) as f64;
        TokenBucket {
            capacity: per_sec / 10.0,
            tokens: 0.0,
            per_sec,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_sec).min(self.capacity);
    }

    /// Takes a token, or says how long until one is available (nothing is
    /// taken then).
    pub fn try_take(&mut self, now: Instant) -> std::result::Result<(), Duration> {
        if self.per_sec == 0.0 {
            return Ok(());
        }
        self.refill(now);
        // Tolerate float rounding after sleeping exactly the deficit.
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }

    /// Takes `n` tokens even into debt (bytes that already arrived must be
    /// paid for) and returns how long the caller must pause for the debt to
    /// be repaid: zero when there is none.
    pub fn take_owing(&mut self, n: u64, now: Instant) -> Duration {
        if self.per_sec == 0.0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            Duration::from_secs_f64(-self.tokens / self.per_sec)
        } else {
            Duration::ZERO
        }
    }

    /// Returns one token (up to the burst), for a request that blocked.
    pub fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.capacity);
    }

    /// Waits for a token; `false` if `shutdown` fired first.
    pub async fn acquire(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            match self.try_take(Instant::now()) {
                Ok(()) => return true,
                Err(d) => {
                    if !sleep_or_cancel(d, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }
}

/// Rule 9: exponential backoff with jitter and a cap.
#[derive(Debug)]
pub struct BackoffState {
    cfg: Backoff,
    next: Duration,
}

impl BackoffState {
    pub fn new(cfg: Backoff) -> Self {
        BackoffState {
            cfg,
            next: cfg.initial,
        }
    }

    /// The delay before the next retry: the current step, jittered into
    /// [step/2, step], then the step doubles up to the cap.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let step = self.next.min(self.cfg.max);
        self.next = (self.next * 2).min(self.cfg.max);
        jitter_half(step, rng)
    }

    /// The step the next delay is drawn from, without advancing.
    pub fn current(&self) -> Duration {
        self.next.min(self.cfg.max)
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.next = self.cfg.initial;
    }
}

/// A random duration in [d/2, d].
pub fn jitter_half(d: Duration, rng: &mut impl Rng) -> Duration {
    let half = d / 2;
    half + random_below(d - half, rng)
}

pub fn random_below(d: Duration, rng: &mut impl Rng) -> Duration {
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rng.gen_range(0..=ms))
}

/// Sleeps unless cancelled; `false` if cancelled.
pub async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    if d.is_zero() {
        return !shutdown.is_cancelled();
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
// Tests may panic on the unexpected: that is how they fail.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn token_bucket_bursts_then_degrades() {
        let rate = RateLimit::default();
        let start = Instant::now();
        let mut b = TokenBucket::new(rate, start);
        assert!(b.try_take(start).is_ok());
        assert!(b.try_take(start).is_ok());
        assert_eq!(b.try_take(start).unwrap_err(), Duration::from_secs(15));
        // Immediate answers: one request per 15 s, never faster.
        let mut now = start;
        let mut granted = 0;
        for _ in 0..600 {
            now += Duration::from_millis(100);
            if b.try_take(now).is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 4, "60 s of immediate answers allow 4 requests");
        // A long blocking query refills the bucket, up to the burst only.
        now += Duration::from_secs(300);
        assert!(b.try_take(now).is_ok());
        assert!(b.try_take(now).is_ok());
        assert!(b.try_take(now).is_err());
    }

    #[test]
    fn token_bucket_zero_interval_is_unlimited() {
        let now = Instant::now();
        let mut b = TokenBucket::new(
            RateLimit {
                burst: 1,
                refill_interval: Duration::ZERO,
            },
            now,
        );
        for _ in 0..100 {
            assert!(b.try_take(now).is_ok());
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = BackoffState::new(Backoff::default());
        let mut step = Duration::from_millis(250);
        for _ in 0..12 {
            let d = b.next_delay(&mut rng);
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} not in [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(Duration::from_secs(60));
        }
        assert!(b.next_delay(&mut rng) >= Duration::from_secs(30));
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(250));
    }

    proptest::proptest! {
        /// Whatever the pattern of attempts, no window of length T ever
        /// sees more than burst + T/refill requests (rule 8).
        #[test]
        fn token_bucket_never_exceeds_its_rate(
            gaps in proptest::collection::vec(0u64..3_000, 1..200),
            burst in 1u32..4,
        ) {
            let rate = RateLimit { burst, refill_interval: Duration::from_secs(1) };
            let start = Instant::now();
            let mut b = TokenBucket::new(rate, start);
            let mut now = start;
            let mut granted = Vec::new();
            for g in gaps {
                now += Duration::from_millis(g);
                if b.try_take(now).is_ok() {
                    granted.push(now - start);
                }
            }
            for (i, t0) in granted.iter().enumerate() {
                for (j, t1) in granted.iter().enumerate().skip(i) {
                    let window = (*t1 - *t0).as_secs_f64();
                    let allowed = f64::from(burst) + window + 1e-6;
                    proptest::prop_assert!(
                        (j - i + 1) as f64 <= allowed,
                        "{} requests within {window} s", j - i + 1
                    );
                }
            }
        }
    }
}
