//! An artifact HTTP server that misbehaves on demand, for tests, benchmarks
//! and `deploy-agent demo`.
//!
//! Real hyper 1 server on `127.0.0.1:0`: GET and HEAD, single `Range:
//! bytes=a-b` ranges (206 + `Content-Range`, 416 when unsatisfiable), files
//! registered in memory or read from a directory. Faults can be switched on
//! at runtime, for one path or all, for the next N requests or until
//! cleared: ignore ranges, truncate, flip a byte, wrong `Content-Length`,
//! stall, trickle, 404, 503. Counters record requests, 206 answers, bytes
//! sent and peak concurrent downloads.
//!
//! It holds no state on disk: a crash of the test process loses nothing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// One way to misbehave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer `200` with the full body even when a range was asked for.
    IgnoreRange,
    /// Close the connection after this many body bytes (the promised
    /// `Content-Length` is never reached).
    Truncate { after: u64 },
    /// XOR `0xff` into the byte at this absolute file offset, if served.
    FlipByte { offset: u64 },
    /// Announce a `Content-Length` (and `Content-Range` total) this many
    /// bytes larger than the truth.
    WrongLength { extra: u64 },
    /// Pause for `duration` after `after` body bytes, then carry on.
    Stall { after: u64, duration: Duration },
    /// Send at most this many bytes per second.
    Trickle { bytes_per_sec: u64 },
    /// `404 Not Found`.
    NotFound,
    /// `503 Service Unavailable`.
    Unavailable,
}

/// A fault plus where and how often it applies.
#[derive(Debug, Clone)]
pub struct FaultRule {
    pub fault: Fault,
    /// Only requests for this path (e.g. `/a.tar.gz`); `None` means every path.
    pub path: Option<String>,
    /// Only the next N matching requests; `None` means until cleared.
    pub times: Option<u64>,
}

impl FaultRule {
    /// A fault on every path until cleared.
    pub fn always(fault: Fault) -> FaultRule {
        FaultRule {
            fault,
            path: None,
            times: None,
        }
    }

    /// A fault for the next `n` requests (on any path).
    pub fn times(fault: Fault, n: u64) -> FaultRule {
        FaultRule {
            fault,
            path: None,
            times: Some(n),
        }
    }

    /// Restricts the rule to one path.
    pub fn on_path(mut self, path: impl Into<String>) -> FaultRule {
        self.path = Some(path.into());
        self
    }
}

/// Counters since start (or the last [`ArtifactServer::reset_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub requests: u64,
    /// Requests that carried a `Range` header.
    pub range_requests: u64,
    /// `206 Partial Content` answers.
    pub partial_responses: u64,
    /// Body bytes actually written to sockets.
    pub bytes_sent: u64,
    /// Bodies being sent right now.
    pub concurrent: u64,
    /// Most bodies ever sent at once.
    pub peak_concurrent: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    range_requests: AtomicU64,
    partial_responses: AtomicU64,
    bytes_sent: AtomicU64,
    concurrent: AtomicU64,
    peak_concurrent: AtomicU64,
}

