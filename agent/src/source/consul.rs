//! The watch loop on the key that names the desired build (the Consul
//! client itself is `crate::consul`).
//!
//! [`watch_key`] runs blocking queries on one key and hands every *changed*
//! value to the rest of the agent. It follows every rule of
//! `docs/consul-watch-rules.md` (the rule numbers in comments refer to
//! it): explicit `wait`, index from the header with the reset rules,
//! de-duplicated wake-ups, 404 as "nothing published", a per-request timeout
//! above `wait * 17/16`, a token bucket so no server bug can make it spin,
//! backoff with jitter, `?stale` bounded by `LastContact`, and no
//! hand-over of an older `ModifyIndex` without a default-mode re-read.
//!
//! Nothing here writes to disk. If the process dies mid-way the watch simply
//! starts again from index 0 on restart and re-reads the current value; the
//! consumer compares it with what is deployed, so nothing is applied twice
//! or lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Re-exported: [`watch_key`] takes one, and callers (the tests among
/// them) need not depend on tokio-util themselves.
pub use tokio_util::sync::CancellationToken;

use crate::consul::{ConsulClient, ConsulSettings, KvRead, QueryOptions};
use crate::error::{Error, Result};
use crate::pacing::{jitter_half, random_below, sleep_or_cancel, BackoffState, TokenBucket};

/// What the watch hands to the rest of the agent: only changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The value changed (or is seen for the first time).
    Value { value: Vec<u8>, modify_index: u64 },
    /// 404: nothing is published. Informational: the consumer keeps serving
    /// what is deployed and never undeploys because of it (rule 6).
    Missing,
    /// The source holds something that cannot be a manifest (not a regular
    /// file, too large): shown in status like a rejected manifest.
    Rejected { reason: String },
}

/// The watch loop: runs blocking queries on `key` until `shutdown` is
/// cancelled (or the receiver is gone) and sends each changed value on
/// `tx`. Never returns an error: every failure is logged, counted in
/// `stats`, and retried after a delay.
pub async fn watch_key(
    client: ConsulClient,
    key: String,
    tx: mpsc::Sender<WatchEvent>,
    stats: Arc<WatchStats>,
    shutdown: CancellationToken,
) {
    watch_key_from(client, key, tx, stats, shutdown, 0).await
}

/// [`watch_key`] for a consumer that already acted on `applied_modify_index`
/// (persisted across restarts): a first value older than that is re-read in
/// default mode before it is sent (rule 12).
#[tracing::instrument(
    name = "consul_watch",
    skip_all,
    fields(key = %key, address = %client.address())
)]
pub async fn watch_key_from(
    client: ConsulClient,
    key: String,
    tx: mpsc::Sender<WatchEvent>,
    stats: Arc<WatchStats>,
    shutdown: CancellationToken,
    applied_modify_index: u64,
) {
    let s = client.settings().clone();
    stats.start(client.address(), &key);
    let mut watch = Watch {
        bucket: TokenBucket::new(s.rate, Instant::now()),
        backoff: BackoffState::new(s.backoff),
        state: WatchState {
            applied_modify_index,
            ..WatchState::default()
        },
        rng: StdRng::from_entropy(),
        s,
        client,
        key,
        tx,
        stats,
        shutdown,
    };
    // Rule 9: spread a fleet-wide restart.
    let splay = random_below(watch.s.first_request_splay, &mut watch.rng);
    if sleep_or_cancel(splay, &watch.shutdown).await {
        watch.run().await;
    }
}

/// One watch loop's state: pacing, the index rules and where events go.
struct Watch {
    client: ConsulClient,
    key: String,
    tx: mpsc::Sender<WatchEvent>,
    stats: Arc<WatchStats>,
    shutdown: CancellationToken,
    s: ConsulSettings,
    rng: StdRng,
    bucket: TokenBucket,
    backoff: BackoffState,
    state: WatchState,
}

