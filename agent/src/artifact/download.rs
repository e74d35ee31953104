//! Download of a build artifact into its partial file in the artifact
//! cache: parallel ranged requests written in place, per-range retries with
//! jittered backoff, mirrors, and a shared bandwidth cap. Each range records
//! its progress in the partial's chunk table (see `partial`), so the
//! verifier/unpacker reads the in-order prefix while later ranges are still
//! arriving.
//!
//! Crash guarantees: everything written is in the partial and counted in
//! its sidecar within a few MB; a crash mid-download resumes from there
//! (see `partial` for what a power loss can cost).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use tokio::task::JoinSet;
use tracing::{instrument, warn};

use crate::config::DownloadConfig;
pub use crate::manifest::{BuildSpec, Format, Sha256Sum};
pub use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::pacing::{sleep_or_cancel, Backoff, BackoffState, TokenBucket};
use crate::progress::Progress;
use crate::store::{Action, ObjectUrl, Store, Verdict};

use super::partial::{Partial, WRITE_BUFFER};

/// How to download.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchSettings {
    /// Concurrent range requests when the server supports ranges.
    pub parallel_ranges: usize,
    /// TCP/TLS connect timeout (used by [`FetchSettings::client`]); also
    /// bounds, with `read_timeout`, the wait for response headers.
    pub connect_timeout: Duration,
    /// Longest wait for the next body chunk before the request counts as stalled.
    pub read_timeout: Duration,
    /// Consecutive failures of one range on one mirror before moving to the next mirror.
    pub retries_per_range: u32,
    /// Pause between retries of one range (jittered, doubling).
    pub backoff: Backoff,
    /// Total bytes per second over all ranges; `None` is unlimited.
    pub bandwidth_limit: Option<u64>,
    /// Accept `file://` URLs (tests, demo, air-gapped hosts).
    pub allow_file_urls: bool,
    /// Signs `s3://` URLs' requests (`[store]`); `None` refuses them.
    pub store: Option<Arc<Store>>,
}

/// Retries of one range: 200 ms doubling to 10 s, jittered. Not a config
/// key: the range retry count (`download.retries`) is the operator's knob.
pub const RANGE_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(200),
    max: Duration::from_secs(10),
};

impl FetchSettings {
    /// The settings the `[download]` section gives; `allow_file_urls` also
    /// holds when the desired state comes from a local file.
    pub fn from_config(download: &DownloadConfig, local_source: bool) -> FetchSettings {
        FetchSettings {
            parallel_ranges: download.parallel_ranges,
            connect_timeout: download.connect_timeout,
            read_timeout: download.read_timeout,
            retries_per_range: download.retries,
            backoff: RANGE_BACKOFF,
            bandwidth_limit: download.bandwidth_limit,
            allow_file_urls: download.allow_file_urls || local_source,
            store: None,
        }
    }

    /// These settings with `store` signing `s3://` requests.
    pub fn with_store(mut self, store: Arc<Store>) -> FetchSettings {
        self.store = Some(store);
        self
    }

    /// A client with this connect timeout, for callers without their own.
    pub fn client(&self) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .build()
    }
}

/// The download's bandwidth limit, shared by all ranges: each takes tokens
/// as bytes arrive and sleeps off any debt. The lock is held while sleeping
/// so ranges queue up fairly and the total stays at the rate.
#[derive(Debug)]
struct Bandwidth(tokio::sync::Mutex<TokenBucket>);

impl Bandwidth {
    fn new(bytes_per_sec: u64) -> Bandwidth {
        Bandwidth(tokio::sync::Mutex::new(TokenBucket::per_second(
            bytes_per_sec,
            tokio::time::Instant::now(),
        )))
    }

