//! A Consul-compatible KV HTTP server for tests and `deploy-agent demo`.
//!
//! It serves `/v1/kv/<key>` on a real loopback socket and answers the way
//! Consul 1.9.0 does in the recorded exchanges under
//! `tests/data/consul-reference/` (status, headers, JSON shape, blocking-query
//! semantics, ACL errors). `tests/agent/consul_reference.rs` replays every recorded
//! exchange against it, so where this file and the recordings disagree, the
//! test fails. The behaviours measured by hand (`WAKEUPS.md` there: which
//! writes wake a blocking query on a missing key, deletes waking listings,
//! ACL-filtered listings, parameter parsing) are checked by
//! `tests/agent/consul_wakeups.rs`.
//!
//! On top of Consul it can misbehave on demand ([`Fault`]): answer an error
//! status, drop connections, stall, move its index backwards (a snapshot
//! restore) or go down and come back on the same port.
//!
//! Everything lives in memory; if the process dies the store is simply gone,
//! which is what a test wants.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::percent_decode;

/// Consul's `kv_max_value_size` default: larger values get a 413.
pub const MAX_VALUE_SIZE: usize = 512 * 1024;
/// Consul caps `wait` at 10 minutes.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's default `wait` when a blocking query gives none.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Bodies above this are not even buffered (the 413 message uses the length
/// read so far); keeps a misbehaving test from eating memory.
const MAX_BUFFERED_BODY: usize = 16 * 1024 * 1024;

/// How the server starts.
#[derive(Debug, Clone, Default)]
pub struct ConsulServerConfig {
    /// Address to bind; `None` binds `127.0.0.1:0`.
    pub addr: Option<SocketAddr>,
    /// ACLs with `default_policy = "deny"`; `None` disables ACLs (tokens are
    /// then ignored, even unknown ones, as in 23-*.txt).
    pub acl: Option<AclConfig>,
    /// Datacenter name; a `?dc=` naming another one gets a 500 like Consul.
    /// Empty means `dc1`.
    pub datacenter: String,
}

/// ACL configuration: a management token plus tokens with key-prefix rules.
#[derive(Debug, Clone, Default)]
pub struct AclConfig {
    /// Management ("master") token: may do anything.
    pub master_token: String,
    /// Other known tokens.
    pub tokens: Vec<AclToken>,
}

/// One ACL token and its `key_prefix` rules (longest matching prefix wins;
/// no match denies).
#[derive(Debug, Clone)]
pub struct AclToken {
    pub secret_id: String,
    pub rules: Vec<(String, KeyPolicy)>,
}

/// A `key_prefix` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPolicy {
    Deny,
    Read,
    Write,
}

/// Misbehaviour on demand, set with [`ConsulServer::set_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Answer like Consul.
    #[default]
    None,
    /// Answer every request with this status (500, 503, 429, ...) and a
    /// plain-text body.
    Status(u16),
    /// Close the connection without answering.
    Drop,
    /// Hold each request this long, then answer normally.
    Stall(Duration),
}

/// One entry of the KV store, as the handle returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

/// One request as the server saw it (faulted ones included).
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// When the request arrived.
    pub at: Instant,
    pub method: String,
    /// The decoded key (path after `/v1/kv/`).
    pub key: String,
    /// The raw query string.
    pub query: String,
    /// The `X-Consul-Token` header, if any.
    pub header_token: Option<String>,
}

/// A running server. Dropping it shuts it down.
#[derive(Debug)]
pub struct ConsulServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Mutex<Option<(JoinHandle<()>, CancellationToken)>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bumped on every change of the store; blocking queries wait on it.
    changed: watch::Sender<u64>,
    acl: Option<AclConfig>,
    datacenter: String,
    fault: Mutex<(Fault, Option<u64>)>,
    last_contact_ms: AtomicU64,
    requests: Mutex<Vec<RequestRecord>>,
    shutdown: CancellationToken,
    /// A lagging follower: when set, `?stale` reads see this frozen state.
    follower: Mutex<Option<State>>,
}

/// A frozen copy of the store, to play a lagging follower
/// ([`ConsulServer::set_follower`]).
#[derive(Debug, Clone)]
pub struct FollowerView(State);

#[derive(Debug, Default, Clone)]
struct State {
    kv: BTreeMap<String, Entry>,
    /// The `kvs`/`tombstones` table index: highest index of any KV write.
    index: u64,
    /// Counts snapshot restores, so blocking queries can be abandoned.
    restores: u64,
    /// Consul's graveyard: the index at which each key (or, for a
    /// recursive delete, each prefix) was deleted. A listing's index is the
    /// highest of its entries' and its tombstones' (Consul's `kvsListTxn`),
    /// which is what makes a blocking `?recurse`/`?keys` wake on a delete.
    /// Consul reaps tombstones after a while; a test never lives that long.
    tombstones: BTreeMap<String, u64>,
    /// The keys as memdb's `id` index stores them in its radix tree: the
    /// key bytes plus a NUL terminator. Kept beside `kv` so the radix model
    /// ([`RadixWatch`]) can work on bytes (a radix node may end inside a
    /// UTF-8 character).
    radix: BTreeSet<Vec<u8>>,
    /// Counts changes of the tree; `touches` holds the latest ones.
    seq: u64,
    /// The radix nodes recent changes wrote, tagged with their `seq`, so a
    /// blocking query on a missing key can tell whether its node changed.
    touches: VecDeque<(u64, Touch)>,
}

/// How many tree changes [`State::touches`] remembers. A blocking query
/// that fell further behind than this simply re-runs (Consul would at
/// worst have woken it too).
const TOUCH_LOG: usize = 4096;

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    flags: u64,
    create_index: u64,
    modify_index: u64,
}

