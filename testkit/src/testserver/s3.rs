//! A real S3-compatible server for tests and the demo: `s3s` (the S3
//! protocol and its SigV4 checks, header and presigned) over `s3s-fs` (a
//! directory), on `127.0.0.1:0`, with authentication enforced against a
//! [`KeyRing`] whose keys can be revoked (the store then answers
//! `ExpiredToken`, as S3 does for an expired session). In front of it, a
//! thin layer counts requests per access key and injects faults: 503
//! SlowDown, bodies cut short, a trickle, a failing multipart part.
//!
//! Crash guarantees: objects are files under the caller's directory
//! (s3s-fs writes each under a temp name first); counters and faults are in
//! memory and die with the process.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, BodyStream, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use s3s::auth::{S3Auth, SecretKey};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{s3_error, S3Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// Access keys the store accepts: id -> (secret, revoked).
#[derive(Debug, Default)]
pub struct KeyRing(Mutex<HashMap<String, (String, bool)>>);

impl KeyRing {
    /// Accepts `id` signed with `secret` from now on.
    pub fn add(&self, id: &str, secret: &str) {
        if let Ok(mut keys) = self.0.lock() {
            keys.insert(id.to_string(), (secret.to_string(), false));
        }
    }

    /// Answers `id` with `ExpiredToken` from now on.
    pub fn revoke(&self, id: &str) {
        if let Ok(mut keys) = self.0.lock() {
            if let Some(k) = keys.get_mut(id) {
                k.1 = true;
            }
        }
    }
}

/// The s3s auth provider over a shared [`KeyRing`].
#[derive(Debug, Clone)]
struct Auth(Arc<KeyRing>);

#[async_trait::async_trait]
impl S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        let found = self
            .0
             .0
            .lock()
            .ok()
            .and_then(|k| k.get(access_key).cloned());
        match found {
            Some((_, true)) => Err(s3_error!(ExpiredToken, "The provided token has expired.")),
            Some((secret, false)) => Ok(SecretKey::from(secret)),
            None => Err(s3_error!(InvalidAccessKeyId)),
        }
    }
}

/// Faults, each for the next N matching requests (`u64::MAX`: until cleared).
#[derive(Debug, Default)]
struct Faults {
    /// GETs answered `503 SlowDown`.
    slow_down: AtomicU64,
    /// GET bodies cut after `truncate_after` bytes.
    truncate: AtomicU64,
    truncate_after: AtomicU64,
    /// Bytes per second for every GET body; 0 = full speed.
    trickle: AtomicU64,
    /// UploadPart with this part number answers 500 InternalError; 0 = none.
    fail_part: AtomicU64,
    /// The buckets' region: a signature scoped to another one is refused
    /// as S3 refuses it (400 with the right `<Region>`); `None`: any.
    region: Mutex<Option<String>>,
}

/// Counters since start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct S3Stats {
    pub requests: u64,
    /// GETs that carried a `Range` header.
    pub range_gets: u64,
    /// `503 SlowDown` answers sent.
    pub slow_downs: u64,
    /// Body bytes of GET answers sent.
    pub bytes_sent: u64,
    /// Requests per access key (from the signature).
    pub by_key: HashMap<String, u64>,
    /// GETs per path (`/bucket/key`).
    pub gets_by_path: HashMap<String, u64>,
}

#[derive(Debug)]
struct State {
    /// The directory s3s-fs serves: `<root>/<bucket>/<key>`.
    root: PathBuf,
    faults: Faults,
    stats: Mutex<S3Stats>,
}

/// The running server; stopped on drop.
#[derive(Debug)]
pub struct S3Server {
    addr: std::net::SocketAddr,
    keys: Arc<KeyRing>,
    state: Arc<State>,
    shutdown: CancellationToken,
}