impl Watch {
    /// Blocking queries until shutdown (or the receiver is gone). Every
    /// function it calls returns `false` / `None` to say "stop".
    async fn run(mut self) {
        let mut not_before: Option<Instant> = None;
        loop {
            if let Some(t) = not_before.take() {
                let wait = t.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    self.stats.gap_wait();
                }
                if !sleep_or_cancel(wait, &self.shutdown).await {
                    return;
                }
            }
            // Rule 8: every request, re-reads included, takes a token.
            if !self.take_token().await {
                return;
            }
            let query = self.state.query(self.s.wait);
            let asked = Instant::now();
            let Some(result) = self.read(&query).await else {
                return;
            };
            let woken = self.refund(&query, &result, asked);
            let Some(result) = self.confirm(result).await else {
                return;
            };
            let delivered = match result {
                Ok(answer) => self.deliver(answer).await,
                Err(e) => self.back_off(e).await.then_some(false),
            };
            let Some(delivered) = delivered else {
                return;
            };
            // A quick wake-up that changed nothing is paced by `WAKE_GAP`;
            // after a real change the next query goes at once (it blocks on
            // the new index), so a second change soon after, such as a
            // rollback right after a publish, is seen at once too.
            if woken && !delivered {
                not_before = Some(asked + WAKE_GAP);
            }
        }
    }

    /// Takes a token, counting a wait for the refill. `false`: stop.
    async fn take_token(&mut self) -> bool {
        if self.bucket.try_take(Instant::now()).is_ok() {
            return true;
        }
        self.stats.token_wait();
        self.bucket.acquire(&self.shutdown).await
    }

    async fn read(&self, query: &QueryOptions) -> Option<Result<KvRead>> {
        read(&self.client, &self.key, query, &self.stats, &self.shutdown).await
    }

    /// Refunds the tokens of answers that prove the server blocks. Returns
    /// whether the answer was a quick wake-up (a higher index within
    /// `BLOCKED_LONG_ENOUGH`).
    fn refund(&mut self, query: &QueryOptions, result: &Result<KvRead>, asked: Instant) -> bool {
        // A query the server held for a while proves it is blocking, not
        // spinning: give its token back, so two real changes a few seconds
        // apart are both seen at once. Immediate answers (errors, a server
        // that ignores `index`) keep paying, which is what bounds a spin.
        //
        // A successful read without an index only follows a start (after
        // the splay), an error or an index reset, and each of those paid
        // its own token: it gets its token back too, so the blocking query
        // that follows goes at once. Otherwise, after an outage had spent
        // the burst, a change right after that first read waited for the
        // next refill (up to 15 s with the shipped rates).
        let held = Instant::now().saturating_duration_since(asked);
        if result.is_ok() && (held >= BLOCKED_LONG_ENOUGH || query.index == 0) {
            self.bucket.refund();
            if query.index == 0 {
                return false;
            }
        }
        // A quick answer with a higher index is Consul waking us for a
        // write to the key or near it (a missing key wakes on its whole
        // radix subtree, docs/consul-watch-rules.md rule 5 and WAKEUPS.md).
        // Such wake-ups must not drain the bucket, or the watch would be
        // asleep exactly when its key is finally written; the ones that
        // change nothing are paced by `WAKE_GAP` instead, which bounds them
        // to one request per gap while a real change is still seen within
        // one gap.
        let woken = matches!(result, Ok(a) if query.index > 0 && a.index > query.index);
        if woken && held < BLOCKED_LONG_ENOUGH {
            self.bucket.refund();
            return true;
        }
        false
    }

    /// Rules 11 and 12: an answer too stale, or older than what was acted
    /// on, is confirmed with a default-mode read (the leader's view) before
    /// it is acted on. `None`: stop.
    async fn confirm(&mut self, result: Result<KvRead>) -> Option<Result<KvRead>> {
        let Ok(answer) = &result else {
            return Some(result);
        };
        let Some(reason) = self.state.reread_reason(answer, self.s.max_stale) else {
            return Some(result);
        };
        tracing::info!(
            reason,
            last_contact_ms = answer.last_contact.as_millis() as u64,
            modify_index = answer.pair.as_ref().map(|p| p.modify_index),
            applied_modify_index = self.state.applied_modify_index,
            "re-reading in default consistency mode"
        );
        if !self.take_token().await {
            return None;
        }
        self.stats.reread();
        self.read(&QueryOptions::default()).await
    }

    /// Applies an answer to the index rules and hands a change on.
    /// `Some(true)`: a change went out; `None`: stop.
    async fn deliver(&mut self, answer: KvRead) -> Option<bool> {
        self.backoff.reset();
        let (received, last_contact, known_leader) =
            (answer.index, answer.last_contact, answer.known_leader);
        let previous = self.state.index;
        if self.stats.take_resync() {
            self.state.sent = None;
        }
        let event = self.state.on_answer(answer);
        if self.state.index == 0 {
            tracing::info!(
                previous,
                received,
                "Consul index went backwards; starting over from 0"
            );
        }
        self.stats
            .success(self.state.index, last_contact, known_leader);
        let Some(event) = event else {
            return Some(false);
        };
        match &event {
            WatchEvent::Value {
                modify_index,
                value,
            } => tracing::info!(modify_index, bytes = value.len(), "desired value changed"),
            WatchEvent::Missing => {
                tracing::warn!("key not found: nothing published; keeping what is deployed")
            }
            WatchEvent::Rejected { reason } => tracing::error!(%reason, "value rejected"),
        }
        tokio::select! {
            r = self.tx.send(event) => if r.is_err() {
                tracing::debug!("watch receiver gone; stopping");
                return None;
            },
            _ = self.shutdown.cancelled() => return None,
        }
        self.stats.event_sent();
        Some(true)
    }

    /// Waits before the next request after an error, as its kind asks.
    async fn back_off(&mut self, e: Error) -> bool {
        let kind = ErrorKind::of(&e);
        self.stats.error(kind, &e);
        self.state.on_error(kind);
        let delay = match kind {
            // Rule 10: the agent asks us to slow down a little, not to back
            // off exponentially.
            ErrorKind::RateLimited => {
                let initial = self.s.backoff.initial;
                initial + random_below(initial * 3, &mut self.rng)
            }
            // Rule 10: a token problem needs an operator; retrying fast
            // would only add load.
            ErrorKind::Forbidden => jitter_half(self.s.forbidden_retry, &mut self.rng),
            _ => self.backoff.next_delay(&mut self.rng),
        };
        let retry_in_ms = delay.as_millis() as u64;
        if kind == ErrorKind::Forbidden {
            tracing::error!(error = %e, retry_in_ms, "Consul denied the watch: configuration error");
            // A fixed token file applies at once, not after the slow 403
            // retry.
            return self
                .client
                .sleep_until_token_changes(delay, &self.shutdown)
                .await;
        }
        tracing::warn!(error = %e, kind = kind.as_str(), retry_in_ms, "Consul watch request failed");
        sleep_or_cancel(delay, &self.shutdown).await
    }
}