/// Error returned by the service to make hyper close the connection without
/// answering ([`Fault::Drop`]).
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for DropConnection {}

/// Locks a mutex, ignoring poisoning: the state is plain data and every
/// critical section leaves it consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn record(&mut self, t: Touch) {
        self.seq += 1;
        if self.touches.len() >= TOUCH_LOG {
            self.touches.pop_front();
        }
        self.touches.push_back((self.seq, t));
    }

    /// The highest tombstone index under `prefix`, 0 when none.
    fn graveyard_max(&self, prefix: &str) -> u64 {
        self.tombstones
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0)
    }

    /// A listing's index, as Consul's `kvsListTxn`/`kvsKeysTxn` compute it:
    /// the highest `ModifyIndex` of the entries (`entries_max`, before any
    /// ACL filtering) or of the tombstones under the prefix, and the table
    /// index when both are 0 or the prefix is empty.
    fn list_index(&self, prefix: &str, entries_max: u64) -> u64 {
        let sub = if prefix.is_empty() {
            self.index
        } else {
            entries_max.max(self.graveyard_max(prefix))
        };
        if sub != 0 {
            sub
        } else {
            self.index
        }
    }
}

impl ConsulServer {
    /// Binds (default `127.0.0.1:0`) and starts serving on the current tokio
    /// runtime.
    pub async fn start(config: ConsulServerConfig) -> io::Result<ConsulServer> {
        let addr = config
            .addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (changed, _) = watch::channel(0);
        let datacenter = if config.datacenter.is_empty() {
            "dc1".to_string()
        } else {
            config.datacenter
        };
        let shared = Arc::new(Shared {
            // Consul never reports index 0 (clients would busy-loop); an
            // empty store already answers 1, so the first write is 2.
            state: Mutex::new(State {
                index: 1,
                ..State::default()
            }),
            changed,
            acl: config.acl,
            datacenter,
            fault: Mutex::new((Fault::None, None)),
            last_contact_ms: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
            shutdown: CancellationToken::new(),
            follower: Mutex::new(None),
        });
        let server = ConsulServer {
            shared,
            addr,
            accept: Mutex::new(None),
        };
        server.spawn_accept(listener);
        tracing::debug!(%addr, "consul test server listening");
        Ok(server)
    }

    fn spawn_accept(&self, listener: TcpListener) {
        let up = self.shared.shutdown.child_token();
        let task = tokio::spawn(accept_loop(listener, self.shared.clone(), up.clone()));
        *lock(&self.accept) = Some((task, up));
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `value` at `key` (like a PUT, bypassing ACLs and faults) and
    /// returns the new index. An identical value does not change the index.
    pub fn put(&self, key: &str, value: impl Into<Vec<u8>>) -> u64 {
        self.shared.write(key, value.into(), None, None);
        lock(&self.shared.state).index
    }

    /// Reads `key` directly from the store.
    pub fn get(&self, key: &str) -> Option<KvEntry> {
        lock(&self.shared.state).kv.get(key).map(|e| KvEntry {
            key: key.to_string(),
            value: e.value.clone(),
            flags: e.flags,
            create_index: e.create_index,
            modify_index: e.modify_index,
        })
    }

    /// Deletes `key`; returns the index afterwards.
    pub fn delete(&self, key: &str) -> u64 {
        self.shared.delete(key, false, None);
        lock(&self.shared.state).index
    }

    /// The current KV table index.
    pub fn index(&self) -> u64 {
        lock(&self.shared.state).index
    }

    /// Simulates a snapshot restore: the table index and every entry's
    /// indexes become at most `to`, and pending blocking queries return at
    /// once with the lower index.
    pub fn reset_index(&self, to: u64) {
        {
            let mut st = lock(&self.shared.state);
            st.index = to;
            st.restores += 1;
            for e in st.kv.values_mut() {
                e.create_index = e.create_index.min(to);
                e.modify_index = e.modify_index.min(to);
            }
            for i in st.tombstones.values_mut() {
                *i = (*i).min(to);
            }
        }
        self.shared.changed.send_modify(|g| *g += 1);
    }

    /// Sets the `X-Consul-Lastcontact` reported on `?stale` reads (default
    /// reads are answered "by the leader" and always report 0).
    pub fn set_last_contact(&self, d: Duration) {
        self.shared
            .last_contact_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// A copy of the store as it is now, for [`ConsulServer::set_follower`].
    pub fn follower_view(&self) -> FollowerView {
        FollowerView(lock(&self.shared.state).clone())
    }

    /// While `Some`, `?stale` reads are answered from `view`, like a
    /// follower that stopped replicating; default reads still see the
    /// leader's current state.
    pub fn set_follower(&self, view: Option<FollowerView>) {
        *lock(&self.shared.follower) = view.map(|v| v.0);
        self.shared.changed.send_modify(|g| *g += 1);
    }

    /// Applies `fault` to every request from now on (`Fault::None` heals).
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.shared.fault) = (fault, None);
    }

    /// Applies `fault` to the next `n` requests only.
    pub fn set_fault_for(&self, fault: Fault, n: u64) {
        *lock(&self.shared.fault) = if n == 0 {
            (Fault::None, None)
        } else {
            (fault, Some(n))
        };
    }