impl S3Server {
    /// Serves the buckets (directories) under `root` on `127.0.0.1:0`,
    /// accepting only the keys in `keys`.
    pub async fn start(root: &Path, keys: Arc<KeyRing>) -> io::Result<S3Server> {
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| io::Error::other(format!("{e:?}")))?;
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(Auth(Arc::clone(&keys)));
        let service = builder.build();
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            root: root.to_path_buf(),
            faults: Faults::default(),
            stats: Mutex::default(),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            service,
            Arc::clone(&state),
            shutdown.clone(),
        ));
        Ok(S3Server {
            addr,
            keys,
            state,
            shutdown,
        })
    }

    /// `http://127.0.0.1:port`: the endpoint (path-style).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    /// Creates `bucket` (a directory).
    pub fn create_bucket(&self, bucket: &str) -> io::Result<()> {
        std::fs::create_dir_all(self.state.root.join(bucket))
    }

    /// Stores `data` as `bucket/key` directly on disk, with its ETag.
    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) -> io::Result<()> {
        let path = self.state.root.join(bucket).join(key);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, data)?;
        self.record_etag(bucket, key)
    }

    /// Records the ETag (MD5) of `bucket/key`, an object placed on disk by
    /// other means than a PutObject (a file, a symlinked directory). Without
    /// it s3s-fs computes the MD5 of the whole object on every GET (s3s-fs
    /// 0.14.1 `get_object` -> `get_md5_sum`): eight ranged GETs of a 165 MB
    /// artifact read it eight more times, which is what made the compare
    /// bench's S3 row 4x its HTTP row even with fast bodies. The file is
    /// s3s-fs 0.14's own "internal info" (`.bucket-<b64>.object-<b64>
    /// .internal.json` beside the buckets, `{"e_tag": ...}`), as its
    /// PutObject writes it; the version is pinned in Cargo.lock.
    pub fn record_etag(&self, bucket: &str, key: &str) -> io::Result<()> {
        use base64::Engine as _;
        use md5::Digest as _;
        let mut md5 = md5::Md5::new();
        std::io::copy(
            &mut std::fs::File::open(self.state.root.join(bucket).join(key))?,
            &mut md5,
        )?;
        let etag = hex::encode(md5.finalize());
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let info = self.state.root.join(format!(
            ".bucket-{}.object-{}.internal.json",
            b64(bucket),
            b64(key)
        ));
        std::fs::write(info, serde_json::json!({ "e_tag": etag }).to_string())
    }

    /// The stored object `bucket/key`, if any.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.state.root.join(bucket).join(key)).ok()
    }

    /// The next `n` GETs answer `503 SlowDown`.
    pub fn slow_down(&self, n: u64) {
        self.state.faults.slow_down.store(n, Ordering::SeqCst);
    }

    /// The next `n` GET bodies stop after `after` bytes (the connection
    /// closes short of the promised length).
    pub fn truncate(&self, after: u64, n: u64) {
        self.state
            .faults
            .truncate_after
            .store(after, Ordering::SeqCst);
        self.state.faults.truncate.store(n, Ordering::SeqCst);
    }

    /// Every GET body at most `bytes_per_sec` (0: full speed).
    pub fn trickle(&self, bytes_per_sec: u64) {
        self.state
            .faults
            .trickle
            .store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Every UploadPart of part `n` answers 500 (0: none).
    pub fn fail_part(&self, n: u64) {
        self.state.faults.fail_part.store(n, Ordering::SeqCst);
    }

    /// The buckets live in `region` from now on (`None`: accept any).
    pub fn set_region(&self, region: Option<&str>) {
        if let Ok(mut r) = self.state.faults.region.lock() {
            *r = region.map(str::to_string);
        }
    }

    pub fn stats(&self) -> S3Stats {
        self.state
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    s3: S3Service,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let (s3, state, shutdown) = (s3.clone(), Arc::clone(&state), shutdown.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (s3, state) = (s3.clone(), Arc::clone(&state));
                async move { Ok::<_, Infallible>(respond(&s3, &state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = conn => {
                    if let Err(e) = result {
                        debug!(error = %e, "s3 server connection ended");
                    }
                }
            }
        });
    }
}

/// The access key a request was signed with (presigned or header).
fn access_key(req: &Request<hyper::body::Incoming>) -> String {
    let query = req.uri().query().unwrap_or("");
    let from_query = query
        .split('&')
        .find_map(|p| p.strip_prefix("X-Amz-Credential="))
        .and_then(|c| c.split(['/', '%']).next());
    let from_header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').next());
    from_query.or(from_header).unwrap_or("").to_string()
}

/// The region of a presigned request's credential scope
/// (`X-Amz-Credential=AKID/date/region/s3/aws4_request`).
fn scope_region(req: &Request<hyper::body::Incoming>) -> Option<String> {
    let query = req.uri().query()?;
    let credential = query
        .split('&')
        .find_map(|p| p.strip_prefix("X-Amz-Credential="))?
        .replace("%2F", "/");
    credential.split('/').nth(2).map(str::to_string)
}

/// Takes one from a fault's counter; true if it applies to this request.
fn take(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
            0 => None,
            u64::MAX => Some(u64::MAX),
            n => Some(n - 1),
        })
        .is_ok()
}

/// An S3 error answer; `extra` is more XML inside `<Error>` (`<Region>`).
fn xml_error(status: StatusCode, code: &str, message: &str, extra: &str) -> Response<Body> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message>{extra}</Error>"
    );
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r
}

/// The answer of a fault switched on for this request, if any: a
/// signature scoped to another region, SlowDown, a failing part.
fn injected_fault(state: &State, req: &Request<hyper::body::Incoming>) -> Option<Response<Body>> {
    let region = state.faults.region.lock().ok().and_then(|r| r.clone());
    if let (Some(want), Some(got)) = (region, scope_region(req)) {
        if want != got {
            let message = format!("the region '{got}' is wrong; expecting '{want}'");
            let extra = format!("<Region>{want}</Region>");
            let code = "AuthorizationQueryParametersError";
            return Some(xml_error(StatusCode::BAD_REQUEST, code, &message, &extra));
        }
    }
    if req.method() == Method::GET && take(&state.faults.slow_down) {
        if let Ok(mut s) = state.stats.lock() {
            s.slow_downs += 1;
        }
        let message = "Please reduce your request rate.";
        return Some(xml_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SlowDown",
            message,
            "",
        ));
    }
    let part = state.faults.fail_part.load(Ordering::SeqCst);
    let query = req.uri().query().unwrap_or("");
    if part > 0
        && req.method() == Method::PUT
        && query.split('&').any(|p| p == format!("partNumber={part}"))
    {
        let message = "We encountered an internal error. Please try again.";
        return Some(xml_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            message,
            "",
        ));
    }
    None
}

