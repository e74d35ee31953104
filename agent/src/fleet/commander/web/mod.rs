//! `deploy-agent fleet serve`: a live page of one app's rollout for the
//! deploy commander, with its controls.
//!
//! - [`feed`] runs one blocking Consul query loop per watched prefix,
//!   shared by every open page, and publishes a snapshot (tiers, per-build
//!   and per-phase counts, steps, failed and stale hosts, every host row).
//! - This module serves the page (one hand-written HTML/CSS/JS file each,
//!   embedded with `include_str!`), the snapshot as server-sent events, and
//!   `POST /api/action` for the controls ([`actions`]).
//!
//! Security: loopback by default (another address needs `--allow-remote`);
//! every request must name an allowed `Host` (no DNS rebinding); a control
//! needs the page's CSRF token, a same-origin `Origin`, JSON, and runs with
//! the server's own Consul token, never one from the browser; `--read-only`
//! refuses every control. Connections are bounded, headers must arrive in
//! time, bodies are capped.
//!
//! Nothing is persisted here: if the process dies, open pages lose their
//! stream and reconnect to the next server; a control either reached
//! Consul (one CAS write) or did not.

pub mod actions;
pub mod feed;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, HOST, ORIGIN};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::RngCore;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::fleet::commander::release::Release;
use actions::{ActionOutcome, ActionRequest};
use feed::{FeedReceiver, FeedSettings};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The default `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Largest control request.
const MAX_BODY: usize = 8 * 1024;
/// Time for the request line and headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A comment line on every event stream this often, so proxies keep it.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Sent, without reading anything, to a client beyond `max_clients`.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain\r\ncontent-length: 35\r\nconnection: close\r\n\r\n\
too many clients on the fleet page\n";

type Body = BoxBody<Bytes, Infallible>;

/// How the page is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Serve without any control.
    pub read_only: bool,
    /// Allow a non-loopback `listen` (behind an authenticating proxy).
    pub allow_remote: bool,
    /// Extra origins allowed to load the page and post controls, e.g. the
    /// SSO proxy's `https://deploy.example.com`.
    pub origins: Vec<String>,
    /// A header the SSO proxy sets to the signed-in user; named in freeze
    /// records and logs.
    pub user_header: Option<String>,
    /// Connections served at once (each open page holds one).
    pub max_clients: usize,
    pub feed: FeedSettings,
}

/// A running page server.
#[derive(Debug)]
pub struct FleetPage {
    addr: SocketAddr,
    tracker: TaskTracker,
}