    /// Total requests received (faulted ones included).
    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// Requests received for `key`.
    pub fn requests_for(&self, key: &str) -> Vec<RequestRecord> {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.key == key)
            .cloned()
            .collect()
    }

    /// Goes down: stops accepting and closes every open connection (clients
    /// see refused or reset connections). [`ConsulServer::resume`] comes
    /// back on the same port.
    pub async fn pause(&self) {
        let current = lock(&self.accept).take();
        if let Some((task, up)) = current {
            up.cancel();
            // The accept loop only awaits accept() or the token: it ends
            // promptly, and then the port is free.
            let _ = task.await;
        }
    }

    /// Comes back on the same address after [`ConsulServer::pause`].
    pub async fn resume(&self) -> io::Result<()> {
        if lock(&self.accept).is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr).await?;
        self.spawn_accept(listener);
        Ok(())
    }

    /// Stops the server and every connection.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}

impl Drop for ConsulServer {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, up: CancellationToken) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Transient (EMFILE and friends): back off a little
                    // instead of spinning.
                    tracing::warn!(error = %e, "consul test server accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = up.cancelled() => return,
        };
        let shared = shared.clone();
        let conn_up = up.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { shared.handle(req).await }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            // Consul (Go net/http) writes canonical header names.
            builder.title_case_headers(true);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = conn_up.cancelled() => {}
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;