/// One counted read; `None` if `shutdown` fired first.
async fn read(
    client: &ConsulClient,
    key: &str,
    query: &QueryOptions,
    stats: &WatchStats,
    shutdown: &CancellationToken,
) -> Option<Result<KvRead>> {
    stats.request();
    tokio::select! {
        r = client.get(key, query) => Some(r),
        _ = shutdown.cancelled() => None,
    }
}

/// What the loop remembers between answers, and the rules that act on it.
/// No I/O: the decisions are unit-tested on their own.
#[derive(Debug, Default)]
struct WatchState {
    /// Index for the next blocking query; 0 = a non-blocking read.
    index: u64,
    /// What the consumer last got: `None` = nothing yet, `Some(None)` =
    /// `Missing`, `Some(Some(v))` = value `v`.
    sent: Option<Option<Vec<u8>>>,
    /// ModifyIndex of the value last confirmed (rule 12).
    applied_modify_index: u64,
}

impl WatchState {
    /// Rules 2 and 11: blocking with an explicit wait once there is an
    /// index, always `?stale`, never `?consistent`.
    fn query(&self, wait: Duration) -> QueryOptions {
        QueryOptions {
            index: self.index,
            wait: (self.index > 0).then_some(wait),
            stale: true,
            consistent: false,
        }
    }