impl FleetPage {
    /// Binds, starts the Consul feed and serves until `shutdown`.
    /// `release.freeze_key` and its client are used; the tier keys come from
    /// the tiers found under the app.
    pub async fn start(
        release: Release,
        opts: ServeOptions,
        shutdown: CancellationToken,
    ) -> Result<FleetPage> {
        let ip = opts.listen.ip();
        if !ip.is_loopback() && !opts.allow_remote {
            return Err(Error::FleetPageListen {
                addr: opts.listen.to_string(),
                reason: "not a loopback address; the page has no login of its own: put it behind \
                         your SSO proxy (docs/fleet-page.md) and pass --allow-remote, or use --read-only with it"
                    .into(),
            });
        }
        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|e| Error::FleetPageListen {
                    addr: opts.listen.to_string(),
                    reason: format!("{e}; pick a free address with --listen"),
                })?;
        let addr = listener.local_addr().map_err(|e| Error::FleetPageListen {
            addr: opts.listen.to_string(),
            reason: e.to_string(),
        })?;
        let tracker = TaskTracker::new();
        let (feed, nudge) = feed::start(
            release.clone(),
            opts.feed.clone(),
            &tracker,
            shutdown.clone(),
        );
        let mut token = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut token);
        let csrf = hex::encode(token);
        let hosts = allowed_hosts(addr, &opts.origins);
        let mut origins: Vec<String> = hosts.iter().map(|h| format!("http://{h}")).collect();
        origins.extend(
            opts.origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_string()),
        );
        let index = INDEX_HTML
            .replace("{{CSRF}}", &csrf)
            .replace("{{APP}}", &html_escape(&opts.feed.app))
            .replace(
                "{{READONLY}}",
                if opts.read_only { "true" } else { "false" },
            );
        let state = Arc::new(State {
            app: opts.feed.app.clone(),
            release,
            read_only: opts.read_only,
            user_header: opts.user_header.clone(),
            feed,
            nudge,
            csrf,
            hosts,
            origins,
            index: Bytes::from(index),
            shutdown: shutdown.clone(),
        });
        info!(
            %addr,
            app = %opts.feed.app,
            read_only = opts.read_only,
            "fleet page: serving on http://{addr}/"
        );
        let clients = Arc::new(Semaphore::new(opts.max_clients.max(1)));
        tracker.spawn(accept_loop(
            listener,
            state,
            clients,
            tracker.clone(),
            shutdown,
        ));
        Ok(FleetPage { addr, tracker })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Waits until every task (feed, connections) has stopped after
    /// `shutdown`.
    pub async fn stopped(self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[derive(Debug)]
struct State {
    app: String,
    release: Release,
    read_only: bool,
    user_header: Option<String>,
    feed: FeedReceiver,
    nudge: feed::Nudge,
    csrf: String,
    /// `Host` values the server answers to.
    hosts: Vec<String>,
    /// `Origin` values a control may come from.
    origins: Vec<String>,
    index: Bytes,
    shutdown: CancellationToken,
}

/// The `Host` values a browser uses for this server: the bound address,
/// its `localhost` names when on loopback, and the hosts of `origins`.
fn allowed_hosts(addr: SocketAddr, origins: &[String]) -> Vec<String> {
    let port = addr.port();
    let mut v = vec![addr.to_string()];
    if addr.ip().is_loopback() {
        v.push(format!("localhost:{port}"));
        v.push(format!("127.0.0.1:{port}"));
        v.push(format!("[::1]:{port}"));
    }
    for o in origins {
        let host = o
            .split_once("://")
            .map_or(o.as_str(), |(_, h)| h)
            .trim_end_matches('/');
        v.push(host.to_string());
    }
    v.sort();
    v.dedup();
    v
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    clients: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let (mut stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "fleet page: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            debug!(%peer, "fleet page: too many clients");
            tracker.spawn(async move {
                let _ = stream.write_all(BUSY_RESPONSE).await;
            });
            continue;
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "fleet page: connection ended");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                }
            }
        });
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    let host = header(req.headers(), HOST.as_str());
    if !host.is_some_and(|h| state.hosts.iter().any(|a| a.eq_ignore_ascii_case(h))) {
        // A name we do not serve: DNS rebinding, or a proxy that rewrites
        // Host without `--origin`.
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "this server answers to {}; behind a proxy, pass its URL with --origin",
                state.hosts.join(", ")
            ),
        );
    }
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/") | (&Method::GET, "/index.html") => {
            asset(state.index.clone(), "text/html; charset=utf-8")
        }
        (&Method::GET, "/app.js") => asset(
            Bytes::from_static(APP_JS.as_bytes()),
            "text/javascript; charset=utf-8",
        ),
        (&Method::GET, "/app.css") => asset(
            Bytes::from_static(APP_CSS.as_bytes()),
            "text/css; charset=utf-8",
        ),
        (&Method::GET, "/api/snapshot") => {
            let p = state.feed.borrow().clone();
            if p.json.is_empty() {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no data from Consul yet; retry",
                );
            }
            with_headers(
                Response::new(full(p.json.clone())),
                "application/json",
                StatusCode::OK,
            )
        }
        (&Method::GET, "/api/events") => events(state),
        (&Method::POST, "/api/action") => control(state, req).await,
        (_, "/" | "/index.html" | "/app.js" | "/app.css" | "/api/snapshot" | "/api/events") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, "/api/action") => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The checks a control passes before it touches Consul.
fn refuse_control(state: &State, h: &HeaderMap) -> Option<(StatusCode, String)> {
    if state.read_only {
        return Some((
            StatusCode::FORBIDDEN,
            "this page is read-only (fleet serve --read-only); use the CLI command shown".into(),
        ));
    }
    let origin = header(h, ORIGIN.as_str());
    if !origin.is_some_and(|o| state.origins.iter().any(|a| a.eq_ignore_ascii_case(o))) {
        return Some((
            StatusCode::FORBIDDEN,
            format!(
                "cross-origin control refused (Origin {}); allowed: {}",
                origin.unwrap_or("missing"),
                state.origins.join(", ")
            ),
        ));
    }
    if header(h, "sec-fetch-site").is_some_and(|s| s != "same-origin") {
        return Some((StatusCode::FORBIDDEN, "cross-site control refused".into()));
    }
    let token = header(h, "x-csrf-token").unwrap_or("");
    if !same_secret(token.as_bytes(), state.csrf.as_bytes()) {
        return Some((
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token; reload the page".into(),
        ));
    }
    if !header(h, CONTENT_TYPE.as_str()).is_some_and(|c| c.starts_with("application/json")) {
        return Some((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send application/json".into(),
        ));
    }
    None
}