impl Shared {
    fn take_fault(&self) -> Fault {
        let mut f = lock(&self.fault);
        let fault = f.0;
        if let Some(n) = f.1.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                *f = (Fault::None, None);
            }
        }
        fault
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Resp, DropConnection> {
        let path = req.uri().path().to_string();
        let raw_query = req.uri().query().unwrap_or("").to_string();
        let query = parse_query(&raw_query);
        let header_token = req
            .headers()
            .get("x-consul-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let key = path
            .strip_prefix("/v1/kv/")
            .map(|p| percent_decode(p, false))
            .unwrap_or_default();
        lock(&self.requests).push(RequestRecord {
            at: Instant::now(),
            method: req.method().to_string(),
            key: key.clone(),
            query: raw_query.clone(),
            header_token: header_token.clone(),
        });

        match self.take_fault() {
            Fault::None => {}
            Fault::Status(code) => {
                let status =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let body = match code {
                    429 => "Your IP is issuing too many concurrent connections, please rate limit your calls\n",
                    503 => "No cluster leader",
                    _ => "rpc error making call: injected fault",
                };
                return Ok(self.text(status, body));
            }
            Fault::Drop => return Err(DropConnection),
            Fault::Stall(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = self.shutdown.cancelled() => return Err(DropConnection),
                }
            }
        }

        if !path.starts_with("/v1/kv/") {
            return Ok(self.text(StatusCode::NOT_FOUND, ""));
        }
        let method = req.method().clone();
        // Consul's handler wrapper refuses other methods before the KV
        // endpoint looks at anything else.
        if !matches!(method, Method::GET | Method::PUT | Method::DELETE) {
            return Ok(self.text(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("method {method} not allowed"),
            ));
        }
        // Consul accepts the token from the header or `?token=`.
        let token = header_token.or_else(|| q_get(&query, "token").map(str::to_string));

        if let Some(dc) = q_get(&query, "dc") {
            if !dc.is_empty() && dc != self.datacenter {
                return Ok(self.text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter"));
            }
        }

        match method {
            Method::GET => Ok(self.handle_get(&key, &query, token.as_deref()).await),
            Method::PUT => {
                if key.is_empty() {
                    return Ok(self.text(StatusCode::BAD_REQUEST, "Missing key name"));
                }
                // Consul's `KVSPut` order: parse `flags` and `cas` (a bad
                // one is the plain error, a 500), check the size (413), and
                // only then the RPC checks the ACL (403).
                let flags = match q_get(&query, "flags").map(go_parse_uint) {
                    None => None,
                    Some(Ok(f)) => Some(f),
                    Some(Err(msg)) => return Ok(self.text(StatusCode::INTERNAL_SERVER_ERROR, &msg)),
                };
                let cas = match q_get(&query, "cas").map(go_parse_uint) {
                    None => None,
                    Some(Ok(c)) => Some(c),
                    Some(Err(msg)) => return Ok(self.text(StatusCode::INTERNAL_SERVER_ERROR, &msg)),
                };
                let body = match Limited::new(req.into_body(), MAX_BUFFERED_BODY)
                    .collect()
                    .await
                {
                    Ok(b) => b.to_bytes(),
                    Err(_) => return Err(DropConnection),
                };
                if body.len() > MAX_VALUE_SIZE {
                    let msg = format!(
                        "Request body({} bytes) too large, max size: {} bytes. See https://www.consul.io/docs/agent/options.html#kv_max_value_size.",
                        body.len(),
                        MAX_VALUE_SIZE
                    );
                    let mut resp = self.text(StatusCode::PAYLOAD_TOO_LARGE, &msg);
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                    return Ok(resp);
                }
                if let Err(msg) = self.authorize(token.as_deref(), &key, true) {
                    return Ok(self.text(StatusCode::FORBIDDEN, msg));
                }
                let ok = self.write(&key, body.to_vec(), flags, cas);
                Ok(self.json_bool(ok))
            }
            Method::DELETE => {
                let recurse = q_has(&query, "recurse");
                if key.is_empty() && !recurse {
                    return Ok(self.text(StatusCode::BAD_REQUEST, "Missing key name"));
                }
                let cas = match q_get(&query, "cas").map(go_parse_uint) {
                    None => None,
                    Some(Ok(c)) => Some(c),
                    Some(Err(msg)) => return Ok(self.text(StatusCode::INTERNAL_SERVER_ERROR, &msg)),
                };
                if let Err(msg) = self.authorize(token.as_deref(), &key, true) {
                    return Ok(self.text(StatusCode::FORBIDDEN, msg));
                }
                let ok = self.delete(&key, recurse, cas);
                Ok(self.json_bool(ok))
            }
            // Refused above.
            _ => Ok(self.text(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("method {method} not allowed"),
            )),
        }
    }

    async fn handle_get(
        &self,
        key: &str,
        query: &[(String, Option<String>)],
        token: Option<&str>,
    ) -> Resp {
        // Consul parses `wait` before `index` (12-*.txt has both). Both go
        // through `query.Get(..) != ""`: an empty value is no value.
        let wait = match q_get(query, "wait").filter(|w| !w.is_empty()) {
            None => None,
            Some(w) => match parse_go_duration(w) {
                Some(d) => Some(d),
                None => return self.text(StatusCode::BAD_REQUEST, "Invalid wait time"),
            },
        };
        let min_index = match q_get(query, "index").filter(|i| !i.is_empty()) {
            None => 0,
            Some(i) => match i.parse::<u64>() {
                Ok(i) => i,
                Err(_) => return self.text(StatusCode::BAD_REQUEST, "Invalid index"),
            },
        };
        let stale = q_has(query, "stale");
        if stale && q_has(query, "consistent") {
            return self.text(
                StatusCode::BAD_REQUEST,
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            );
        }
        let recurse = q_has(query, "recurse");
        let keys = q_has(query, "keys");
        let raw = q_has(query, "raw");
        if key.is_empty() && !recurse && !keys {
            return self.text(StatusCode::BAD_REQUEST, "Missing key name");
        }
        if recurse || keys {
            // A listing is filtered to what the token may read (Consul's
            // `FilterDirEnt`/`FilterKeys`), so only an unknown token is an
            // error.
            if let Err(msg) = self.resolve(token) {
                return self.text(StatusCode::FORBIDDEN, msg);
            }
        } else if let Err(msg) = self.authorize(token, key, false) {
            return self.text(StatusCode::FORBIDDEN, msg);
        }
        let readable = |k: &str| self.authorize(token, k, false).is_ok();
        let separator = q_get(query, "separator").map(str::to_string);
        let last_contact = if stale {
            self.last_contact_ms.load(Ordering::Relaxed)
        } else {
            0
        };

        let mut timeout = match wait {
            Some(w) if w > MAX_WAIT => MAX_WAIT,
            Some(w) if !w.is_zero() => w,
            _ => DEFAULT_WAIT,
        };
        // Consul adds up to wait/16 of jitter so a fleet does not come back
        // in lockstep.
        let jitter_ms = (timeout.as_millis() / 16) as u64;
        if jitter_ms > 0 {
            timeout += Duration::from_millis(rand::thread_rng().gen_range(0..=jitter_ms));
        }
        let deadline = Instant::now() + timeout;
        let mut rx = self.changed.subscribe();
        let restores_at_start = lock(&self.state).restores;
        loop {
            // Mark the current generation seen before reading, so a write
            // between the read and the wait still wakes us.
            rx.borrow_and_update();
            let (resp, mut parked) = {
                let leader = lock(&self.state);
                let follower = if stale {
                    lock(&self.follower).clone()
                } else {
                    None
                };
                let restored = leader.restores != restores_at_start;
                let st: &State = follower.as_ref().unwrap_or(&leader);
                let (index, resp) = if recurse {
                    self.answer_list(st, key, &readable, last_contact)
                } else if keys {
                    self.answer_keys(st, key, separator.as_deref(), &readable, last_contact)
                } else {
                    self.answer_one(st, key, last_contact, raw)
                };
                // Consul never reports index 0: a client would busy-loop.
                let index = index.max(1);
                if min_index == 0 || index > min_index || restored {
                    return resp;
                }
                // Not newer than the caller's index: hold it, and answer
                // this if nothing changes before the deadline.
                //
                // A missing key's answer carries the table index, which any
                // write raises; Consul re-runs the query only when the radix
                // node it is parked on changes (the model above
                // `RadixWatch`), so remember that node. Everything else
                // re-runs on every change and answers only once its index
                // moved, which is what its watch channels amount to: an
                // existing key's leaf, a listing's prefix node and
                // graveyard. A frozen follower view never changes under
                // it, so it simply re-runs.
                let parked = (follower.is_none() && !recurse && !keys && !st.kv.contains_key(key))
                    .then(|| Parked {
                        node: radix_watch(&st.radix, &terminated(key)),
                        seen: st.seq,
                    });
                (resp, parked)
            };
            loop {
                tokio::select! {
                    _ = rx.changed() => {}
                    _ = tokio::time::sleep_until(deadline) => return resp,
                    _ = self.shutdown.cancelled() => return resp,
                }
                let Some(p) = parked.as_mut() else { break };
                // Everything up to the state read below is checked here;
                // a later change bumps the generation again.
                rx.borrow_and_update();
                let st = lock(&self.state);
                if st.restores != restores_at_start
                    || (stale && lock(&self.follower).is_some())
                    || p.woken(&st)
                {
                    break;
                }
            }
        }
    }

    fn answer_one(&self, st: &State, key: &str, last_contact: u64, raw: bool) -> (u64, Resp) {
        match st.kv.get(key) {
            None => {
                let idx = st.index.max(1);
                (
                    idx,
                    self.meta(self.empty(StatusCode::NOT_FOUND), idx, last_contact),
                )
            }
            Some(e) => {
                let idx = e.modify_index.max(1);
                let resp = if raw {
                    let mut r = self.base(StatusCode::OK, Bytes::from(e.value.clone()));
                    // Go's ResponseWriter sniffs the type on the first
                    // write; an empty value is never written, so it has none.
                    if !e.value.is_empty() {
                        r.headers_mut().insert(
                            CONTENT_TYPE,
                            HeaderValue::from_static(sniff_content_type(&e.value)),
                        );
                    }
                    r
                } else {
                    self.json(StatusCode::OK, &[JsonPair::new(key, e)])
                };
                (idx, self.meta(resp, idx, last_contact))
            }
        }
    }

    /// `?recurse`: the entries under `prefix` that `readable` allows. The
    /// index is computed before the ACL filter, as Consul does; an empty
    /// result is a 404 that still carries it.
    fn answer_list(
        &self,
        st: &State,
        prefix: &str,
        readable: &dyn Fn(&str) -> bool,
        last_contact: u64,
    ) -> (u64, Resp) {
        let mut max = 0;
        let pairs: Vec<JsonPair<'_>> = st
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .inspect(|(_, e)| max = max.max(e.modify_index))
            .filter(|(k, _)| readable(k))
            .map(|(k, e)| JsonPair::new(k, e))
            .collect();
        let idx = st.list_index(prefix, max).max(1);
        let resp = if pairs.is_empty() {
            self.empty(StatusCode::NOT_FOUND)
        } else {
            self.json(StatusCode::OK, &pairs)
        };
        (idx, self.meta(resp, idx, last_contact))
    }

    /// `?keys`: like [`Shared::answer_list`], names only, folded at
    /// `separator`.
    fn answer_keys(
        &self,
        st: &State,
        prefix: &str,
        separator: Option<&str>,
        readable: &dyn Fn(&str) -> bool,
        last_contact: u64,
    ) -> (u64, Resp) {
        let mut keys: Vec<String> = Vec::new();
        let mut max = 0;
        for (k, e) in st
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            max = max.max(e.modify_index);
            let rest = &k[prefix.len()..];
            let shown = match separator.filter(|s| !s.is_empty()).and_then(|s| {
                rest.find(s)
                    .map(|i| format!("{prefix}{}", &rest[..i + s.len()]))
            }) {
                Some(folder) => folder,
                None => k.clone(),
            };
            if keys.last() != Some(&shown) {
                keys.push(shown);
            }
        }
        keys.retain(|k| readable(k));
        let idx = st.list_index(prefix, max).max(1);
        let resp = if keys.is_empty() {
            self.empty(StatusCode::NOT_FOUND)
        } else {
            self.json(StatusCode::OK, &keys)
        };
        (idx, self.meta(resp, idx, last_contact))
    }

    /// Applies a write; returns false when a `cas` check fails.
    fn write(&self, key: &str, value: Vec<u8>, flags: Option<u64>, cas: Option<u64>) -> bool {
        let changed = {
            let mut st = lock(&self.state);
            let existing = st.kv.get(key).cloned();
            match (cas, &existing) {
                (Some(0), Some(_)) => return false,
                (Some(c), Some(e)) if c != 0 && e.modify_index != c => return false,
                (Some(c), None) if c != 0 => return false,
                _ => {}
            }
            let flags = flags.unwrap_or(0);
            match existing {
                // Writing an identical value is a no-op in Consul's state
                // store: ModifyIndex stays (docs/consul-watch-rules.md rule 18).
                Some(e) if e.value == value && e.flags == flags => false,
                _ => {
                    st.index += 1;
                    let idx = st.index;
                    let create_index = existing.map(|e| e.create_index).unwrap_or(idx);
                    let q = terminated(key);
                    st.record(Touch::Set(q.clone()));
                    st.radix.insert(q);
                    st.kv.insert(
                        key.to_string(),
                        Entry {
                            value,
                            flags,
                            create_index,
                            modify_index: idx,
                        },
                    );
                    true
                }
            }
        };
        if changed {
            self.changed.send_modify(|g| *g += 1);
        }
        true
    }

    fn delete(&self, key: &str, recurse: bool, cas: Option<u64>) -> bool {
        let changed = {
            let mut st = lock(&self.state);
            let existing = st.kv.get(key).map(|e| e.modify_index);
            if let Some(c) = cas {
                // Consul's `kvsDeleteCASTxn` answers `entry == nil` when
                // the index does not match: a missing key is `true`.
                if existing.is_some_and(|i| i != c) {
                    return false;
                }
            }
            let doomed: Vec<String> = if recurse {
                st.kv
                    .range(key.to_string()..)
                    .take_while(|(k, _)| k.starts_with(key))
                    .map(|(k, _)| k.clone())
                    .collect()
            } else if st.kv.contains_key(key) {
                vec![key.to_string()]
            } else {
                Vec::new()
            };
            if doomed.is_empty() {
                false
            } else {
                st.index += 1;
                let idx = st.index;
                // The radix path the delete walks, and the top of the
                // subtree it removes (`DeletePrefix` takes the prefix
                // without the terminator).
                let (path, top) = if recurse {
                    let first = terminated(&doomed[0]);
                    let last = terminated(&doomed[doomed.len() - 1]);
                    (key.as_bytes().to_vec(), top_of(&first, &last))
                } else {
                    (terminated(key), terminated(key))
                };
                let merged = merged_sibling(&st.radix, &top);
                st.record(Touch::Delete { path, merged });
                for k in doomed {
                    st.radix.remove(&terminated(&k));
                    st.kv.remove(&k);
                }
                // One tombstone per delete: the key, or the prefix of a
                // recursive delete (Consul's `kvsDeleteTreeTxn`).
                st.tombstones.insert(key.to_string(), idx);
                true
            }
        };
        if changed {
            self.changed.send_modify(|g| *g += 1);
        }
        true
    }

    /// Checks that `token` is one Consul would know (no token is the
    /// anonymous token); `Err` is the 403 body.
    fn resolve(&self, token: Option<&str>) -> Result<(), &'static str> {
        let Some(acl) = &self.acl else { return Ok(()) };
        match token {
            None | Some("") => Ok(()),
            Some(t) if t == acl.master_token || acl.tokens.iter().any(|k| k.secret_id == t) => {
                Ok(())
            }
            Some(_) => Err("ACL not found"),
        }
    }

    /// `Err(message)` is the 403 body Consul would send.
    fn authorize(&self, token: Option<&str>, key: &str, write: bool) -> Result<(), &'static str> {
        let Some(acl) = &self.acl else { return Ok(()) };
        let token = match token {
            None | Some("") => return Err("Permission denied"),
            Some(t) => t,
        };
        if token == acl.master_token {
            return Ok(());
        }
        let Some(t) = acl.tokens.iter().find(|t| t.secret_id == token) else {
            return Err("ACL not found");
        };
        let policy = t
            .rules
            .iter()
            .filter(|(prefix, _)| key.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, p)| *p)
            .unwrap_or(KeyPolicy::Deny);
        match (policy, write) {
            (KeyPolicy::Write, _) | (KeyPolicy::Read, false) => Ok(()),
            _ => Err("Permission denied"),
        }
    }

    fn acl_policy(&self) -> &'static str {
        if self.acl.is_some() {
            "deny"
        } else {
            "allow"
        }
    }

    fn base(&self, status: StatusCode, body: Bytes) -> Resp {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert("vary", HeaderValue::from_static("Accept-Encoding"));
        h.insert(
            "x-consul-default-acl-policy",
            HeaderValue::from_static(self.acl_policy()),
        );
        r
    }

    fn empty(&self, status: StatusCode) -> Resp {
        self.base(status, Bytes::new())
    }

    fn text(&self, status: StatusCode, body: &str) -> Resp {
        let mut r = self.base(status, Bytes::from(body.to_string()));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }

    fn json(&self, status: StatusCode, value: &impl Serialize) -> Resp {
        let mut r = self.base(status, Bytes::from(go_json(value)));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }

    fn json_bool(&self, ok: bool) -> Resp {
        self.json(StatusCode::OK, &ok)
    }

    fn meta(&self, mut r: Resp, index: u64, last_contact_ms: u64) -> Resp {
        let h = r.headers_mut();
        h.insert("x-consul-index", HeaderValue::from(index));
        h.insert("x-consul-knownleader", HeaderValue::from_static("true"));
        h.insert("x-consul-lastcontact", HeaderValue::from(last_contact_ms));
        r
    }
}