    /// Why a `?stale` answer must be confirmed in default mode, if it must.
    fn reread_reason(&self, answer: &KvRead, max_stale: Duration) -> Option<&'static str> {
        if answer.last_contact > max_stale {
            // Rule 11: the answering server lost touch with the leader.
            Some("last contact beyond the staleness bound")
        } else if answer
            .pair
            .as_ref()
            .is_some_and(|p| p.modify_index < self.applied_modify_index)
        {
            // Rule 12: older than what is applied.
            Some("modify index lower than the applied one")
        } else {
            None
        }
    }

    /// Takes a (confirmed) answer: moves the index (rule 4) and returns the
    /// event to send, if anything changed (rules 5 and 6).
    fn on_answer(&mut self, answer: KvRead) -> Option<WatchEvent> {
        self.index = next_index(self.index, answer.index);
        match answer.pair {
            None if self.sent == Some(None) => None,
            None => {
                self.sent = Some(None);
                Some(WatchEvent::Missing)
            }
            Some(pair) => {
                self.applied_modify_index = pair.modify_index;
                if self.sent.as_ref().and_then(Option::as_ref) == Some(&pair.value) {
                    return None;
                }
                self.sent = Some(Some(pair.value.clone()));
                Some(WatchEvent::Value {
                    value: pair.value,
                    modify_index: pair.modify_index,
                })
            }
        }
    }

    /// Rule 9: after an error start from a fresh read, except after a 429,
    /// which says nothing about our index.
    fn on_error(&mut self, kind: ErrorKind) {
        if kind != ErrorKind::RateLimited {
            self.index = 0;
        }
    }
}

/// Why a request failed, for stats and for choosing the retry delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Timeout,
    Connect,
    Http5xx,
    RateLimited,
    Forbidden,
    Decode,
    Other,
}

impl ErrorKind {
    /// The snake_case name used in logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Http5xx => "http_5xx",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Decode => "decode",
            ErrorKind::Other => "other",
        }
    }

    /// Classifies an error of this module.
    pub fn of(e: &Error) -> ErrorKind {
        match e {
            Error::ConsulTimeout { .. } => ErrorKind::Timeout,
            Error::ConsulConnect { .. } => ErrorKind::Connect,
            Error::ConsulRateLimited { .. } => ErrorKind::RateLimited,
            Error::ConsulForbidden { .. } => ErrorKind::Forbidden,
            Error::ConsulStatus { status, .. } if *status >= 500 => ErrorKind::Http5xx,
            Error::ConsulDecode { .. } | Error::ConsulValueTooLarge { .. } => ErrorKind::Decode,
            _ => ErrorKind::Other,
        }
    }
}

/// Error counters by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    pub timeout: u64,
    pub connect: u64,
    pub http_5xx: u64,
    pub http_429: u64,
    pub forbidden: u64,
    pub decode: u64,
    pub other: u64,
}