async fn respond(
    s3: &S3Service,
    state: &Arc<State>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let key = access_key(&req);
    let is_get = req.method() == Method::GET;
    let path = req.uri().path().to_string();
    let ranged = req.headers().contains_key("range");
    if let Ok(mut s) = state.stats.lock() {
        s.requests += 1;
        s.range_gets += u64::from(is_get && ranged);
        *s.by_key.entry(key).or_default() += 1;
        if is_get {
            *s.gets_by_path
                .entry(req.uri().path().to_string())
                .or_default() += 1;
        }
    }
    if let Some(answer) = injected_fault(state, &req) {
        return answer;
    }
    let answer = match s3.call(req.map(s3s::Body::from)).await {
        Ok(r) => r,
        Err(e) => {
            return xml_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                &format!("{e:?}"),
                "",
            )
        }
    };
    if !is_get || !answer.status().is_success() {
        return answer.map(BodyExt::boxed);
    }
    let cut =
        take(&state.faults.truncate).then(|| state.faults.truncate_after.load(Ordering::SeqCst));
    let rate = state.faults.trickle.load(Ordering::SeqCst);
    let (parts, body) = answer.into_parts();
    // Faults keep s3s's small frames: a cut must land after the bytes
    // before it were flushed, which one big frame does not give.
    let fast = match (cut, rate) {
        (None, 0) => object_body(&state.root, &path, &parts.headers).await,
        _ => None,
    };
    let body = match fast {
        Some(fast) => shaped(
            BodyExt::boxed(fast.map_err(|e| Box::new(e) as BoxError)),
            cut,
            rate,
            Arc::clone(state),
        ),
        None => shaped(BodyExt::boxed(body), cut, rate, Arc::clone(state)),
    };
    Response::from_parts(parts, body)
}

/// The body of a GET that s3s has authorized and answered, read from the
/// object's file in 1 MiB reads. s3s-fs streams it in 4 KiB `tokio::fs`
/// reads, each a round trip through the blocking pool, which made this
/// server, not the agent, the bottleneck of every S3 throughput figure
/// (the compare bench's S3 row was 6x its HTTP row). The same bytes: the
/// range is the one s3s answered (`Content-Range`, else the whole
/// `Content-Length`). `None` (s3s's own body is used) when the file or the
/// headers are not what s3s-fs serves.
async fn object_body(
    root: &Path,
    path: &str,
    headers: &hyper::HeaderMap,
) -> Option<BoxBody<Bytes, io::Error>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (start, len) = match header("content-range") {
        // bytes <first>-<last>/<total>
        Some(r) => {
            let (first, last) = r
                .strip_prefix("bytes ")?
                .split('/')
                .next()?
                .split_once('-')?;
            let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
            (first, last.checked_sub(first)? + 1)
        }
        None => (0, header("content-length")?.parse().ok()?),
    };
    let file = root.join(super::percent_decode(path.trim_start_matches('/'), false));
    let mut f = tokio::fs::File::open(&file).await.ok()?;
    if f.metadata().await.ok()?.len() < start + len {
        return None;
    }
    f.seek(std::io::SeekFrom::Start(start)).await.ok()?;
    let stream = tokio_util::io::ReaderStream::with_capacity(f.take(len), 1 << 20)
        .map(|chunk| chunk.map(Frame::data));
    Some(BodyExt::boxed(StreamBody::new(stream)))
}

/// A GET body counted into the stats, cut after `cut` bytes, at most
/// `rate` bytes per second.
fn shaped(body: Body, cut: Option<u64>, rate: u64, state: Arc<State>) -> Body {
    let sent = Arc::new(AtomicU64::new(0));
    let stream = BodyStream::new(body).then(move |frame| {
        let (sent, state) = (Arc::clone(&sent), Arc::clone(&state));
        async move {
            let Ok(mut data) = frame?.into_data() else {
                return Ok::<_, BoxError>(Frame::data(Bytes::new()));
            };
            let before = sent.load(Ordering::SeqCst);
            if let Some(cut) = cut {
                if before >= cut {
                    return Err::<Frame<Bytes>, BoxError>("truncated by the test server".into());
                }
                data.truncate((cut - before).min(data.len() as u64) as usize);
            }
            if rate > 0 {
                tokio::time::sleep(Duration::from_secs_f64(data.len() as f64 / rate as f64)).await;
            }
            sent.fetch_add(data.len() as u64, Ordering::SeqCst);
            if let Ok(mut s) = state.stats.lock() {
                s.bytes_sent += data.len() as u64;
            }
            Ok(Frame::data(data))
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}