// ---------------------------------------------------------------------------
// Which writes wake a blocking query on a missing key.
//
// Consul keeps the KV store in go-memdb, whose `id` index is an immutable
// radix tree (go-immutable-radix) over the key bytes plus a NUL terminator.
// A blocking GET of one key gets its watch channel from `GetWatch(key\0)`:
// - the key exists: the channel of its leaf, closed only when that key is
//   updated or deleted (file 07: other writes do not wake it);
// - the key is missing: the channel of the deepest node the search reached,
//   which is either the last node whose whole path is a prefix of `key\0`
//   (no edge for the next byte) or the node behind the matching edge whose
//   label diverges from the key part-way.
// A transaction closes the channel of every node it copies: on an insert or
// update, every node on the written key's path, plus the node it splits
// when the key diverges inside an edge label; on a delete, every node on
// the deleted key's (or prefix's) path, the removed subtree, and a sibling
// that gets merged into its parent when the parent is left with one child.
// After a wake-up the query re-runs and answers the (higher) table index: a
// 404 with a new index, even though this key did not change (file 24).
//
// The tree is canonical (nodes only at the root, at keys, and where keys
// branch), so everything follows from the sorted key set. With `w` the path
// of the watched node and `pl` the path length of its parent:
// - a write (insert or update) of `k` touches it iff `lcp(k\0, w) > pl`:
//   either `w` is on the path of `k\0`, or `k\0` follows the edge into the
//   node and diverges inside its label (a split);
// - a delete touches it iff `w` is on the deleted path, inside the deleted
//   subtree, or is the sibling merged into the parent;
// - the root (no parent) is written by every change.
// Example from WAKEUPS.md: with `a/b/hosts/h0` and `a/b/production` stored,
// `a/b/freeze` parks on the node `a/b/` (parent: root). Writes to
// `a/b/hosts/h1` or `a/b/production` pass through it and wake the query;
// `zz/other` shares nothing with it and does not. A longest-common-prefix
// rule alone would miss the split (a write to `a/c` splits `a/b/` into
// `a/` + `b/`, which wakes the query) and the merge (deleting one of two
// children merges the other into the parent, which wakes a query parked on
// that other child); both follow from go-immutable-radix's code, and were
// not measured separately.
// ---------------------------------------------------------------------------

