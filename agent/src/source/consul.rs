//! The agent's Consul KV client and the watch loop on the key that names the
//! desired build.
//!
//! [`ConsulClient`] is a small hand-written client for `/v1/kv` on the
//! host's local Consul agent: one pooled `reqwest` client (rustls) per
//! process, the token in the `X-Consul-Token` header only, TLS and
//! `CONSUL_*` environment settings like Consul's own tools, validated and
//! URL-encoded key names, values capped at Consul's 512 KiB.
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

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Re-exported: [`watch_key`] takes one, and callers (the tests among
/// them) need not depend on tokio-util themselves.
pub use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Largest value Consul stores (`kv_max_value_size`), docs/consul-watch-rules.md rule 15.
pub const MAX_VALUE_SIZE: usize = 512 * 1024;
/// Consul caps `wait` at 10 minutes (rule 2).
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Largest JSON body read for a single key: a 512 KiB value is ~700 KiB of
/// base64 plus a little JSON.
const MAX_SINGLE_BODY: usize = 1024 * 1024;
/// Largest body read for a prefix listing.
const MAX_LIST_BODY: usize = 64 * 1024 * 1024;
/// TCP (and TLS) connect timeout: the agent is local, so a slow connect
/// means it is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    let mut rng = StdRng::from_entropy();
    let mut bucket = TokenBucket::new(s.rate, Instant::now());
    let mut backoff = BackoffState::new(s.backoff);
    let mut state = WatchState {
        applied_modify_index,
        ..WatchState::default()
    };

    // Rule 9: spread a fleet-wide restart.
    if !sleep_or_cancel(random_below(s.first_request_splay, &mut rng), &shutdown).await {
        return;
    }
    let mut not_before: Option<Instant> = None;
    loop {
        if let Some(t) = not_before.take() {
            let wait = t.saturating_duration_since(Instant::now());
            if !sleep_or_cancel(wait, &shutdown).await {
                return;
            }
        }
        // Rule 8: every request, re-reads included, takes a token.
        if !bucket.acquire(&shutdown).await {
            return;
        }
        let query = state.query(s.wait);
        let asked = Instant::now();
        let Some(mut result) = read(&client, &key, &query, &stats, &shutdown).await else {
            return;
        };
        // A query the server held for a while proves it is blocking, not
        // spinning: give its token back, so two real changes a few seconds
        // apart are both seen at once. Immediate answers (errors, a server
        // that ignores `index`) keep paying, which is what bounds a spin.
        let held = Instant::now().saturating_duration_since(asked);
        if result.is_ok() && held >= BLOCKED_LONG_ENOUGH {
            bucket.refund();
        }
        // A quick answer with a higher index is Consul waking us for a
        // write near the key (a missing key wakes on its whole radix
        // subtree, docs/consul-watch-rules.md rule 5 and WAKEUPS.md). Such
        // wake-ups must not drain the bucket, or the watch would be asleep
        // exactly when its key is finally written; they are paced by
        // `WAKE_GAP` instead, which bounds them to one request per gap
        // while a real change is still seen within one gap.
        let woken = matches!(&result, Ok(a) if query.index > 0 && a.index > query.index);
        if woken && held < BLOCKED_LONG_ENOUGH {
            bucket.refund();
            // Paced at the top of the next round, after this answer's
            // event (if any) went out.
            not_before = Some(asked + WAKE_GAP);
        }
        if let Ok(answer) = &result {
            if let Some(reason) = state.reread_reason(answer, s.max_stale) {
                // Rules 11 and 12: confirm with a default-mode read (the
                // leader's view) before acting on it.
                tracing::info!(
                    reason,
                    last_contact_ms = answer.last_contact.as_millis() as u64,
                    modify_index = answer.pair.as_ref().map(|p| p.modify_index),
                    applied_modify_index = state.applied_modify_index,
                    "re-reading in default consistency mode"
                );
                if !bucket.acquire(&shutdown).await {
                    return;
                }
                stats.reread();
                let default_mode = QueryOptions::default();
                let Some(confirmed) = read(&client, &key, &default_mode, &stats, &shutdown).await
                else {
                    return;
                };
                result = confirmed;
            }
        }
        match result {
            Ok(answer) => {
                backoff.reset();
                let (received, last_contact, known_leader) =
                    (answer.index, answer.last_contact, answer.known_leader);
                let previous = state.index;
                let event = state.on_answer(answer);
                if state.index == 0 {
                    tracing::info!(
                        previous,
                        received,
                        "Consul index went backwards; starting over from 0"
                    );
                }
                stats.success(state.index, last_contact, known_leader);
                let Some(event) = event else { continue };
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
                    r = tx.send(event) => if r.is_err() {
                        tracing::debug!("watch receiver gone; stopping");
                        return;
                    },
                    _ = shutdown.cancelled() => return,
                }
                stats.event_sent();
            }
            Err(e) => {
                let kind = ErrorKind::of(&e);
                stats.error(kind, &e);
                state.on_error(kind);
                let delay = match kind {
                    // Rule 10: the agent asks us to slow down a little, not
                    // to back off exponentially.
                    ErrorKind::RateLimited => {
                        s.backoff.initial + random_below(s.backoff.initial * 3, &mut rng)
                    }
                    // Rule 10: a token problem needs an operator; retrying
                    // fast would only add load.
                    ErrorKind::Forbidden => jitter_half(s.forbidden_retry, &mut rng),
                    _ => backoff.next_delay(&mut rng),
                };
                let retry_in_ms = delay.as_millis() as u64;
                if kind == ErrorKind::Forbidden {
                    tracing::error!(error = %e, retry_in_ms, "Consul denied the watch: configuration error");
                    // A fixed token file applies at once, not after the
                    // slow 403 retry.
                    if !sleep_until_token_changes(&client, delay, &shutdown).await {
                        return;
                    }
                    continue;
                } else {
                    tracing::warn!(error = %e, kind = kind.as_str(), retry_in_ms, "Consul watch request failed");
                }
                if !sleep_or_cancel(delay, &shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps `delay`, or less when the token file changes meanwhile (checked
/// every second); `false` if `shutdown` fired first.
async fn sleep_until_token_changes(
    client: &ConsulClient,
    delay: Duration,
    shutdown: &CancellationToken,
) -> bool {
    let until = Instant::now() + delay;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || client.token_file_changed() {
            return true;
        }
        if !sleep_or_cancel(left.min(Duration::from_secs(1)), shutdown).await {
            return false;
        }
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
    pub events_sent: u64,
    pub errors: ErrorCounts,
    pub last_error: Option<String>,
    /// When `last_error` happened (Unix seconds).
    pub last_error_unix: Option<u64>,
}

/// Live stats of one watch, written by the loop and read by the status
/// socket. In memory only.
#[derive(Debug, Default)]
pub struct WatchStats {
    inner: Mutex<WatchStatsSnapshot>,
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

    fn reread(&self) {
        self.lock().rereads += 1;
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
        s.last_success_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis() as u64);
    }

    fn error(&self, kind: ErrorKind, e: &Error) {
        let mut s = self.lock();
        s.consecutive_errors += 1;
        s.last_error = Some(e.to_string());
        s.last_error_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
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

/// How to reach Consul and how to pace the watch. Build one with
/// `ConsulSettings::default()` (or from config) and then
/// [`ConsulSettings::from_env`].
#[derive(Clone)]
pub struct ConsulSettings {
    /// `http://127.0.0.1:8500` by default (rule 1: the local agent). A bare
    /// `host:port` means http (https with `CONSUL_HTTP_SSL=true`).
    pub address: String,
    /// ACL token, sent as `X-Consul-Token` (rule 13).
    pub token: Option<String>,
    /// A file holding the token (config `token-file` or
    /// `CONSUL_HTTP_TOKEN_FILE`). Wins over `token`, and the client reads it
    /// again whenever it changes, so a fixed token applies without a
    /// restart (SIGHUP, a 403, or simply the next request).
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle to verify the agent's certificate.
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, with `client_key`, for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Name to verify the agent's certificate against (and send as SNI)
    /// when it differs from the host in `address`.
    pub tls_server_name: Option<String>,
    /// `false` disables certificate verification (`CONSUL_HTTP_SSL_VERIFY`).
    pub ssl_verify: bool,
    /// `?dc=`.
    pub datacenter: Option<String>,
    /// `?ns=` (Consul Enterprise).
    pub namespace: Option<String>,
    /// `?partition=` (Consul Enterprise).
    pub partition: Option<String>,
    /// Blocking-query `wait`; capped at 10 min.
    pub wait: Duration,
    /// Largest acceptable `X-Consul-LastContact` of a `?stale` read before
    /// re-reading in default mode (rule 11).
    pub max_stale: Duration,
    /// Token bucket of the watch loop.
    pub rate: RateLimit,
    /// Backoff after errors.
    pub backoff: Backoff,
    /// Added to `wait * 17/16` for the per-request timeout, and the whole
    /// timeout of non-blocking requests (rule 7: about 7 s).
    pub timeout_margin: Duration,
    /// The first request waits a random delay below this, so a fleet-wide
    /// restart does not arrive in one burst (rule 9).
    pub first_request_splay: Duration,
    /// Delay (jittered) before retrying after a 403: a token problem needs
    /// an operator, hammering Consul will not fix it (rule 10).
    pub forbidden_retry: Duration,
}

impl Default for ConsulSettings {
    fn default() -> Self {
        ConsulSettings {
            address: "http://127.0.0.1:8500".into(),
            token_file: None,
            token: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            tls_server_name: None,
            ssl_verify: true,
            datacenter: None,
            namespace: None,
            partition: None,
            wait: Duration::from_secs(300),
            max_stale: Duration::from_secs(5),
            rate: RateLimit::default(),
            backoff: Backoff::default(),
            timeout_margin: Duration::from_secs(7),
            first_request_splay: Duration::from_secs(5),
            forbidden_retry: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for ConsulSettings {
    // Hand-written so the token never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulSettings")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("tls_server_name", &self.tls_server_name)
            .field("ssl_verify", &self.ssl_verify)
            .field("datacenter", &self.datacenter)
            .field("namespace", &self.namespace)
            .field("partition", &self.partition)
            .field("wait", &self.wait)
            .field("max_stale", &self.max_stale)
            .field("rate", &self.rate)
            .field("backoff", &self.backoff)
            .field("timeout_margin", &self.timeout_margin)
            .field("first_request_splay", &self.first_request_splay)
            .field("forbidden_retry", &self.forbidden_retry)
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl ConsulSettings {
    /// Overrides `self` with the `CONSUL_*` environment variables of
    /// Consul's own tools (rules 1, 13, 14).
    pub fn from_env(self) -> Result<Self> {
        self.from_env_with(|name| std::env::var(name).ok())
    }

    /// [`ConsulSettings::from_env`] with an injectable lookup, for tests.
    /// Reads `CONSUL_HTTP_TOKEN_FILE` synchronously: call it at startup.
    pub fn from_env_with(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let ssl = match get("CONSUL_HTTP_SSL") {
            Some(v) => parse_bool("CONSUL_HTTP_SSL", &v)?,
            None => false,
        };
        if let Some(addr) = get("CONSUL_HTTP_ADDR") {
            self.address = if addr.contains("://") {
                addr
            } else if ssl {
                format!("https://{addr}")
            } else {
                format!("http://{addr}")
            };
        } else if ssl {
            if let Some(rest) = self.address.strip_prefix("http://") {
                self.address = format!("https://{rest}");
            }
        }
        if let Some(t) = get("CONSUL_HTTP_TOKEN") {
            self.token = Some(t);
        }
        // Like Consul's api package, a token file wins over the variable.
        if let Some(path) = get("CONSUL_HTTP_TOKEN_FILE") {
            self.token_file = Some(path.into());
        }
        if let Some(path) = &self.token_file {
            // Read once here so a missing file is a start-up error; the
            // client reads it again whenever it changes.
            if let Some(t) = read_token_file(path)? {
                self.token = Some(t);
            }
        }
        if let Some(v) = get("CONSUL_CACERT") {
            self.ca_cert = Some(v.into());
        }
        if let Some(v) = get("CONSUL_CLIENT_CERT") {
            self.client_cert = Some(v.into());
        }
        if let Some(v) = get("CONSUL_CLIENT_KEY") {
            self.client_key = Some(v.into());
        }
        if let Some(v) = get("CONSUL_TLS_SERVER_NAME") {
            self.tls_server_name = Some(v);
        }
        if let Some(v) = get("CONSUL_HTTP_SSL_VERIFY") {
            self.ssl_verify = parse_bool("CONSUL_HTTP_SSL_VERIFY", &v)?;
        }
        if let Some(v) = get("CONSUL_NAMESPACE") {
            self.namespace = Some(v);
        }
        if let Some(v) = get("CONSUL_PARTITION") {
            self.partition = Some(v);
        }
        Ok(self)
    }

    /// Per-request timeout (rule 7): above the longest a blocking query may
    /// legitimately take (`wait` plus Consul's wait/16 jitter) plus a margin.
    pub fn request_timeout(&self, blocking: bool) -> Duration {
        if blocking {
            let wait = self.wait.min(MAX_WAIT);
            wait + wait / 16 + self.timeout_margin
        } else {
            self.timeout_margin
        }
    }
}

/// The token in `path`, trimmed; `None` when the file is empty.
fn read_token_file(path: &std::path::Path) -> Result<Option<String>> {
    let t = std::fs::read_to_string(path).map_err(|e| Error::ConsulConfig {
        setting: "token-file".into(),
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    let t = t.trim();
    Ok((!t.is_empty()).then(|| t.to_string()))
}

/// Go's `strconv.ParseBool`, which Consul uses for its variables.
fn parse_bool(setting: &str, v: &str) -> Result<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(Error::ConsulConfig {
            setting: setting.into(),
            message: format!("{v:?} is not a boolean (use true or false)"),
        }),
    }
}

/// Options of one read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryOptions {
    /// Blocking index; 0 sends none (a non-blocking read).
    pub index: u64,
    /// Blocking `wait`, sent only with a non-zero `index`.
    pub wait: Option<Duration>,
    /// `?stale`: any server may answer.
    pub stale: bool,
    /// `?consistent`: the leader confirms it is still the leader first.
    /// Never in the watch (rule 11); only for the one read that must be
    /// linearizable: the freeze check before acting on a tier change.
    pub consistent: bool,
}

/// One read of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvRead {
    /// `X-Consul-Index`, 0 if the header was missing.
    pub index: u64,
    /// `X-Consul-LastContact`: how stale a `?stale` answer may be.
    pub last_contact: Duration,
    /// `X-Consul-KnownLeader`.
    pub known_leader: bool,
    /// `None` on 404: nothing published.
    pub pair: Option<KvPair>,
}

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPair {
    pub key: String,
    pub value: Vec<u8>,
    pub modify_index: u64,
    pub create_index: u64,
    pub flags: u64,
}

/// The JSON of one pair as Consul sends it.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct JsonPair {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    create_index: u64,
    #[serde(default)]
    modify_index: u64,
}

/// The agent's Consul client. Build one per process and clone it: clones
/// share one connection pool (rule 16).
#[derive(Debug, Clone)]
pub struct ConsulClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    /// `scheme://host:port`, no trailing slash.
    base: String,
    settings: ConsulSettings,
    /// The token in use and the token file's (mtime, length) it was read
    /// at; re-read when the file changes.
    token: Mutex<TokenState>,
}

#[derive(Debug, Default)]
struct TokenState {
    value: Option<String>,
    stamp: Option<(SystemTime, u64)>,
}

impl ConsulClient {
    /// Builds the client: reads certificate files and, with
    /// `tls_server_name` and a host name in `address`, resolves it once
    /// (blocking; call at startup).
    pub fn new(settings: &ConsulSettings) -> Result<Self> {
        let mut settings = settings.clone();
        settings.wait = settings.wait.min(MAX_WAIT);
        let cfg_err = |setting: &str, message: String| Error::ConsulConfig {
            setting: setting.into(),
            message,
        };
        let (scheme, hostport) = settings
            .address
            .trim_end_matches('/')
            .split_once("://")
            .map(|(s, h)| (s.to_ascii_lowercase(), h.to_string()))
            .unwrap_or_else(|| ("http".into(), settings.address.clone()));
        if scheme != "http" && scheme != "https" {
            return Err(cfg_err(
                "address",
                format!(
                    "{:?}: only http:// and https:// are supported",
                    settings.address
                ),
            ));
        }
        if hostport.is_empty() || hostport.contains('/') {
            return Err(cfg_err(
                "address",
                format!("{:?} is not scheme://host:port", settings.address),
            ));
        }
        let default_port = if scheme == "https" { 8501 } else { 8500 };
        let (host, port) = split_host_port(&hostport, default_port)
            .ok_or_else(|| cfg_err("address", format!("bad port in {:?}", settings.address)))?;

        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .http1_only()
            // Rule 16: one long-lived connection per host; a second one only
            // while a write overlaps the blocking read.
            .pool_max_idle_per_host(1)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Duration::from_secs(30))
            .user_agent(concat!("deploy-agent/", env!("CARGO_PKG_VERSION")));

        if let Some(path) = &settings.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| cfg_err("ca_cert", format!("cannot read {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| cfg_err("ca_cert", format!("{}: {e}", path.display())))?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        match (&settings.client_cert, &settings.client_key) {
            (Some(cert), Some(key)) => {
                let mut pem = std::fs::read(cert).map_err(|e| {
                    cfg_err(
                        "client_cert",
                        format!("cannot read {}: {e}", cert.display()),
                    )
                })?;
                pem.push(b'\n');
                pem.extend(std::fs::read(key).map_err(|e| {
                    cfg_err("client_key", format!("cannot read {}: {e}", key.display()))
                })?);
                let id = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| cfg_err("client_cert", format!("{e}")))?;
                builder = builder.identity(id);
            }
            (None, None) => {}
            _ => {
                return Err(cfg_err(
                    "client_cert",
                    "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY go together".into(),
                ))
            }
        }
        if !settings.ssl_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let mut base = format!("{scheme}://{hostport}");
        if let (Some(name), true) = (&settings.tls_server_name, scheme == "https") {
            // reqwest verifies against the URL's host, so talk to `name` and
            // pin its resolution to the configured address.
            let ip = match host
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<IpAddr>()
            {
                Ok(ip) => SocketAddr::new(ip, port),
                Err(_) => (host.as_str(), port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| cfg_err("address", format!("cannot resolve {host}")))?,
            };
            builder = builder.resolve(name, ip);
            base = format!("https://{name}:{port}");
        }
        let http = builder
            .build()
            .map_err(|e| cfg_err("tls", format!("cannot build the HTTP client: {e}")))?;
        let token = Mutex::new(TokenState {
            value: settings.token.clone(),
            stamp: settings.token_file.as_deref().and_then(file_stamp),
        });
        Ok(ConsulClient {
            inner: Arc::new(Inner {
                http,
                base,
                settings,
                token,
            }),
        })
    }

    /// The token to send now: the token file is read again when its mtime
    /// or length changed since the last read (one `stat` per request, which
    /// is nothing next to the request). A file that became unreadable keeps
    /// the last good token and logs why.
    fn token(&self) -> Option<String> {
        let mut t = self.inner.token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.inner.settings.token_file {
            let stamp = file_stamp(path);
            if stamp != t.stamp {
                match read_token_file(path) {
                    Ok(v) => {
                        tracing::info!(path = %path.display(), "Consul token file changed; using the new token");
                        t.value = v;
                        t.stamp = stamp;
                    }
                    Err(e) => tracing::warn!(error = %e, "keeping the previous Consul token"),
                }
            }
        }
        t.value.clone()
    }

    /// Whether the token file changed since the token in use was read.
    pub fn token_file_changed(&self) -> bool {
        let Some(path) = &self.inner.settings.token_file else {
            return false;
        };
        let t = self.inner.token.lock().unwrap_or_else(|p| p.into_inner());
        file_stamp(path) != t.stamp
    }

    /// The settings this client runs with (`wait` already capped).
    pub fn settings(&self) -> &ConsulSettings {
        &self.inner.settings
    }

    /// `scheme://host:port` requests go to.
    pub fn address(&self) -> &str {
        &self.inner.base
    }

    fn url(&self, key: &str, params: &[(&str, Option<String>)]) -> String {
        let s = &self.inner.settings;
        let mut url = format!("{}/v1/kv/{}", self.inner.base, encode(key, true));
        let extra = [
            ("dc", s.datacenter.clone()),
            ("ns", s.namespace.clone()),
            ("partition", s.partition.clone()),
        ];
        let mut sep = '?';
        for (name, value) in params.iter().cloned().chain(
            extra
                .into_iter()
                .filter_map(|(n, v)| v.map(|v| (n, Some(v)))),
        ) {
            url.push(sep);
            sep = '&';
            url.push_str(name);
            if let Some(v) = value {
                url.push('=');
                url.push_str(&encode(&v, false));
            }
        }
        url
    }

    /// Sends with the token header and a whole-exchange timeout, and reads
    /// at most `cap` bytes of body.
    async fn exchange(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
        timeout: Duration,
        cap: usize,
    ) -> Result<(reqwest::StatusCode, reqwest::header::HeaderMap, Vec<u8>)> {
        let mut req = req;
        if let Some(t) = self.token() {
            // Rule 13: header only, never `?token=` (URLs end up in logs).
            req = req.header("X-Consul-Token", t);
        }
        let fut = async {
            let mut resp = req.send().await.map_err(|e| transport_error(url, e))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(url, e))? {
                if body.len() + chunk.len() > cap {
                    return Err(Error::ConsulDecode {
                        url: url.to_string(),
                        message: format!("response body larger than {cap} bytes"),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok((status, headers, body))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::ConsulTimeout {
                url: url.to_string(),
                timeout,
            }),
        }
    }

    /// Reads one key. A 404 is `Ok` with `pair: None`.
    pub async fn get(&self, key: &str, opts: &QueryOptions) -> Result<KvRead> {
        validate_key(key, false)?;
        let mut params: Vec<(&str, Option<String>)> = Vec::new();
        let blocking = opts.index > 0;
        if blocking {
            params.push(("index", Some(opts.index.to_string())));
            if let Some(w) = opts.wait {
                params.push(("wait", Some(format!("{}ms", w.min(MAX_WAIT).as_millis()))));
            }
        }
        if opts.stale {
            params.push(("stale", None));
        } else if opts.consistent {
            params.push(("consistent", None));
        }
        let url = self.url(key, &params);
        let timeout = self.settings().request_timeout(blocking);
        let (status, headers, body) = self
            .exchange(self.inner.http.get(&url), &url, timeout, MAX_SINGLE_BODY)
            .await?;
        let index = consul_index(&url, status.as_u16(), &headers)?;
        let last_contact =
            Duration::from_millis(header_u64(&headers, "x-consul-lastcontact").unwrap_or(0));
        let known_leader = headers
            .get("x-consul-knownleader")
            .is_some_and(|v| v.as_bytes() == b"true");
        let pair = match status.as_u16() {
            200 => {
                let mut pairs = decode_pairs(&url, &body)?;
                match pairs.iter().position(|p| p.key == key) {
                    Some(i) => Some(pairs.swap_remove(i)),
                    None => {
                        return Err(Error::ConsulDecode {
                            url,
                            message: format!("200 without the key {key}"),
                        })
                    }
                }
            }
            404 => None,
            _ => return Err(status_error(&url, key, Needs::Read, status.as_u16(), &body)),
        };
        Ok(KvRead {
            index,
            last_contact,
            known_leader,
            pair,
        })
    }

    /// Writes `value` at `key`; with `cas`, only if the key's ModifyIndex
    /// is still `cas` (`Some(0)`: only if absent). Returns Consul's answer:
    /// `false` when the check-and-set lost (rule 19).
    pub async fn put(&self, key: &str, value: &[u8], cas: Option<u64>) -> Result<bool> {
        validate_key(key, false)?;
        if value.len() > MAX_VALUE_SIZE {
            return Err(Error::ConsulValueTooLarge {
                key: key.into(),
                size: value.len(),
            });
        }
        let params: Vec<(&str, Option<String>)> = cas
            .map(|c| ("cas", Some(c.to_string())))
            .into_iter()
            .collect();
        let url = self.url(key, &params);
        let req = self.inner.http.put(&url).body(value.to_vec());
        let (status, _, body) = self
            .exchange(req, &url, self.settings().request_timeout(false), 1024)
            .await?;
        if status.as_u16() != 200 {
            return Err(status_error(
                &url,
                key,
                Needs::Write,
                status.as_u16(),
                &body,
            ));
        }
        decode_bool(&url, &body)
    }

    /// Deletes `key`; returns Consul's `true`/`false`.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.delete_with(key, None).await
    }

    /// Deletes `key` only if its ModifyIndex is still `cas`; `false` when
    /// the check-and-set lost.
    pub async fn delete_cas(&self, key: &str, cas: u64) -> Result<bool> {
        self.delete_with(key, Some(cas)).await
    }

    async fn delete_with(&self, key: &str, cas: Option<u64>) -> Result<bool> {
        validate_key(key, false)?;
        // A `None` value means a bare flag (`?raw`), so leave `cas` out
        // entirely for a plain delete.
        let params: Vec<(&str, Option<String>)> = cas
            .map(|c| ("cas", Some(c.to_string())))
            .into_iter()
            .collect();
        let url = self.url(key, &params);
        let (status, _, body) = self
            .exchange(
                self.inner.http.delete(&url),
                &url,
                self.settings().request_timeout(false),
                1024,
            )
            .await?;
        if status.as_u16() != 200 {
            return Err(status_error(
                &url,
                key,
                Needs::Write,
                status.as_u16(),
                &body,
            ));
        }
        decode_bool(&url, &body)
    }

    /// Every pair under `prefix` (`?recurse`); empty when there is none.
    pub async fn list(&self, prefix: &str) -> Result<Vec<KvPair>> {
        validate_key(prefix, true)?;
        let url = self.url(prefix, &[("recurse", None)]);
        let (status, headers, body) = self
            .exchange(
                self.inner.http.get(&url),
                &url,
                self.settings().request_timeout(false),
                MAX_LIST_BODY,
            )
            .await?;
        consul_index(&url, status.as_u16(), &headers)?;
        match status.as_u16() {
            200 => decode_pairs(&url, &body),
            404 => Ok(Vec::new()),
            s => Err(status_error(&url, prefix, Needs::List, s, &body)),
        }
    }

    /// [`ConsulClient::list`] as a blocking query: returns when the
    /// prefix's index passes `opts.index` (or `wait` runs out), with the
    /// `X-Consul-Index` to pass next time. The fleet page's one watch.
    pub async fn list_blocking(
        &self,
        prefix: &str,
        opts: &QueryOptions,
    ) -> Result<(u64, Vec<KvPair>)> {
        validate_key(prefix, true)?;
        let mut params: Vec<(&str, Option<String>)> = vec![("recurse", None)];
        let blocking = opts.index > 0;
        if blocking {
            params.push(("index", Some(opts.index.to_string())));
            if let Some(w) = opts.wait {
                params.push(("wait", Some(format!("{}ms", w.min(MAX_WAIT).as_millis()))));
            }
        }
        let url = self.url(prefix, &params);
        let timeout = self.settings().request_timeout(blocking);
        let (status, headers, body) = self
            .exchange(self.inner.http.get(&url), &url, timeout, MAX_LIST_BODY)
            .await?;
        let index = consul_index(&url, status.as_u16(), &headers)?;
        match status.as_u16() {
            200 => Ok((index, decode_pairs(&url, &body)?)),
            404 => Ok((index, Vec::new())),
            s => Err(status_error(&url, prefix, Needs::List, s, &body)),
        }
    }
}

fn split_host_port(hostport: &str, default_port: u16) -> Option<(String, u16)> {
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    if let Some(rest) = hostport.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if tail.is_empty() => default_port,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((hostport.to_string(), default_port)),
    }
}

/// What identifies a version of the token file without reading it.
fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// `X-Consul-Index` of a read's answer. Consul sends it with every 200 and
/// 404 of the KV read endpoint; an answer without it comes from something
/// that is not Consul (a web server answering 404 at the configured
/// address), which must be an error, not "nothing published".
fn consul_index(url: &str, status: u16, h: &reqwest::header::HeaderMap) -> Result<u64> {
    match (status, header_u64(h, "x-consul-index")) {
        (200 | 404, Some(i)) => Ok(i),
        (200 | 404, None) => Err(Error::NotConsul {
            url: url.to_string(),
            detail: format!(
                "a {status} without the X-Consul-Index header every Consul KV read carries"
            ),
        }),
        _ => Ok(0),
    }
}

fn header_u64(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn transport_error(url: &str, e: reqwest::Error) -> Error {
    // reqwest's own timeouts are not set (we bound the whole exchange
    // ourselves), but a connect timeout can still surface here.
    if e.is_timeout() {
        return Error::ConsulTimeout {
            url: url.to_string(),
            timeout: CONNECT_TIMEOUT,
        };
    }
    let mut message = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        message.push_str(": ");
        message.push_str(&s.to_string());
        src = s.source();
    }
    Error::ConsulConnect {
        url: url.to_string(),
        message,
    }
}

/// The ACL permission a request needs, named in 403 errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Read,
    List,
    Write,
}

impl Needs {
    fn as_str(self) -> &'static str {
        match self {
            Needs::Read => "key:read",
            Needs::List => "key:list (key_prefix ... policy = \"list\" or \"read\")",
            Needs::Write => "key:write",
        }
    }
}

fn status_error(url: &str, key: &str, needs: Needs, status: u16, body: &[u8]) -> Error {
    let mut body = String::from_utf8_lossy(body).trim().to_string();
    if body.len() > 200 {
        let mut cut = 200;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    match status {
        403 => Error::ConsulForbidden {
            url: url.into(),
            key: key.into(),
            body,
            permission: needs.as_str(),
        },
        429 => Error::ConsulRateLimited { url: url.into() },
        _ => Error::ConsulStatus {
            url: url.into(),
            status,
            body,
        },
    }
}

fn decode_pairs(url: &str, body: &[u8]) -> Result<Vec<KvPair>> {
    let raw: Vec<JsonPair> = serde_json::from_slice(body).map_err(|e| Error::ConsulDecode {
        url: url.into(),
        message: format!("bad JSON: {e}"),
    })?;
    raw.into_iter()
        .map(|p| {
            let value = match p.value {
                None => Vec::new(),
                Some(v) => base64::engine::general_purpose::STANDARD
                    .decode(v.as_bytes())
                    .map_err(|e| Error::ConsulDecode {
                        url: url.into(),
                        message: format!("bad base64 in the value of {}: {e}", p.key),
                    })?,
            };
            if value.len() > MAX_VALUE_SIZE {
                return Err(Error::ConsulValueTooLarge {
                    key: p.key,
                    size: value.len(),
                });
            }
            Ok(KvPair {
                key: p.key,
                value,
                modify_index: p.modify_index,
                create_index: p.create_index,
                flags: p.flags,
            })
        })
        .collect()
}

fn decode_bool(url: &str, body: &[u8]) -> Result<bool> {
    match String::from_utf8_lossy(body).trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(Error::ConsulDecode {
            url: url.into(),
            message: format!("expected true or false, got {other:?}"),
        }),
    }
}

/// Rule 15: `[A-Za-z0-9._/-]`, no leading `/`, no `..`. A prefix may be
/// empty.
pub fn validate_key(key: &str, prefix: bool) -> Result<()> {
    let bad = |reason| {
        Err(Error::ConsulKey {
            key: key.into(),
            reason,
        })
    };
    if key.is_empty() && !prefix {
        return bad("empty");
    }
    if key.starts_with('/') {
        return bad("leading /");
    }
    if key.contains("..") {
        return bad("contains ..");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
    {
        return bad("character outside A-Z a-z 0-9 . _ / -");
    }
    Ok(())
}

/// Percent-encodes everything but unreserved characters (and `/` in a
/// path).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'.' | b'_' | b'-' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

/// Rule 8: a token bucket on `tokio::time` instants (a paused test clock
/// steers it too).
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    refill: Duration,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: RateLimit, now: Instant) -> Self {
        let capacity = f64::from(rate.burst.max(1));
        TokenBucket {
            capacity,
            tokens: capacity,
            refill: rate.refill_interval,
            last: now,
        }
    }

    /// Takes a token, or says how long until one is available (nothing is
    /// taken then).
    pub fn try_take(&mut self, now: Instant) -> std::result::Result<(), Duration> {
        if self.refill.is_zero() {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens =
            (self.tokens + elapsed.as_secs_f64() / self.refill.as_secs_f64()).min(self.capacity);
        // Tolerate float rounding after sleeping exactly the deficit.
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            Ok(())
        } else {
            Err(self.refill.mul_f64(1.0 - self.tokens))
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

    /// After a success.
    pub fn reset(&mut self) {
        self.next = self.cfg.initial;
    }
}

/// A random duration in [d/2, d].
fn jitter_half(d: Duration, rng: &mut impl Rng) -> Duration {
    let half = d / 2;
    half + random_below(d - half, rng)
}

fn random_below(d: Duration, rng: &mut impl Rng) -> Duration {
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rng.gen_range(0..=ms))
}

/// Sleeps unless cancelled; `false` if cancelled.
async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
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

    #[test]
    fn keys_are_validated_and_encoded() {
        assert!(validate_key("deploy/web/prod", false).is_ok());
        assert!(validate_key("a-b_c.d", false).is_ok());
        assert!(validate_key("", false).is_err());
        assert!(validate_key("", true).is_ok());
        assert!(validate_key("/deploy", false).is_err());
        assert!(validate_key("deploy/../x", false).is_err());
        assert!(validate_key("deploy web", false).is_err());
        assert!(validate_key("deploy?raw", false).is_err());
        assert_eq!(encode("a/b c?", true), "a/b%20c%3F");
        assert_eq!(encode("a/b", false), "a%2Fb");
    }

    #[test]
    fn env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "from-file\n").unwrap();
        let env = |k: &str| -> Option<String> {
            match k {
                "CONSUL_HTTP_ADDR" => Some("10.0.0.1:8501".into()),
                "CONSUL_HTTP_SSL" => Some("true".into()),
                "CONSUL_HTTP_TOKEN" => Some("from-env".into()),
                "CONSUL_HTTP_TOKEN_FILE" => Some(token_file.display().to_string()),
                "CONSUL_HTTP_SSL_VERIFY" => Some("false".into()),
                "CONSUL_TLS_SERVER_NAME" => Some("consul.local".into()),
                "CONSUL_NAMESPACE" => Some("team".into()),
                "CONSUL_PARTITION" => Some("p1".into()),
                "CONSUL_CACERT" => Some("/etc/ca.pem".into()),
                _ => None,
            }
        };
        let s = ConsulSettings::default().from_env_with(env).unwrap();
        assert_eq!(s.address, "https://10.0.0.1:8501");
        assert_eq!(s.token.as_deref(), Some("from-file"));
        assert!(!s.ssl_verify);
        assert_eq!(s.tls_server_name.as_deref(), Some("consul.local"));
        assert_eq!(s.namespace.as_deref(), Some("team"));
        assert_eq!(s.partition.as_deref(), Some("p1"));
        assert_eq!(s.ca_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert!(!format!("{s:?}").contains("from-file"), "token redacted");
        let bad = ConsulSettings::default()
            .from_env_with(|k| (k == "CONSUL_HTTP_SSL_VERIFY").then(|| "maybe".to_string()));
        assert!(bad.is_err());
        let none = ConsulSettings::default().from_env_with(|_| None).unwrap();
        assert_eq!(none.address, "http://127.0.0.1:8500");
    }

    #[test]
    fn timeout_covers_wait_and_jitter() {
        let s = ConsulSettings::default();
        assert_eq!(
            s.request_timeout(true),
            Duration::from_secs(300) + Duration::from_millis(18750) + Duration::from_secs(7)
        );
        assert_eq!(s.request_timeout(false), Duration::from_secs(7));
    }

    #[test]
    fn client_builds_urls_with_params() {
        let s = ConsulSettings {
            address: "http://127.0.0.1:8500/".into(),
            datacenter: Some("dc2".into()),
            namespace: Some("ns a".into()),
            ..Default::default()
        };
        let c = ConsulClient::new(&s).unwrap();
        assert_eq!(
            c.url(
                "deploy/web/prod",
                &[("index", Some("5".into())), ("stale", None)]
            ),
            "http://127.0.0.1:8500/v1/kv/deploy/web/prod?index=5&stale&dc=dc2&ns=ns%20a"
        );
        assert!(ConsulClient::new(&ConsulSettings {
            address: "unix:///tmp/consul.sock".into(),
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn tls_settings_are_checked_at_construction() {
        let c = ConsulClient::new(&ConsulSettings {
            address: "https://127.0.0.1:8501".into(),
            tls_server_name: Some("consul.service.internal".into()),
            ..Default::default()
        })
        .unwrap();
        // Certificates are verified against the configured name, while the
        // connection still goes to 127.0.0.1 (pinned resolution).
        assert_eq!(c.address(), "https://consul.service.internal:8501");
        let missing_ca = ConsulClient::new(&ConsulSettings {
            address: "https://127.0.0.1:8501".into(),
            ca_cert: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            missing_ca.to_string().contains("/nonexistent/ca.pem"),
            "{missing_ca}"
        );
        let half_identity = ConsulClient::new(&ConsulSettings {
            client_cert: Some("/tmp/cert.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            half_identity.to_string().contains("CONSUL_CLIENT_KEY"),
            "{half_identity}"
        );
        let insecure = ConsulClient::new(&ConsulSettings {
            address: "https://10.1.2.3".into(),
            ssl_verify: false,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(insecure.address(), "https://10.1.2.3");
        assert_eq!(
            ConsulClient::new(&ConsulSettings {
                wait: Duration::from_secs(3600),
                ..Default::default()
            })
            .unwrap()
            .settings()
            .wait,
            MAX_WAIT
        );
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
