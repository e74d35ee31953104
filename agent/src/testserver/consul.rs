//! A Consul-compatible KV HTTP server for tests and `deploy-agent demo`.
//!
//! It serves `/v1/kv/<key>` on a real loopback socket and answers the way
//! Consul 1.9.0 does in the recorded exchanges under
//! `tests/data/consul-reference/` (status, headers, JSON shape, blocking-query
//! semantics, ACL errors). `tests/consul_reference.rs` replays every recorded
//! exchange against it, so where this file and the recordings disagree, the
//! test fails.
//!
//! On top of Consul it can misbehave on demand ([`Fault`]): answer an error
//! status, drop connections, stall, move its index backwards (a snapshot
//! restore) or go down and come back on the same port.
//!
//! Everything lives in memory; if the process dies the store is simply gone,
//! which is what a test wants.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
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
}

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
            .map(percent_decode)
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
                if let Err(msg) = self.authorize(token.as_deref(), &key, true) {
                    return Ok(self.text(StatusCode::FORBIDDEN, msg));
                }
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
                let flags = match q_get(&query, "flags").map(str::parse::<u64>) {
                    None => None,
                    Some(Ok(f)) => Some(f),
                    Some(Err(_)) => return Ok(self.text(StatusCode::BAD_REQUEST, "Invalid flags")),
                };
                let cas = match q_get(&query, "cas").map(str::parse::<u64>) {
                    None => None,
                    Some(Ok(c)) => Some(c),
                    Some(Err(_)) => {
                        return Ok(self.text(StatusCode::BAD_REQUEST, "Invalid cas index"))
                    }
                };
                let ok = self.write(&key, body.to_vec(), flags, cas);
                Ok(self.json_bool(ok))
            }
            Method::DELETE => {
                let recurse = q_has(&query, "recurse");
                if key.is_empty() && !recurse {
                    return Ok(self.text(StatusCode::BAD_REQUEST, "Missing key name"));
                }
                if let Err(msg) = self.authorize(token.as_deref(), &key, true) {
                    return Ok(self.text(StatusCode::FORBIDDEN, msg));
                }
                let cas = match q_get(&query, "cas").map(str::parse::<u64>) {
                    None => None,
                    Some(Ok(c)) => Some(c),
                    Some(Err(_)) => {
                        return Ok(self.text(StatusCode::BAD_REQUEST, "Invalid cas index"))
                    }
                };
                let ok = self.delete(&key, recurse, cas);
                Ok(self.json_bool(ok))
            }
            _ => Ok(self.text(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")),
        }
    }

    async fn handle_get(
        &self,
        key: &str,
        query: &[(String, Option<String>)],
        token: Option<&str>,
    ) -> Resp {
        // Consul parses `wait` before `index` (12-*.txt has both).
        let wait = match q_get(query, "wait") {
            None => None,
            Some(w) => match parse_go_duration(w) {
                Some(d) => Some(d),
                None => return self.text(StatusCode::BAD_REQUEST, "Invalid wait time"),
            },
        };
        let min_index = match q_get(query, "index") {
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
        if let Err(msg) = self.authorize(token, key, false) {
            return self.text(StatusCode::FORBIDDEN, msg);
        }
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
            let resp = {
                let leader = lock(&self.state);
                let follower = if stale {
                    lock(&self.follower).clone()
                } else {
                    None
                };
                let restored = leader.restores != restores_at_start;
                let st: &State = follower.as_ref().unwrap_or(&leader);
                let (index, resp) = if recurse {
                    self.answer_list(st, key, last_contact)
                } else if keys {
                    self.answer_keys(st, key, separator.as_deref(), last_contact)
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
                resp
            };
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return resp,
                _ = self.shutdown.cancelled() => return resp,
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
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static(sniff_content_type(&e.value)),
                    );
                    r
                } else {
                    self.json(StatusCode::OK, &[JsonPair::new(key, e)])
                };
                (idx, self.meta(resp, idx, last_contact))
            }
        }
    }

    fn answer_list(&self, st: &State, prefix: &str, last_contact: u64) -> (u64, Resp) {
        let pairs: Vec<JsonPair<'_>> = st
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| JsonPair::new(k, e))
            .collect();
        if pairs.is_empty() {
            let idx = st.index.max(1);
            return (
                idx,
                self.meta(self.empty(StatusCode::NOT_FOUND), idx, last_contact),
            );
        }
        let idx = pairs
            .iter()
            .map(|p| p.modify_index)
            .max()
            .unwrap_or(0)
            .max(1);
        (
            idx,
            self.meta(self.json(StatusCode::OK, &pairs), idx, last_contact),
        )
    }

    fn answer_keys(
        &self,
        st: &State,
        prefix: &str,
        separator: Option<&str>,
        last_contact: u64,
    ) -> (u64, Resp) {
        let mut keys: Vec<String> = Vec::new();
        let mut idx = 0;
        for (k, e) in st
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            idx = idx.max(e.modify_index);
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
        if keys.is_empty() {
            let idx = st.index.max(1);
            return (
                idx,
                self.meta(self.empty(StatusCode::NOT_FOUND), idx, last_contact),
            );
        }
        let idx = idx.max(1);
        (
            idx,
            self.meta(self.json(StatusCode::OK, &keys), idx, last_contact),
        )
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
            if let Some(c) = cas {
                match st.kv.get(key) {
                    Some(e) if e.modify_index == c => {}
                    None if c == 0 => {}
                    _ => return false,
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
                for k in doomed {
                    st.kv.remove(&k);
                }
                true
            }
        };
        if changed {
            self.changed.send_modify(|g| *g += 1);
        }
        true
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

/// A cut-down `http.DetectContentType`: Consul leaves `?raw` responses to
/// Go's sniffing, which calls text anything without binary control bytes.
fn sniff_content_type(data: &[u8]) -> &'static str {
    let head = &data[..data.len().min(512)];
    let binary = head
        .iter()
        .any(|&b| matches!(b, 0x00..=0x08 | 0x0B | 0x0E..=0x1A | 0x1C..=0x1F));
    if binary {
        "application/octet-stream"
    } else {
        "text/plain; charset=utf-8"
    }
}

fn parse_query(q: &str) -> Vec<(String, Option<String>)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), Some(percent_decode(v))),
            None => (percent_decode(p), None),
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

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