/// Compares without an early exit, so timing does not leak the token.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn control(state: &State, req: Request<Incoming>) -> Response<Body> {
    if let Some((status, why)) = refuse_control(state, req.headers()) {
        warn!(reason = %why, "fleet page: control refused before Consul");
        return error(status, &why);
    }
    let by = state
        .user_header
        .as_deref()
        .and_then(|h| header(req.headers(), h))
        .map(|u| format!("{u} (fleet page)"))
        .unwrap_or_else(|| {
            let user = std::env::var("SUDO_USER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| format!("uid {}", nix::unistd::getuid()));
            format!("{user} (fleet page)")
        });
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body over {MAX_BODY} bytes"),
            )
        }
    };
    let ar: ActionRequest = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad request: {e}")),
    };
    if ar.tier.is_empty() || ar.tier.contains('/') {
        return error(StatusCode::BAD_REQUEST, "bad tier name");
    }
    let release = Release {
        client: state.release.client.clone(),
        key: crate::fleet::tier_key(&state.app, &ar.tier),
        freeze_key: state.release.freeze_key.clone(),
    };
    match actions::apply(&release, &state.app, &ar, &by).await {
        Ok(o) => {
            state.nudge.reread();
            json_response(StatusCode::OK, &outcome_json(&o))
        }
        Err(e) => {
            let (status, kind) = match &e {
                Error::ReleaseConflict { .. } | Error::ReleaseFrozen { .. } => {
                    (StatusCode::CONFLICT, "conflict")
                }
                Error::ReleaseInvalid { .. } | Error::ReleaseMissing { .. } => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "invalid")
                }
                _ => (StatusCode::BAD_GATEWAY, "consul"),
            };
            json_response(
                status,
                &json!({"ok": false, "kind": kind, "error": e.to_string()}),
            )
        }
    }
}

fn outcome_json(o: &ActionOutcome) -> serde_json::Value {
    json!({"ok": true, "message": o.message, "cli": o.cli, "modify_index": o.modify_index})
}

/// The event stream: the current snapshot at once, then every new one,
/// and a comment every [`HEARTBEAT`]. Reads only the shared feed.
fn events(state: &State) -> Response<Body> {
    let rx = state.feed.clone();
    let shutdown = state.shutdown.clone();
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = futures_util::stream::unfold(
        (rx, shutdown, heartbeat, true),
        |(mut rx, shutdown, mut heartbeat, first)| async move {
            if first {
                let p = rx.borrow_and_update().clone();
                let chunk = if p.json.is_empty() {
                    Bytes::from_static(b"retry: 2000\n: waiting for Consul\n\n")
                } else {
                    sse_event(p.version, &p.json)
                };
                return Some((chunk, (rx, shutdown, heartbeat, false)));
            }
            let chunk = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = rx.changed() => {
                    r.ok()?;
                    let p = rx.borrow_and_update().clone();
                    sse_event(p.version, &p.json)
                }
                _ = heartbeat.tick() => Bytes::from_static(b": ping\n\n"),
            };
            Some((chunk, (rx, shutdown, heartbeat, false)))
        },
    );
    let body = StreamBody::new(stream.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let mut r = Response::new(BodyExt::boxed(body));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx and friends: do not buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    security_headers(h);
    r
}

fn sse_event(version: u64, json: &Bytes) -> Bytes {
    let mut b = Vec::with_capacity(json.len() + 48);
    b.extend_from_slice(format!("id: {version}\nevent: snapshot\ndata: ").as_bytes());
    // Compact JSON has no raw newlines (they are escaped in strings).
    b.extend_from_slice(json);
    b.extend_from_slice(b"\n\n");
    Bytes::from(b)
}

fn full(b: Bytes) -> Body {
    BodyExt::boxed(Full::new(b))
}

fn security_headers(h: &mut HeaderMap) {
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
}

fn with_headers(mut r: Response<Body>, ctype: &'static str, status: StatusCode) -> Response<Body> {
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    security_headers(h);
    r
}

fn asset(b: Bytes, ctype: &'static str) -> Response<Body> {
    with_headers(Response::new(full(b)), ctype, StatusCode::OK)
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let b = serde_json::to_vec(v).unwrap_or_default();
    with_headers(
        Response::new(full(Bytes::from(b))),
        "application/json",
        status,
    )
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"ok": false, "kind": "http", "error": message}),
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_secrets() {
        let h = allowed_hosts(
            "127.0.0.1:8080".parse().unwrap(),
            &["https://deploy.example.com/".into()],
        );
        assert!(h.contains(&"localhost:8080".to_string()));
        assert!(h.contains(&"deploy.example.com".to_string()));
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert_eq!(html_escape("<a&'\">"), "&lt;a&amp;&#39;&quot;&gt;");
    }
}