#[derive(Debug, Clone)]
enum Source {
    Memory(Bytes),
    File(Arc<std::fs::File>, u64),
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::Memory(b) => b.len() as u64,
            Source::File(_, len) => *len,
        }
    }

    async fn read(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        match self {
            Source::Memory(b) => Ok(b.slice(offset as usize..(offset + len) as usize)),
            Source::File(file, _) => {
                let file = Arc::clone(file);
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    file.read_exact_at(&mut buf, offset)?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(io::Error::other)?
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    files: Mutex<HashMap<String, Bytes>>,
    dir: Option<PathBuf>,
    faults: Mutex<Vec<FaultRule>>,
    counters: Counters,
}

impl State {
    fn source(&self, path: &str) -> Option<Source> {
        if let Some(b) = self.files.lock().ok()?.get(path) {
            return Some(Source::Memory(b.clone()));
        }
        let dir = self.dir.as_ref()?;
        let rel = Path::new(path.trim_start_matches('/'));
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return None;
        }
        let file = std::fs::File::open(dir.join(rel)).ok()?;
        let len = file.metadata().ok()?.len();
        Some(Source::File(Arc::new(file), len))
    }

    /// The faults that apply to this request, consuming one use of each.
    fn take_faults(&self, path: &str) -> Vec<Fault> {
        let Ok(mut rules) = self.faults.lock() else {
            return Vec::new();
        };
        let mut active = Vec::new();
        for rule in rules.iter_mut() {
            if rule.path.as_deref().is_some_and(|p| p != path) {
                continue;
            }
            match &mut rule.times {
                Some(0) => continue,
                Some(n) => *n -= 1,
                None => {}
            }
            active.push(rule.fault.clone());
        }
        rules.retain(|r| r.times != Some(0));
        active
    }
}

/// A running artifact server; shuts down when dropped.
#[derive(Debug)]
pub struct ArtifactServer {
    addr: std::net::SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
}

impl ArtifactServer {
    /// Starts a server with no files on `127.0.0.1:0`.
    pub async fn start() -> io::Result<ArtifactServer> {
        Self::start_inner(None).await
    }

    /// Starts a server that also serves files below `dir` (by relative path).
    pub async fn start_with_dir(dir: impl Into<PathBuf>) -> io::Result<ArtifactServer> {
        Self::start_inner(Some(dir.into())).await
    }

    /// Starts a server with no files on `addr` (the fleet tests bind the
    /// address of a bridge they created).
    pub async fn start_at(addr: std::net::SocketAddr) -> io::Result<ArtifactServer> {
        Self::bind(addr, None).await
    }

    async fn start_inner(dir: Option<PathBuf>) -> io::Result<ArtifactServer> {
        Self::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), dir).await
    }

    async fn bind(addr: std::net::SocketAddr, dir: Option<PathBuf>) -> io::Result<ArtifactServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            dir,
            ..State::default()
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&state), shutdown.clone()));
        Ok(ArtifactServer {
            addr,
            state,
            shutdown,
        })
    }

    /// Registers (in memory) a file served at `path` (e.g. `/build.tar.gz`).
    pub fn add(&self, path: &str, body: impl Into<Bytes>) {
        if let Ok(mut files) = self.state.files.lock() {
            files.insert(path.to_string(), body.into());
        }
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Adds a fault rule (rules stack; all matching ones apply).
    pub fn set_fault(&self, rule: FaultRule) {
        if let Ok(mut faults) = self.state.faults.lock() {
            faults.push(rule);
        }
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        if let Ok(mut faults) = self.state.faults.lock() {
            faults.clear();
        }
    }

    /// Reads the counters.
    pub fn stats(&self) -> ServerStats {
        let c = &self.state.counters;
        ServerStats {
            requests: c.requests.load(Ordering::Relaxed),
            range_requests: c.range_requests.load(Ordering::Relaxed),
            partial_responses: c.partial_responses.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            concurrent: c.concurrent.load(Ordering::Relaxed),
            peak_concurrent: c.peak_concurrent.load(Ordering::Relaxed),
        }
    }

    /// Zeroes the counters (not the current concurrency).
    pub fn reset_stats(&self) {
        let c = &self.state.counters;
        for counter in [
            &c.requests,
            &c.range_requests,
            &c.partial_responses,
            &c.bytes_sent,
            &c.peak_concurrent,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for ArtifactServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(respond(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = conn => {
                    if let Err(e) = result {
                        debug!(error = %e, "artifact server connection ended");
                    }
                }
            }
        });
    }
}

type Body = BoxBody<Bytes, io::Error>;

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = code;
    response
}

/// Parses a single `bytes=` range against `len`; `Err(())` means 416.
fn parse_range(value: &str, len: u64) -> Result<(u64, u64), ()> {
    let spec = value.strip_prefix("bytes=").ok_or(())?;
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        (len.saturating_sub(n), len.checked_sub(1).ok_or(())?)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse::<u64>().map_err(|_| ())?.min(len.saturating_sub(1))
        };
        (start, end)
    };
    if start >= len || end < start {
        return Err(());
    }
    Ok((start, end))
}