    async fn take(&self, n: usize) {
        let mut bucket = self.0.lock().await;
        let pause = bucket.take_owing(n as u64, tokio::time::Instant::now());
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Everything the range workers share.
#[derive(Debug)]
struct Job {
    client: reqwest::Client,
    spec: BuildSpec,
    settings: FetchSettings,
    partial: Arc<Partial>,
    progress: Arc<Progress>,
    mirror: AtomicUsize,
    rate: Option<Bandwidth>,
    /// Set by the first response: does the server answer ranges with 206?
    ranges: tokio::sync::watch::Sender<Option<bool>>,
    /// Workers stop at the next chunk, flush what they hold and return.
    cancel: CancellationToken,
}

impl Job {
    /// Counts bytes as they arrive, not when their buffer is written: at a
    /// trickle a 256 KiB buffer takes minutes to fill, and the operator
    /// must see the download move. (A failed request still writes what it
    /// buffered, so the count stays what the partial holds.)
    fn received(&self, n: usize) {
        self.progress
            .bytes_downloaded
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn cancelled(&self) -> Error {
        Error::Cancelled {
            what: format!("download of {}", self.spec.sha256),
        }
    }
}

/// How one request attempt ended.
enum Failure {
    /// Worth retrying on the same mirror (network, timeout, 5xx, 429).
    Transient(String),
    /// This mirror will not do (404, wrong size, 416): next mirror at once.
    Mirror(Error),
    /// The cancel token fired; what arrived was written.
    Cancelled,
}

impl Failure {
    fn reason(&self) -> String {
        match self {
            Failure::Transient(r) => r.clone(),
            Failure::Mirror(e) => e.to_string(),
            Failure::Cancelled => "cancelled".to_string(),
        }
    }
}

/// Downloads every missing byte of `partial` (resuming what it holds),
/// recording progress in its chunks so the in-order reader can follow.
/// On error or cancellation (workers flush what they received first) the
/// partial and sidecar stay for resume.
#[instrument(skip_all, fields(sha256 = %spec.sha256, size = spec.size))]
pub(crate) async fn download(
    client: &reqwest::Client,
    spec: &BuildSpec,
    partial: Arc<Partial>,
    settings: &FetchSettings,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<()> {
    progress
        .bytes_downloaded
        .store(partial.bytes_present(), Ordering::Relaxed);
    let (ranges, ranges_known) = tokio::sync::watch::channel(None);
    let job = Arc::new(Job {
        client: client.clone(),
        spec: spec.clone(),
        settings: settings.clone(),
        partial,
        progress,
        mirror: AtomicUsize::new(0),
        rate: settings.bandwidth_limit.map(Bandwidth::new),
        ranges,
        // A child: stopping the workers after one failed must not cancel the caller.
        cancel: cancel.child_token(),
    });
    let first_error = supervise(&job, ranges_known).await;
    job.partial.persist();
    if let Some(e) = first_error {
        return Err(e);
    }
    let present = job.partial.bytes_present();
    if present != spec.size {
        // Every worker ended without error yet bytes are missing: a bug, but
        // report it as a failed download rather than verify a hole.
        return Err(Error::Download {
            sha256: spec.sha256.to_string(),
            url: spec.urls.join(", "),
            reason: format!("only {present} of {} bytes arrived", spec.size),
        });
    }
    Ok(())
}

/// Runs the first worker, then the others once the server proved it
/// answers ranges, until all ended. On the first failure the others stop
/// gracefully (they flush what they hold); returns the first real error,
/// not "cancelled". `JoinSet` aborts the workers if this future is dropped
/// (cancel/restart).
async fn supervise(
    job: &Arc<Job>,
    mut ranges_known: tokio::sync::watch::Receiver<Option<bool>>,
) -> Option<Error> {
    let spec = &job.spec;
    let mut workers = JoinSet::new();
    workers.spawn(worker(Arc::clone(job)));
    let mut spawned_rest = false;
    let mut first_error: Option<Error> = None;
    loop {
        tokio::select! {
            changed = ranges_known.changed(), if !spawned_rest => {
                // A closed channel: the first worker ended; no more to start.
                let known = match changed {
                    Ok(()) => *ranges_known.borrow_and_update(),
                    Err(_) => Some(false),
                };
                if let Some(with_ranges) = known {
                    spawned_rest = true;
                    if with_ranges {
                        for _ in 1..job.settings.parallel_ranges.max(1) {
                            workers.spawn(worker(Arc::clone(job)));
                        }
                    }
                }
            }
            joined = workers.join_next() => {
                let failed = match joined {
                    None => return first_error,
                    Some(Ok(Ok(()))) => continue,
                    Some(Ok(Err(e))) => e,
                    Some(Err(e)) => Error::Download {
                        sha256: spec.sha256.to_string(),
                        url: spec.urls.join(", "),
                        reason: format!("range worker failed: {e}"),
                    },
                };
                job.cancel.cancel();
                spawned_rest = true;
                let replace = match &first_error {
                    None => true,
                    Some(Error::Cancelled { .. }) => !matches!(failed, Error::Cancelled { .. }),
                    Some(_) => false,
                };
                if replace {
                    first_error = Some(failed);
                }
            }
        }
    }
}

/// One range worker: claims chunks in order until none are left.
async fn worker(job: Arc<Job>) -> Result<()> {
    let mut buf = Vec::with_capacity(WRITE_BUFFER);
    while let Some(i) = job.partial.chunks.claim() {
        let start = i as u64 * job.partial.chunks.chunk;
        let end = start + job.partial.chunks.len_of(i);
        let single = fetch_range(&job, start, end, &mut buf).await?;
        if single {
            // The server ignored Range and this worker streamed everything.
            break;
        }
    }
    Ok(())
}

/// Fetches `[start + done, end)` with retries and mirror fallback. Returns
/// true if the server answered 200 and the whole file was streamed instead.
async fn fetch_range(job: &Job, start: u64, end: u64, buf: &mut Vec<u8>) -> Result<bool> {
    let chunks = &job.partial.chunks;
    let i = (start / chunks.chunk) as usize;
    let mut failures = 0u32;
    let mut backoff = BackoffState::new(job.settings.backoff);
    loop {
        let from = start + chunks.done(i);
        if from >= end {
            return Ok(false);
        }
        if job.cancel.is_cancelled() {
            return Err(job.cancelled());
        }
        let mirror = job.mirror.load(Ordering::Acquire);
        let Some(url) = job.spec.urls.get(mirror) else {
            return Err(Error::Download {
                sha256: job.spec.sha256.to_string(),
                url: job.spec.urls.join(", "),
                reason: "no mirror left".into(),
            });
        };
        let before = chunks.done(i);
        let outcome = attempt(job, url, from, end, buf).await;
        match outcome {
            Ok(single) => return Ok(single),
            Err(Failure::Cancelled) => return Err(job.cancelled()),
            Err(failure) => {
                // Only real progress earns fresh retries, so a server that
                // dies after a few bytes every time still fails in bounded time.
                if chunks.done(i) >= before + WRITE_BUFFER as u64 {
                    failures = 0;
                    backoff.reset();
                }
                failures += 1;
                warn!(url = %url, from, end, failures, reason = %failure.reason(), "range request failed");
                let give_up_mirror = match &failure {
                    Failure::Transient(_) => failures > job.settings.retries_per_range,
                    Failure::Mirror(_) | Failure::Cancelled => true,
                };
                if give_up_mirror {
                    next_mirror(job, mirror, url, failure)?;
                    failures = 0;
                    backoff.reset();
                    continue;
                }
                let pause = backoff.next_delay(&mut rand::thread_rng());
                if !sleep_or_cancel(pause, &job.cancel).await {
                    return Err(job.cancelled());
                }
            }
        }
    }
}

/// Moves every range off mirror number `mirror` after `failure` there;
/// the failure becomes the download's error when no mirror is left.
fn next_mirror(job: &Job, mirror: usize, url: &str, failure: Failure) -> Result<()> {
    if let Some(next) = job.spec.urls.get(mirror + 1) {
        warn!(url = %url, next = %next, "giving up on mirror, trying the next");
    }
    // Other workers may have moved on already; only advance once.
    let _ = job
        .mirror
        .compare_exchange(mirror, mirror + 1, Ordering::AcqRel, Ordering::Acquire);
    if mirror + 1 < job.spec.urls.len() {
        return Ok(());
    }
    Err(match failure {
        Failure::Mirror(e) => e,
        Failure::Cancelled => job.cancelled(),
        Failure::Transient(reason) => Error::Download {
            sha256: job.spec.sha256.to_string(),
            url: url.to_string(),
            reason,
        },
    })
}

/// One HTTP request for `[from, end)`; streams the body into the partial.
async fn attempt(
    job: &Job,
    url: &str,
    from: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> std::result::Result<bool, Failure> {
    let size = job.spec.size;
    if let Some(path) = url.strip_prefix("file://") {
        return attempt_file(job, url, Path::new(path), from, end, buf).await;
    }
    let response = if url.starts_with("s3://") {
        store_get(job, url, from, end).await?
    } else {
        send_get(job, url, from, end).await?
    };
    let (offset, single) = where_body_starts(job, url, &response, from, end)?;
    let stop = if single { size } else { end };
    let streamed = stream_body(job, url, response, offset, stop, buf).await;
    if single && streamed.is_err() {
        job.partial.chunks.unclaim_incomplete();
    }
    streamed.map(|()| single)
}

/// Sends the GET for `[from, end)` and waits for the response headers.
async fn send_get(
    job: &Job,
    target: impl reqwest::IntoUrl,
    from: u64,
    end: u64,
) -> std::result::Result<reqwest::Response, Failure> {
    let request = job
        .client
        .get(target)
        .header(RANGE, format!("bytes={from}-{}", end - 1));
    let headers_deadline = job.settings.connect_timeout + job.settings.read_timeout;
    let sent = tokio::select! {
        _ = job.cancel.cancelled() => return Err(Failure::Cancelled),
        sent = tokio::time::timeout(headers_deadline, request.send()) => sent,
    };
    match sent {
        Err(_) => Err(Failure::Transient(format!(
            "no response within {headers_deadline:?}"
        ))),
        // Without the URL: a presigned one carries its signature (the
        // caller logs the manifest's URL instead).
        Ok(Err(e)) => Err(Failure::Transient(format!(
            "request failed: {}",
            chain(&e.without_url())
        ))),
        Ok(Ok(r)) => Ok(r),
    }
}

/// The GET for `[from, end)` of an `s3://` URL, presigned with the host's
/// current credentials (refreshed before they expire, so also in the middle
/// of a download). A store's error answer becomes a retry (throttling,
/// 5xx, expired credentials, which are then fetched again) or an error
/// that names the object and what to fix.
async fn store_get(
    job: &Job,
    url: &str,
    from: u64,
    end: u64,
) -> std::result::Result<reqwest::Response, Failure> {
    let object = ObjectUrl::parse(url).map_err(|reason| {
        Failure::Mirror(Error::StoreSetting {
            setting: "url".into(),
            reason: format!("{url}: {reason}"),
        })
    })?;
    let Some(store) = &job.settings.store else {
        return Err(Failure::Mirror(Error::StoreSetting {
            setting: "[store]".into(),
            reason: format!("{url}: this command has no object store configured"),
        }));
    };
    let signed = store
        .sign(&object, Action::Get)
        .await
        .map_err(Failure::Mirror)?;
    let response = send_get(job, signed.url.clone(), from, end).await?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let region = response
        .headers()
        .get("x-amz-bucket-region")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match tokio::time::timeout(job.settings.read_timeout, response.bytes()).await {
        Ok(Ok(b)) => String::from_utf8_lossy(&b[..b.len().min(64 << 10)]).into_owned(),
        _ => String::new(),
    };
    let verdict = store
        .classify(
            &object,
            Action::Get,
            &signed,
            status.as_u16(),
            region.as_deref(),
            &body,
        )
        .await;
    Err(match verdict {
        Verdict::Expired(reason) | Verdict::Retry(reason) => Failure::Transient(reason),
        Verdict::Fatal(e) => Failure::Mirror(e),
    })
}

/// Checks a response against the artifact: a 206 for this range (and the
/// right total), or a 200 of the whole file when the server has no ranges.
/// Returns the offset its body starts at and whether it is the whole file.
fn where_body_starts(
    job: &Job,
    url: &str,
    response: &reqwest::Response,
    from: u64,
    end: u64,
) -> std::result::Result<(u64, bool), Failure> {
    let size = job.spec.size;
    match response.status() {
        StatusCode::PARTIAL_CONTENT => {
            let _ = job.ranges.send_if_modified(|r| r.replace(true).is_none());
            let total = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit_once('/'))
                .and_then(|(_, t)| t.parse::<u64>().ok());
            if let Some(total) = total.filter(|t| *t != size) {
                return Err(Failure::Mirror(Error::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: total,
                }));
            }
            if let Some(len) = response.content_length().filter(|l| *l != end - from) {
                return Err(Failure::Mirror(Error::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: size - (end - from) + len,
                }));
            }
            Ok((from, false))
        }
        StatusCode::OK => {
            if let Some(len) = response.content_length().filter(|l| *l != size) {
                return Err(Failure::Mirror(Error::SizeMismatch {
                    url: url.to_string(),
                    expected: size,
                    actual: len,
                }));
            }
            let first = job.ranges.send_if_modified(|r| r.replace(false).is_none());
            if !first && *job.ranges.borrow() == Some(true) {
                // A mirror that stopped honouring ranges mid-download: take
                // the range from its full body would cost the whole file per
                // range; treat it as a transient fault of this request.
                return Err(Failure::Transient(format!(
                    "{url} ignored the Range header"
                )));
            }
            // No ranges: this worker streams the whole file from byte 0.
            job.partial.chunks.reset_all_claimed();
            Ok((0, true))
        }
        s if s == StatusCode::NOT_FOUND
            || s == StatusCode::GONE
            || s == StatusCode::FORBIDDEN
            || s == StatusCode::UNAUTHORIZED
            || s == StatusCode::RANGE_NOT_SATISFIABLE =>
        {
            Err(Failure::Mirror(Error::Download {
                sha256: job.spec.sha256.to_string(),
                url: url.to_string(),
                reason: format!("HTTP {s}"),
            }))
        }
        s => Err(Failure::Transient(format!("HTTP {s}"))),
    }
}

/// An error with its sources, for the operator (reqwest's top-level
/// message alone hides the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A `file://` mirror (only when allowed): read the range from the local
/// file on the blocking pool, then write it like a body.
async fn attempt_file(
    job: &Job,
    url: &str,
    path: &Path,
    from: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> std::result::Result<bool, Failure> {
    if !job.settings.allow_file_urls {
        return Err(Failure::Mirror(Error::InvalidArtifact {
            reason: format!("{url}: file URLs are not allowed (settings.allow_file_urls)"),
        }));
    }
    let file = match File::open(path) {
        Ok(f) => Arc::new(f),
        Err(e) => return Err(Failure::Mirror(Error::io(path, e))),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len != job.spec.size {
        return Err(Failure::Mirror(Error::SizeMismatch {
            url: url.to_string(),
            expected: job.spec.size,
            actual: len,
        }));
    }
    let _ = job.ranges.send_if_modified(|r| r.replace(true).is_none());
    let mut offset = from;
    while offset < end {
        if job.cancel.is_cancelled() {
            return Err(Failure::Cancelled);
        }
        let n = (end - offset).min(WRITE_BUFFER as u64) as usize;
        let reader = Arc::clone(&file);
        let read = tokio::task::spawn_blocking(move || {
            let mut data = vec![0u8; n];
            reader.read_exact_at(&mut data, offset).map(|()| data)
        })
        .await;
        match read {
            Ok(Ok(data)) => {
                if let Some(rate) = &job.rate {
                    rate.take(data.len()).await;
                }
                job.received(data.len());
                *buf = data;
                offset = flush(job, buf, offset).await?;
            }
            Ok(Err(e)) => return Err(Failure::Transient(format!("{url}: {e}"))),
            Err(e) => return Err(Failure::Transient(format!("{url}: read task failed: {e}"))),
        }
    }
    Ok(false)
}

/// Streams a response body to `offset..stop` of the partial in buffered
/// positional writes, each one on the blocking pool.
async fn stream_body(
    job: &Job,
    url: &str,
    mut response: reqwest::Response,
    mut offset: u64,
    stop: u64,
    buf: &mut Vec<u8>,
) -> std::result::Result<(), Failure> {
    buf.clear();
    let mut result: std::result::Result<(), Failure> = Ok(());
    loop {
        let next = tokio::select! {
            biased;
            _ = job.cancel.cancelled() => {
                result = Err(Failure::Cancelled);
                break;
            }
            next = tokio::time::timeout(job.settings.read_timeout, response.chunk()) => next,
        };
        let chunk = match next {
            Err(_) => {
                result = Err(Failure::Transient(format!(
                    "stalled: no data for {:?}",
                    job.settings.read_timeout
                )));
                break;
            }
            Ok(Err(e)) => {
                result = Err(Failure::Transient(format!(
                    "body failed: {}",
                    chain(&e.without_url())
                )));
                break;
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        if let Some(rate) = &job.rate {
            rate.take(chunk.len()).await;
        }
        let room = (stop - offset - buf.len() as u64) as usize;
        let taken = chunk.len().min(room);
        buf.extend_from_slice(&chunk[..taken]);
        job.received(taken);
        if buf.len() >= WRITE_BUFFER || buf.len() as u64 + offset >= stop {
            offset = flush(job, buf, offset).await?;
        }
        if offset >= stop {
            break;
        }
    }
    // Keep what arrived before a failure: the retry resumes after it.
    offset = flush(job, buf, offset).await?;
    match result {
        Ok(()) if offset < stop => Err(Failure::Transient(format!(
            "{url}: body ended at byte {offset}, expected bytes up to {stop}"
        ))),
        Err(Failure::Transient(reason)) => Err(Failure::Transient(format!(
            "{reason} (received up to byte {offset}, expected bytes up to {stop})"
        ))),
        other => other,
    }
}

async fn flush(job: &Job, buf: &mut Vec<u8>, offset: u64) -> std::result::Result<u64, Failure> {
    if buf.is_empty() {
        return Ok(offset);
    }
    let data = std::mem::take(buf);
    let file = Arc::clone(&job.partial.file);
    let written = tokio::task::spawn_blocking(move || {
        let r = file.write_all_at(&data, offset);
        (r, data)
    })
    .await;
    let (result, mut data) = match written {
        Ok(pair) => pair,
        Err(e) => return Err(Failure::Transient(format!("write task failed: {e}"))),
    };
    if let Err(e) = result {
        // A local disk error will not get better by retrying another mirror.
        return Err(Failure::Mirror(Error::io(&job.partial.path, e)));
    }
    let len = data.len() as u64;
    data.clear();
    *buf = data;
    if job.partial.chunks.record(offset, len) {
        let partial = Arc::clone(&job.partial);
        // Small file write; off the async threads like every other write.
        let _ = tokio::task::spawn_blocking(move || partial.persist()).await;
    }
    Ok(offset + len)
}