/// Radix nodes one change of the store wrote (see the model above).
#[derive(Debug, Clone)]
enum Touch {
    /// A key was inserted or its entry changed; holds `key\0`.
    Set(Vec<u8>),
    /// A key (`key\0`) or, for a recursive delete, a prefix (no NUL) was
    /// deleted; `merged` is the path of the sibling merged into the parent.
    Delete {
        path: Vec<u8>,
        merged: Option<Vec<u8>>,
    },
}

/// The radix node a blocking query on a missing key is parked on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RadixWatch {
    /// The node's full path from the root.
    path: Vec<u8>,
    /// The length of its parent's path; `None` for the root itself.
    parent_len: Option<usize>,
}

impl RadixWatch {
    fn touched_by(&self, t: &Touch) -> bool {
        let Some(pl) = self.parent_len else {
            // Every change copies the root.
            return true;
        };
        match t {
            Touch::Set(k) => lcp(k, &self.path) > pl,
            Touch::Delete { path, merged } => {
                path.starts_with(&self.path)
                    || self.path.starts_with(path)
                    || merged.as_deref() == Some(self.path.as_slice())
            }
        }
    }
}

/// A blocking query parked on a radix node, and the last change it checked.
#[derive(Debug)]
struct Parked {
    node: RadixWatch,
    seen: u64,
}