/// A copy of the watch's stats for the status socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WatchStatsSnapshot {
    pub address: String,
    pub key: String,
    /// Index the next blocking query uses.
    pub last_index: u64,
    pub last_contact_ms: u64,
    pub known_leader: bool,
    /// Wall-clock time of the last successful answer.
    pub last_success_unix_ms: Option<u64>,
    pub consecutive_errors: u64,
    pub requests_total: u64,
    /// Default-mode re-reads (stale bound exceeded, or rule 12).
    pub rereads: u64,
    /// Requests that waited for the token bucket to refill first (rule 8).
    pub token_waits: u64,
    /// Requests that waited `WAKE_GAP` first, after a quick wake-up that
    /// changed nothing. With `token_waits`, these say why a change was
    /// seen late, so tests assert on them instead of on elapsed time.
    pub gap_waits: u64,
    pub events_sent: u64,
    pub errors: ErrorCounts,
    pub last_error: Option<String>,
    /// When `last_error` happened (Unix seconds).
    pub last_error_unix: Option<u64>,
}

/// Live stats of one watch, written by the loop and read by the status
/// socket, and the one request a consumer can make of a running watch
/// ([`WatchStats::resync`]). In memory only.
#[derive(Debug, Default)]
pub struct WatchStats {
    inner: Mutex<WatchStatsSnapshot>,
    resync: AtomicBool,
}

impl WatchStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// A consistent copy.
    pub fn snapshot(&self) -> WatchStatsSnapshot {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, WatchStatsSnapshot> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(&self, address: &str, key: &str) {
        let mut s = self.lock();
        s.address = address.to_string();
        s.key = key.to_string();
    }

    fn request(&self) {
        self.lock().requests_total += 1;
    }

    /// The consumer learned the key's state from a read of its own (the
    /// freeze confirmed before acting): the watch's next answer is handed
    /// on even if it repeats the last one the watch sent. Otherwise a
    /// freeze seen only by that read and lifted before the watch looked
    /// again reads as "missing, still missing" to the watch, and the lift
    /// never reaches the consumer.
    pub fn resync(&self) {
        self.resync.store(true, Ordering::Release);
    }

    fn take_resync(&self) -> bool {
        self.resync.swap(false, Ordering::AcqRel)
    }

    fn reread(&self) {
        self.lock().rereads += 1;
    }

    fn token_wait(&self) {
        self.lock().token_waits += 1;
    }

    fn gap_wait(&self) {
        self.lock().gap_waits += 1;
    }

    fn event_sent(&self) {
        self.lock().events_sent += 1;
    }

    fn success(&self, next_index: u64, last_contact: Duration, known_leader: bool) {
        let mut s = self.lock();
        s.last_index = next_index;
        s.last_contact_ms = last_contact.as_millis() as u64;
        s.known_leader = known_leader;
        s.consecutive_errors = 0;
        s.last_success_unix_ms = Some(crate::clock::now_ms());
    }

    fn error(&self, kind: ErrorKind, e: &Error) {
        let mut s = self.lock();
        s.consecutive_errors += 1;
        s.last_error = Some(e.to_string());
        s.last_error_unix = Some(crate::clock::now_secs());
        let c = &mut s.errors;
        match kind {
            ErrorKind::Timeout => c.timeout += 1,
            ErrorKind::Connect => c.connect += 1,
            ErrorKind::Http5xx => c.http_5xx += 1,
            ErrorKind::RateLimited => c.http_429 += 1,
            ErrorKind::Forbidden => c.forbidden += 1,
            ErrorKind::Decode => c.decode += 1,
            ErrorKind::Other => c.other += 1,
        }
    }
}

/// Rule 4: the index for the next request from the previous one and the
/// `X-Consul-Index` just received (0 when missing).
pub fn next_index(previous: u64, received: u64) -> u64 {
    if received == 0 {
        // 0 never blocks: it would turn the loop into a busy loop.
        1
    } else if received < previous {
        // Snapshot restore, server change under ?stale, or our index was
        // ahead of the server (11-*.txt): start over.
        0
    } else {
        received
    }
}

/// Shortest time between two requests of a watch that Consul woke without
/// its key changing: the bound on how late such a watch sees a real change,
/// and on the requests spurious wake-ups can cost (one per gap).
pub const WAKE_GAP: Duration = Duration::from_millis(500);