async fn respond(state: &Arc<State>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let counters = &state.counters;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let faults = state.take_faults(&path);
    if faults.contains(&Fault::NotFound) {
        return status(StatusCode::NOT_FOUND);
    }
    if faults.contains(&Fault::Unavailable) {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(source) = state.source(&path) else {
        return status(StatusCode::NOT_FOUND);
    };
    let len = source.len();
    let range = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if range.is_some() {
        counters.range_requests.fetch_add(1, Ordering::Relaxed);
    }
    let range = range.filter(|_| !faults.contains(&Fault::IgnoreRange));
    let (start, end, code) = match range {
        Some(r) => match parse_range(&r, len) {
            Ok((s, e)) => (s, e, StatusCode::PARTIAL_CONTENT),
            Err(()) => {
                let mut response = status(StatusCode::RANGE_NOT_SATISFIABLE);
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    response.headers_mut().insert(CONTENT_RANGE, v);
                }
                return response;
            }
        },
        None => (0, len.saturating_sub(1), StatusCode::OK),
    };
    let body_len = if len == 0 { 0 } else { end - start + 1 };
    let extra = faults
        .iter()
        .find_map(|f| match f {
            Fault::WrongLength { extra } => Some(*extra),
            _ => None,
        })
        .unwrap_or(0);
    let mut response = if req.method() == Method::HEAD {
        Response::new(empty())
    } else {
        if code == StatusCode::PARTIAL_CONTENT {
            counters.partial_responses.fetch_add(1, Ordering::Relaxed);
        }
        Response::new(send_body(
            Arc::clone(state),
            source,
            start,
            body_len,
            faults,
        ))
    };
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&(body_len + extra).to_string()) {
        headers.insert(CONTENT_LENGTH, v);
    }
    if code == StatusCode::PARTIAL_CONTENT {
        let total = len + extra;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{total}", end + extra)) {
            headers.insert(CONTENT_RANGE, v);
        }
    }
    response
}

/// Decrements the concurrency counter when the body is finished or dropped.
struct Concurrent(Arc<State>);

impl Drop for Concurrent {
    fn drop(&mut self) {
        self.0.counters.concurrent.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Streams `len` bytes of `source` from `start`, applying the faults.
fn send_body(state: Arc<State>, source: Source, start: u64, len: u64, faults: Vec<Fault>) -> Body {
    let now = state.counters.concurrent.fetch_add(1, Ordering::Relaxed) + 1;
    state
        .counters
        .peak_concurrent
        .fetch_max(now, Ordering::Relaxed);
    let guard = Concurrent(state);
    let mut truncate_at = None;
    let mut flip = None;
    let mut stall = None;
    let mut rate = None;
    let wrong_length = faults
        .iter()
        .any(|f| matches!(f, Fault::WrongLength { .. }));
    for fault in &faults {
        match *fault {
            Fault::Truncate { after } => truncate_at = Some(after),
            Fault::FlipByte { offset } => flip = Some(offset),
            Fault::Stall { after, duration } => stall = Some((after, duration)),
            Fault::Trickle { bytes_per_sec } => rate = Some(bytes_per_sec.max(1)),
            _ => {}
        }
    }
    let chunk = match rate {
        // Ten sends a second at the trickle rate.
        Some(r) => (r / 10).max(1),
        None => 64 << 10,
    };
    let stream = stream::unfold((0u64, guard, stall), move |(sent, guard, mut stall)| {
        let source = source.clone();
        async move {
            if sent >= len {
                if wrong_length {
                    // Let hyper flush headers and data before it notices
                    // the body is shorter than announced and aborts.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return None;
            }
            if truncate_at.is_some_and(|t| sent >= t) {
                // Same: flush what was "sent" before the connection dies.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let err = io::Error::other("artifact server: truncating body (fault)");
                return Some((Err(err), (len, guard, stall)));
            }
            if let Some((after, duration)) = stall {
                if sent >= after {
                    tokio::time::sleep(duration).await;
                    stall = None;
                }
            }
            let mut n = chunk.min(len - sent);
            if let Some(t) = truncate_at {
                n = n.min(t.saturating_sub(sent)).max(1);
            }
            if let Some((after, _)) = stall {
                if after > sent {
                    n = n.min(after - sent);
                }
            }
            if rate.is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let data = match source.read(start + sent, n).await {
                Ok(d) => d,
                Err(e) => return Some((Err(e), (len, guard, stall))),
            };
            let data = match flip {
                Some(off) if off >= start + sent && off < start + sent + n => {
                    let mut v = data.to_vec();
                    v[(off - start - sent) as usize] ^= 0xff;
                    Bytes::from(v)
                }
                _ => data,
            };
            guard.0.counters.bytes_sent.fetch_add(n, Ordering::Relaxed);
            Some((Ok(Frame::data(data)), (sent + n, guard, stall)))
        }
    });
    StreamBody::new(stream).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Ok((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Ok((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Ok((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=5-1", 100), Err(()));
        assert_eq!(parse_range("items=1-2", 100), Err(()));
    }
}