impl Parked {
    /// Whether a change after `seen` wrote the node; marks them checked.
    /// An untouched node keeps its place in the tree, so `node` stays valid.
    fn woken(&mut self, st: &State) -> bool {
        if st.seq == self.seen {
            return false;
        }
        let lost = st
            .touches
            .front()
            .is_none_or(|(first, _)| *first > self.seen + 1);
        let woken = lost
            || st
                .touches
                .iter()
                .filter(|(s, _)| *s > self.seen)
                .any(|(_, t)| self.node.touched_by(t));
        self.seen = st.seq;
        woken
    }
}

/// `key` as memdb's string index stores it.
fn terminated(key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(key.len() + 1);
    v.extend_from_slice(key.as_bytes());
    v.push(0);
    v
}

fn lcp(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The smallest byte string above every string starting with `x`, `None`
/// when there is none (`x` is all 0xFF).
fn prefix_end(x: &[u8]) -> Option<Vec<u8>> {
    let mut v = x.to_vec();
    while let Some(last) = v.pop() {
        if last < 0xFF {
            v.push(last + 1);
            return Some(v);
        }
    }
    None
}

/// The stored (terminated) keys starting with `x`, in order.
fn with_prefix<'a>(
    set: &'a BTreeSet<Vec<u8>>,
    x: &[u8],
) -> std::collections::btree_set::Range<'a, Vec<u8>> {
    let hi = prefix_end(x).map_or(Bound::Unbounded, Bound::Excluded);
    set.range((Bound::Included(x.to_vec()), hi))
}

/// The path length of the parent of the node at `x`: the deepest branch
/// above it, where some key outside its subtree leaves `x`. Only the keys
/// right before and right after the subtree can share the most with `x`.
fn parent_len(set: &BTreeSet<Vec<u8>>, x: &[u8]) -> usize {
    let before = set
        .range::<Vec<u8>, _>((Bound::Unbounded, Bound::Excluded(x.to_vec())))
        .next_back();
    let after = prefix_end(x).and_then(|e| set.range(e..).next());
    [before, after]
        .into_iter()
        .flatten()
        .map(|k| lcp(k, x))
        .max()
        .unwrap_or(0)
}

/// The path of the node at the top of a non-empty sorted run of keys.
fn top_of(first: &[u8], last: &[u8]) -> Vec<u8> {
    first[..lcp(first, last)].to_vec()
}

/// Where `GetWatch(q)` parks for a `q` (`key\0`) that is not stored.
fn radix_watch(set: &BTreeSet<Vec<u8>>, q: &[u8]) -> RadixWatch {
    let before = set
        .range::<Vec<u8>, _>((Bound::Unbounded, Bound::Excluded(q.to_vec())))
        .next_back();
    let after = set
        .range::<Vec<u8>, _>((Bound::Excluded(q.to_vec()), Bound::Unbounded))
        .next();
    let m = [before, after]
        .into_iter()
        .flatten()
        .map(|k| lcp(k, q))
        .max()
        .unwrap_or(0);
    let mut run = with_prefix(set, &q[..m]);
    let (Some(first), true) = (run.next(), m > 0) else {
        // No stored key starts with q's first byte: the root has no edge
        // for it, so the search stops at the root.
        return RadixWatch {
            path: Vec::new(),
            parent_len: None,
        };
    };
    let last = run.next_back().unwrap_or(first);
    // Either the keys sharing m bytes with q branch right there (a node
    // that is a prefix of q, with no edge for q's next byte), or they all
    // continue together past m (the edge into their top node diverges from
    // q inside its label). Both cases: the top node of that run.
    let path = top_of(first, last);
    let parent_len = Some(parent_len(set, &path));
    RadixWatch { path, parent_len }
}

/// The sibling a delete of the subtree topped at `top` merges into its
/// parent: when the parent is not the root and keeps exactly one child.
fn merged_sibling(set: &BTreeSet<Vec<u8>>, top: &[u8]) -> Option<Vec<u8>> {
    let pl = parent_len(set, top);
    if pl == 0 {
        // The root never merges.
        return None;
    }
    let parent = &top[..pl];
    let mut rest = with_prefix(set, parent).filter(|k| !k.starts_with(top));
    let first = rest.next()?;
    let last = with_prefix(set, parent)
        .rev()
        .find(|k| !k.starts_with(top))
        .unwrap_or(first);
    // One remaining child iff all remaining keys leave the parent through
    // the same edge.
    (first.get(pl) == last.get(pl)).then(|| top_of(first, last))
}

/// The JSON shape of one KV pair, fields in Consul's order; `Session` is
/// omitted when empty, `Value` is `null` for an empty value.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct JsonPair<'a> {
    lock_index: u64,
    key: &'a str,
    flags: u64,
    value: Option<String>,
    create_index: u64,
    modify_index: u64,
}

impl<'a> JsonPair<'a> {
    fn new(key: &'a str, e: &Entry) -> Self {
        use base64::Engine as _;
        JsonPair {
            lock_index: 0,
            key,
            flags: e.flags,
            value: if e.value.is_empty() {
                None
            } else {
                Some(base64::engine::general_purpose::STANDARD.encode(&e.value))
            },
            create_index: e.create_index,
            modify_index: e.modify_index,
        }
    }
}