/// How long the server must have held a successful query for its token to
/// be refunded (see [`TokenBucket::refund`]).
pub const BLOCKED_LONG_ENOUGH: Duration = Duration::from_secs(1);

#[cfg(test)]
// Tests may panic on the unexpected: that is how they fail.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::consul::KvPair;

    fn answer(index: u64, value: Option<(&[u8], u64)>) -> KvRead {
        KvRead {
            index,
            last_contact: Duration::ZERO,
            known_leader: true,
            pair: value.map(|(v, mi)| KvPair {
                key: "k".into(),
                value: v.to_vec(),
                modify_index: mi,
                create_index: 1,
                flags: 0,
            }),
        }
    }

    #[test]
    fn state_sends_only_changes_and_missing_once() {
        let mut st = WatchState::default();
        assert_eq!(
            st.query(Duration::from_secs(300)),
            QueryOptions {
                index: 0,
                wait: None,
                stale: true,
                consistent: false,
            }
        );
        assert_eq!(st.on_answer(answer(10, None)), Some(WatchEvent::Missing));
        assert_eq!(st.index, 10);
        // Spurious wake-ups of a missing key: new index, no event.
        assert_eq!(st.on_answer(answer(12, None)), None);
        assert_eq!(st.on_answer(answer(15, None)), None);
        assert_eq!(st.query(Duration::from_secs(300)).index, 15);
        assert_eq!(
            st.on_answer(answer(16, Some((b"b1", 16)))),
            Some(WatchEvent::Value {
                value: b"b1".to_vec(),
                modify_index: 16
            })
        );
        // Timeout: same index, same body.
        assert_eq!(st.on_answer(answer(16, Some((b"b1", 16)))), None);
        // Deleted, then the same value back: both are changes.
        assert_eq!(st.on_answer(answer(17, None)), Some(WatchEvent::Missing));
        assert!(st.on_answer(answer(18, Some((b"b1", 18)))).is_some());
    }

    #[test]
    fn state_asks_for_rereads_and_resets_index_on_errors() {
        let mut st = WatchState::default();
        let bound = Duration::from_secs(5);
        st.on_answer(answer(20, Some((b"b2", 20))));
        assert_eq!(
            st.reread_reason(&answer(20, Some((b"b2", 20))), bound),
            None
        );
        // Rule 12: an older ModifyIndex needs a default-mode read.
        assert!(st
            .reread_reason(&answer(21, Some((b"b1", 12))), bound)
            .is_some());
        // Rule 11: too stale.
        let mut stale = answer(21, Some((b"b2", 20)));
        stale.last_contact = Duration::from_secs(6);
        assert!(st.reread_reason(&stale, bound).is_some());
        // A 404 has no ModifyIndex to compare.
        assert_eq!(st.reread_reason(&answer(21, None), bound), None);
        st.on_error(ErrorKind::RateLimited);
        assert_eq!(st.index, 20, "a 429 keeps the index");
        st.on_error(ErrorKind::Http5xx);
        assert_eq!(st.index, 0, "other errors start over");
        // Index backwards (restore): reset, then confirmed lower values are
        // the new reference.
        let mut st = WatchState::default();
        st.on_answer(answer(50, Some((b"b3", 50))));
        assert_eq!(st.on_answer(answer(7, Some((b"b3", 7)))), None);
        assert_eq!(st.index, 0);
        assert_eq!(st.applied_modify_index, 7);
    }

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, 25), 25);
        assert_eq!(next_index(25, 25), 25);
        assert_eq!(next_index(25, 27), 27);
        assert_eq!(next_index(30, 12), 0, "backwards resets");
        assert_eq!(next_index(30, 0), 1, "zero or missing becomes 1");
        assert_eq!(next_index(0, 0), 1);
    }
}