/// Serializes like Go's `json.MarshalIndent(v, "", "    ")` plus the
/// encoder's trailing newline, with Go's HTML-safe escapes.
fn go_json(value: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    if value.serialize(&mut ser).is_err() {
        // Our own plain structs cannot fail to serialize; answer something
        // visibly wrong rather than panic in a test server.
        return b"null\n".to_vec();
    }
    // `<`, `>` and `&` only ever occur inside JSON strings, so a byte-wise
    // replacement is exact.
    let mut escaped = Vec::with_capacity(out.len() + 1);
    for b in out {
        match b {
            b'<' => escaped.extend_from_slice(b"\\u003c"),
            b'>' => escaped.extend_from_slice(b"\\u003e"),
            b'&' => escaped.extend_from_slice(b"\\u0026"),
            _ => escaped.push(b),
        }
    }
    escaped.push(b'\n');
    escaped
}

/// Enough of Go's `http.DetectContentType` for KV values: Consul leaves
/// `?raw` responses to the ResponseWriter's sniffing.
fn sniff_content_type(data: &[u8]) -> &'static str {
    let head = &data[..data.len().min(512)];
    // HTML and XML signatures skip leading whitespace and compare
    // case-insensitively; an HTML tag must be followed by a space or `>`.
    let ws = head
        .iter()
        .position(|b| !matches!(b, b'\t' | b'\n' | 0x0C | b'\r' | b' '))
        .unwrap_or(head.len());
    let text = &head[ws..];
    const HTML: [&[u8]; 17] = [
        b"<!DOCTYPE HTML",
        b"<HTML",
        b"<HEAD",
        b"<SCRIPT",
        b"<IFRAME",
        b"<H1",
        b"<DIV",
        b"<FONT",
        b"<TABLE",
        b"<A",
        b"<STYLE",
        b"<TITLE",
        b"<B",
        b"<BODY",
        b"<BR",
        b"<P",
        b"<!--",
    ];
    let html = HTML.iter().any(|sig| {
        text.len() > sig.len()
            && text[..sig.len()].eq_ignore_ascii_case(sig)
            && matches!(text[sig.len()], b' ' | b'>')
    });
    if html {
        return "text/html; charset=utf-8";
    }
    if text.starts_with(b"<?xml") {
        return "text/xml; charset=utf-8";
    }
    const EXACT: [(&[u8], &str); 10] = [
        (b"%PDF-", "application/pdf"),
        (b"%!PS-Adobe-", "application/postscript"),
        (b"\xFE\xFF", "text/plain; charset=utf-16be"),
        (b"\xFF\xFE", "text/plain; charset=utf-16le"),
        (b"\xEF\xBB\xBF", "text/plain; charset=utf-8"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"\x89PNG\x0D\x0A\x1A\x0A", "image/png"),
        (b"\xFF\xD8\xFF", "image/jpeg"),
        (b"\x1F\x8B\x08", "application/x-gzip"),
    ];
    if let Some((_, t)) = EXACT.iter().find(|(sig, _)| head.starts_with(sig)) {
        return t;
    }
    if head.starts_with(b"PK\x03\x04") {
        return "application/zip";
    }
    if head.starts_with(b"\x00asm") {
        return "application/wasm";
    }
    // Go's text test: no "binary" control bytes at all.
    let binary = head
        .iter()
        .any(|&b| matches!(b, 0x00..=0x08 | 0x0B | 0x0E..=0x1A | 0x1C..=0x1F));
    if binary {
        "application/octet-stream"
    } else {
        "text/plain; charset=utf-8"
    }
}

/// Go's `strconv.ParseUint(s, 10, 64)`, with its error text: Consul sends
/// that text as a 500 for a bad `cas` or `flags`. Unlike Rust's parser it
/// takes no sign.
fn go_parse_uint(s: &str) -> Result<u64, String> {
    let quoted = go_quote(s);
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "strconv.ParseUint: parsing {quoted}: invalid syntax"
        ));
    }
    s.parse()
        .map_err(|_| format!("strconv.ParseUint: parsing {quoted}: value out of range"))
}

/// Close enough to Go's `strconv.Quote` for query values.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7F => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn parse_query(q: &str) -> Vec<(String, Option<String>)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k, true), Some(percent_decode(v, true))),
            None => (percent_decode(p, true), None),
        })
        .collect()
}

fn q_get<'a>(q: &'a [(String, Option<String>)], name: &str) -> Option<&'a str> {
    q.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_deref().unwrap_or(""))
}

fn q_has(q: &[(String, Option<String>)], name: &str) -> bool {
    q.iter().any(|(k, _)| k == name)
}

/// Go's `time.ParseDuration`, enough of it for Consul's `wait`. Negative
/// durations come back as zero (Consul then uses its default wait).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num = &rest[..num_end];
        if num.is_empty() || num == "." {
            return None;
        }
        let v: f64 = num.parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        nanos += v * mult;
        rest = &rest[unit_end..];
    }
    if neg {
        return Some(Duration::ZERO);
    }
    Some(Duration::from_nanos(nanos.min(u64::MAX as f64) as u64))
}

#[cfg(test)]
// Tests may panic on the unexpected: that is how they fail.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("abc"), None);
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("5x"), None);
    }

    #[test]
    fn json_matches_consul_layout() {
        let e = Entry {
            value: br#"{"build":"b1"}"#.to_vec(),
            flags: 0,
            create_index: 25,
            modify_index: 25,
        };
        let body = go_json(&[JsonPair::new("deploy/web/prod", &e)]);
        // Content-Length 188 in 03-get-existing.txt.
        assert_eq!(body.len(), 188);
        assert!(body.starts_with(b"[\n    {\n        \"LockIndex\": 0,\n"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb", false), "a/b");
        assert_eq!(percent_decode("a%2", false), "a%2");
        assert_eq!(percent_decode("100%", false), "100%");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("a+b", true), "a b");
    }
}
