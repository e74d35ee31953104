//! The status socket: HTTP/1.1 on a Unix socket, so
//! `curl --unix-socket /run/deploy-agent/agent.sock http://x/v1/status`
//! works without any network exposure.
//!
//! Guarantees:
//! - Bounded: at most `max_clients` connections are served at once (others
//!   get an immediate 503 and are closed), headers must arrive within
//!   `header_timeout`, a whole connection lives at most `request_timeout`,
//!   bodies are capped at `max_body_bytes` (a larger `Content-Length` gets
//!   413 before any of the body is read), one request per connection.
//! - One of the `max_clients` slots is kept for operators (root, the
//!   agent's uid, the operator group), so other local users filling the
//!   socket cannot lock an operator out of `status` or `hold`.
//! - Never stalls the daemon: reads go through [`StatusSource`] snapshots,
//!   commands through a bounded channel with `command_timeout` on both the
//!   send and the reply.
//! - Mutations (hold/resume/rollback/redeploy) only for root, the agent's
//!   own uid, or members of the operator group, judged by `SO_PEERCRED`.
//!
//! If the process dies, the socket file stays behind; the next start finds
//! nobody answering on it and replaces it. A socket a live agent answers on
//! is never removed.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::model::{Command, CommandRequest, Peer, StatusSource, HISTORY_LIMIT};
use crate::config::{GroupSpec, StatusConfig};
use crate::error::{Error, Result};

/// Where the agent listens unless configured otherwise; systemd creates
/// `/run/deploy-agent` (`RuntimeDirectory=`).
pub const DEFAULT_SOCKET: &str = "/run/deploy-agent/agent.sock";

/// Sent, without reading anything, to a client beyond `max_clients`.
/// `retry-after` tells the CLI that nothing was run and it may send the
/// command again.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\ncontent-length: 56\r\nretry-after: 1\r\nconnection: close\r\n\r\n\
{\"error\":\"too many clients on the status socket; retry\"}";

/// How the socket is created and bounded.
#[derive(Debug, Clone)]
pub struct SocketSettings {
    pub path: PathBuf,
    /// File mode of the socket; connecting needs write permission.
    pub mode: u32,
    /// Group owning the socket (who may connect and read status).
    pub group: Option<GroupSpec>,
    /// Group whose members may send commands (besides root and the agent's
    /// own uid). `None`: only those two.
    pub operator_group: Option<GroupSpec>,
    /// Connections served at once; more are answered 503 and closed.
    pub max_clients: usize,
    /// Time allowed for the request line and headers.
    pub header_timeout: Duration,
    /// Time allowed for a whole connection (one request and its answer).
    pub request_timeout: Duration,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Time allowed for the daemon to take a command, and again to answer.
    /// Keep it below `request_timeout`.
    pub command_timeout: Duration,
}

impl Default for SocketSettings {
    fn default() -> Self {
        SocketSettings {
            path: PathBuf::from(DEFAULT_SOCKET),
            mode: 0o660,
            group: None,
            operator_group: None,
            max_clients: 16,
            header_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            command_timeout: Duration::from_secs(4),
        }
    }
}

impl From<StatusConfig> for SocketSettings {
    fn from(c: StatusConfig) -> Self {
        let d = SocketSettings::default();
        SocketSettings {
            path: c.socket.unwrap_or(d.path),
            mode: c.socket_mode.unwrap_or(d.mode),
            group: c.socket_group,
            operator_group: c.operator_group,
            max_clients: c.max_clients.unwrap_or(d.max_clients),
            ..d
        }
    }
}

/// What every connection task needs, resolved once at start.
struct ConnContext {
    source: Arc<dyn StatusSource>,
    commands: mpsc::Sender<CommandRequest>,
    operator_gid: Option<u32>,
    operator_group: Option<String>,
    own_uid: u32,
    max_body_bytes: usize,
    command_timeout: Duration,
}

/// The status socket server.
#[derive(Debug)]
pub struct StatusServer;

impl StatusServer {
    /// Binds the socket (replacing a stale one), sets its mode and group and
    /// starts serving on the current tokio runtime. The returned task ends
    /// after `shutdown` is cancelled and in-flight connections finished
    /// (each is bounded by `request_timeout`); it then removes the socket.
    pub async fn start(
        settings: SocketSettings,
        source: Arc<dyn StatusSource>,
        commands: mpsc::Sender<CommandRequest>,
        shutdown: CancellationToken,
    ) -> Result<JoinHandle<()>> {
        // Group lookups may go to NSS (LDAP...) and block; they run once,
        // before serving, so the daemon's start is the only thing waiting.
        let operator_gid = settings
            .operator_group
            .as_ref()
            .map(GroupSpec::resolve)
            .transpose()?;
        let socket_gid = settings
            .group
            .as_ref()
            .map(GroupSpec::resolve)
            .transpose()?;
        if settings.command_timeout * 2 >= settings.request_timeout {
            // The send and the reply may each take command_timeout; past the
            // request timeout the client sees a dropped connection instead
            // of the 503/504 that says what happened.
            warn!(
                command_timeout_ms = settings.command_timeout.as_millis() as u64,
                request_timeout_ms = settings.request_timeout.as_millis() as u64,
                "status socket command timeout too close to the request timeout"
            );
        }
        let path = settings.path.clone();
        remove_stale_socket(&path).await?;
        let sock_err = |source| Error::StatusSocket {
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(&path).map_err(sock_err)?;
        // Between bind and chmod the socket has the umask's mode; the unit's
        // UMask=0027 keeps that window no wider than the final mode.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(settings.mode))
            .map_err(sock_err)?;
        if let Some(gid) = socket_gid {
            nix::unistd::chown(&path, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(|e| sock_err(e.into()))?;
        }
        let inode = std::fs::symlink_metadata(&path).map_err(sock_err)?.ino();
        // Values, not Debug strings: absent groups are absent fields.
        info!(
            path = %path.display(),
            mode = %format_args!("0o{:o}", settings.mode),
            group = settings.group.as_ref().map(tracing::field::display),
            operator_group = settings.operator_group.as_ref().map(tracing::field::display),
            max_clients = settings.max_clients as u64,
            "status socket listening"
        );
        let shared = Arc::new(ConnContext {
            source,
            commands,
            operator_gid,
            operator_group: settings.operator_group.as_ref().map(|g| g.to_string()),
            own_uid: nix::unistd::geteuid().as_raw(),
            max_body_bytes: settings.max_body_bytes,
            command_timeout: settings.command_timeout,
        });
        Ok(tokio::spawn(accept_loop(
            listener, inode, settings, shared, shutdown,
        )))
    }
}

/// Removes a socket file nobody answers on; refuses to touch a live one or
/// anything that is not a socket. Creates the parent directory if missing
/// (outside systemd, where `RuntimeDirectory=` does not exist).
async fn remove_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            return Ok(());
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::StatusSocketNotSocket { path: path.into() });
    }
    match tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await {
        // Only "refused" proves nobody listens; a timeout may be a live
        // agent with a full backlog, so that is refused too.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            warn!(path = %path.display(), "removing stale status socket from an earlier run");
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))
        }
        _ => Err(Error::StatusSocketInUse { path: path.into() }),
    }
}

async fn accept_loop(
    listener: UnixListener,
    inode: u64,
    settings: SocketSettings,
    shared: Arc<ConnContext>,
    shutdown: CancellationToken,
) {
    let (general, reserved) = split_slots(settings.max_clients);
    let slots = Arc::new(Semaphore::new(general));
    let operator_slots = Arc::new(Semaphore::new(reserved));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the
                // daemon's other work must keep its CPU.
                warn!(error = %e, "status socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = match peer_of(&stream) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read status socket peer credentials; closing");
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            // Every general slot is taken: only an operator may have the
            // reserved one. The /proc read for supplementary groups happens
            // only here, when the socket is full.
            Err(_) => match operator_slots.clone().try_acquire_owned() {
                Ok(p) if is_operator(peer, &shared).await => p,
                _ => {
                    // A fresh socket's send buffer is empty, so this
                    // non-blocking write either fits or is skipped; the
                    // close is what matters.
                    let _ = stream.try_write(BUSY_RESPONSE);
                    debug!(
                        pid = peer.pid,
                        uid = peer.uid,
                        "status socket full; client turned away"
                    );
                    continue;
                }
            },
        };
        tracker.spawn(serve(
            stream,
            peer,
            shared.clone(),
            settings.clone(),
            permit,
        ));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    // Remove the socket only if it is still the one we bound: a second agent
    // started by mistake must not lose its socket to our exit.
    let ours = std::fs::symlink_metadata(&settings.path)
        .map(|m| m.ino() == inode)
        .unwrap_or(false);
    if ours {
        if let Err(e) = std::fs::remove_file(&settings.path) {
            warn!(path = %settings.path.display(), error = %e, "cannot remove status socket");
        }
    }
    debug!("status socket closed");
}

/// `max_clients` split into (slots anyone may take, slots kept for
/// operators). One slot is kept as soon as there are two; a socket limited
/// to one client serves whoever comes first.
fn split_slots(max_clients: usize) -> (usize, usize) {
    match max_clients.max(1) {
        1 => (1, 0),
        n => (n - 1, 1),
    }
}

fn peer_of(stream: &UnixStream) -> std::io::Result<Peer> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(Peer {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

/// Serves one connection: one request, bounded in time.
async fn serve(
    stream: UnixStream,
    peer: Peer,
    shared: Arc<ConnContext>,
    settings: SocketSettings,
    _permit: OwnedSemaphorePermit,
) {
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(req, peer, &shared).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        // One request per connection keeps the whole-connection timeout a
        // per-request bound and frees the client slot right away.
        .keep_alive(false)
        .max_buf_size(16 * 1024);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    match tokio::time::timeout(settings.request_timeout, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(pid = peer.pid, uid = peer.uid, error = %e, "status client error"),
        Err(_) => debug!(
            pid = peer.pid,
            uid = peer.uid,
            "status client too slow; dropped"
        ),
    }
}

/// Endpoints.
#[derive(Debug, Clone, Copy)]
enum Route {
    Status,
    History,
    Metrics,
    Hold,
    Resume,
    Rollback,
    Redeploy,
    Verify,
}

async fn handle(req: Request<Incoming>, peer: Peer, shared: &ConnContext) -> Response<Full<Bytes>> {
    if let Some(refused) = refuse_large_body(&req, peer, shared.max_body_bytes) {
        return refused;
    }
    let Some(route) = route_of(req.uri().path()) else {
        return not_found(req.uri().path());
    };
    if let Some(refused) = refuse_method(&req, route) {
        return refused;
    }
    match route {
        Route::Status => json(StatusCode::OK, &shared.source.status()),
        Route::History => {
            let mut h = shared.source.history();
            h.truncate(HISTORY_LIMIT);
            json(StatusCode::OK, &h)
        }
        Route::Metrics => {
            let mut r = Response::new(Full::new(Bytes::from(shared.source.metrics())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Route::Hold | Route::Resume | Route::Rollback | Route::Redeploy | Route::Verify => {
            operator_command(req, route, peer, shared).await
        }
    }
}

/// A 413 for a declared body over the cap, before a byte of it is read:
/// waiting for it would hold a client slot until the request timeout.
fn refuse_large_body(
    req: &Request<Incoming>,
    peer: Peer,
    cap: usize,
) -> Option<Response<Full<Bytes>>> {
    let len = declared_length(req).filter(|len| *len > cap as u64)?;
    debug!(
        pid = peer.pid,
        uid = peer.uid,
        content_length = len,
        "status request body too large; refused unread"
    );
    Some(error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body of {len} bytes is larger than {cap} bytes"),
    ))
}

/// The endpoint of a path.
fn route_of(path: &str) -> Option<Route> {
    match path {
        "/v1/status" => Some(Route::Status),
        "/v1/history" => Some(Route::History),
        "/metrics" => Some(Route::Metrics),
        "/v1/hold" => Some(Route::Hold),
        "/v1/resume" => Some(Route::Resume),
        "/v1/rollback" => Some(Route::Rollback),
        "/v1/redeploy" => Some(Route::Redeploy),
        "/v1/verify" => Some(Route::Verify),
        _ => None,
    }
}

/// A 404 that lists the endpoints.
fn not_found(path: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {path}; try /v1/status, /v1/history, /metrics, \
             POST /v1/hold|resume|rollback|redeploy|verify"
        ),
    )
}

/// A 405 (with `Allow`) unless reads are GET and commands POST.
fn refuse_method(req: &Request<Incoming>, route: Route) -> Option<Response<Full<Bytes>>> {
    let read_only = matches!(route, Route::Status | Route::History | Route::Metrics);
    let (allowed, allow_header) = if read_only {
        (Method::GET, "GET")
    } else {
        (Method::POST, "POST")
    };
    if req.method() == allowed {
        return None;
    }
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} {} is not supported; use {allowed}",
            req.method(),
            req.uri().path()
        ),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow_header));
    Some(r)
}

/// hold/resume/rollback/redeploy: only for operators; the body is read
/// (capped) only once the peer is authorized.
async fn operator_command(
    req: Request<Incoming>,
    route: Route,
    peer: Peer,
    shared: &ConnContext,
) -> Response<Full<Bytes>> {
    if let Err(why) = authorize(peer, shared).await {
        warn!(
            pid = peer.pid,
            uid = peer.uid,
            gid = peer.gid,
            "operator command refused: not authorized"
        );
        return error(StatusCode::FORBIDDEN, why);
    }
    let body = match read_body(req.into_body(), shared.max_body_bytes).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let command = match parse_command(route, &body) {
        Ok(c) => c,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    send_command(command, peer, shared).await
}

async fn read_body(
    body: Incoming,
    cap: usize,
) -> std::result::Result<Bytes, Response<Full<Bytes>>> {
    match Limited::new(body, cap).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {cap} bytes"),
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read request body: {e}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldBody {
    reason: String,
}

/// Turns a POST into a [`Command`]; hold needs `{"reason": "..."}`, the
/// others take an empty body or any JSON object.
fn parse_command(route: Route, body: &[u8]) -> std::result::Result<Command, String> {
    let blank = body.iter().all(u8::is_ascii_whitespace);
    if let Route::Hold = route {
        if blank {
            return Err(r#"hold needs a JSON body {"reason": "why deploys are held"}"#.into());
        }
        let b: HoldBody = serde_json::from_slice(body)
            .map_err(|e| format!(r#"malformed hold body (want {{"reason": "..."}}): {e}"#))?;
        let reason = b.reason.trim();
        if reason.is_empty() {
            return Err("hold reason must not be empty".into());
        }
        return Ok(Command::Hold {
            reason: reason.to_owned(),
        });
    }
    let mut full = false;
    if !blank {
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("malformed JSON body: {e}"))?;
        if !v.is_object() {
            return Err("body must be empty or a JSON object".into());
        }
        full = v.get("full").and_then(serde_json::Value::as_bool) == Some(true);
    }
    Ok(match route {
        Route::Resume => Command::Resume,
        Route::Rollback => Command::Rollback,
        Route::Verify => Command::Verify { full },
        _ => Command::Redeploy,
    })
}

/// The `Content-Length` the client announced, if any.
fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Root, the agent's own uid, or a member (primary or supplementary) of the
/// operator group: who may send commands and use the reserved slot.
async fn is_operator(peer: Peer, shared: &ConnContext) -> bool {
    if peer.uid == 0 || peer.uid == shared.own_uid {
        return true;
    }
    match shared.operator_gid {
        Some(gid) => peer.gid == gid || supplementary_groups(peer.pid).await.contains(&gid),
        None => false,
    }
}

/// [`is_operator`], or the message that says what to do instead.
async fn authorize(peer: Peer, shared: &ConnContext) -> std::result::Result<(), String> {
    if is_operator(peer, shared).await {
        return Ok(());
    }
    Err(match &shared.operator_group {
        Some(g) => format!(
            "permission denied: uid {} is not root, the agent's user, or in the operator group \
             {g}; join it (usermod -aG {g} $USER, then log in again) or use sudo",
            peer.uid
        ),
        None => format!(
            "permission denied: uid {} may not send commands; no operator group is configured, \
             so only root and the agent's user may (use sudo, or set operator-group in the config)",
            peer.uid
        ),
    })
}

/// The `Groups:` line of `/proc/<pid>/status`. Empty when unknown (peer in
/// another pid namespace reports pid 0; the process may have exited), which
/// fails closed.
async fn supplementary_groups(pid: i32) -> Vec<u32> {
    if pid <= 0 {
        return Vec::new();
    }
    let Ok(text) = tokio::fs::read_to_string(format!("/proc/{pid}/status")).await else {
        return Vec::new();
    };
    parse_groups_line(&text)
}

fn parse_groups_line(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

async fn send_command(command: Command, peer: Peer, shared: &ConnContext) -> Response<Full<Bytes>> {
    let name = command.name();
    info!(
        command = name,
        pid = peer.pid,
        uid = peer.uid,
        "operator command"
    );
    let (tx, rx) = oneshot::channel();
    let req = CommandRequest {
        command,
        peer,
        reply: tx,
    };
    let wait = shared.command_timeout;
    if let Err(e) = shared.commands.send_timeout(req, wait).await {
        let why = match e {
            mpsc::error::SendTimeoutError::Timeout(_) => format!(
                "the agent is busy and did not take the {name} command within {}s; it was not run",
                wait.as_secs()
            ),
            // A reload ends the parts this socket belongs to; new ones
            // (with a new socket) take over within a moment.
            mpsc::error::SendTimeoutError::Closed(_) => format!(
                "the agent is restarting its parts (a config reload) or stopping; the {name} command was not run"
            ),
        };
        return not_run(why);
    }
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(Ok(result))) => json(
            StatusCode::OK,
            &serde_json::json!({"ok": true, "command": name, "result": result}),
        ),
        Ok(Ok(Err(why))) => error(StatusCode::CONFLICT, why),
        // The main loop answers every command it takes before it selects
        // again, and stops only at that select: a reply dropped unanswered
        // is a command still queued when its parts stopped (a reload).
        Ok(Err(_)) => not_run(format!(
            "the agent's parts stopped (a config reload, or a stop) before running the {name} command; it was not run"
        )),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the agent took the {name} command but did not answer within {}s; \
                 check `deploy-agent status`",
                wait.as_secs()
            ),
        ),
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let (status, body) = match serde_json::to_vec(value) {
        Ok(mut b) => {
            b.push(b'\n');
            (status, b)
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\":\"cannot encode response: {e}\"}}\n").into_bytes(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// 503 for a command the agent did not run, with `retry-after` so the CLI
/// sends it again (`status::client`).
fn not_run(message: String) -> Response<Full<Bytes>> {
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, message);
    resp.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from_static("1"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_groups_line() {
        let s = "Name:\tx\nUid:\t1\t1\t1\t1\nGroups:\t4 24 27 4242 \nNgid:\t0\n";
        assert_eq!(parse_groups_line(s), vec![4, 24, 27, 4242]);
        assert!(parse_groups_line("Groups:\n").is_empty());
        assert!(parse_groups_line("").is_empty());
    }

    #[test]
    fn hold_needs_a_reason() {
        assert!(parse_command(Route::Hold, b"").is_err());
        assert!(parse_command(Route::Hold, br#"{"reason": "  "}"#).is_err());
        assert!(parse_command(Route::Hold, br#"{"reason": 1}"#).is_err());
        assert!(parse_command(Route::Hold, br#"{"reason": "x", "y": 1}"#).is_err());
        assert_eq!(
            parse_command(Route::Hold, br#"{"reason": " db migration "}"#),
            Ok(Command::Hold {
                reason: "db migration".into()
            })
        );
        assert_eq!(parse_command(Route::Rollback, b""), Ok(Command::Rollback));
        assert_eq!(parse_command(Route::Resume, b"{}"), Ok(Command::Resume));
        assert!(parse_command(Route::Redeploy, b"\x00garbage").is_err());
    }

    #[test]
    fn group_spec_parses_numbers_as_gids() {
        assert_eq!("4242".parse::<GroupSpec>(), Ok(GroupSpec::Gid(4242)));
        assert_eq!(
            "deploy-ops".parse::<GroupSpec>(),
            Ok(GroupSpec::Name("deploy-ops".into()))
        );
        assert!(GroupSpec::Name("no-such-group-xyz".into())
            .resolve()
            .is_err());
        assert_eq!(GroupSpec::Name("root".into()).resolve().unwrap(), 0);
    }

    #[test]
    fn status_config_from_toml() {
        let c: StatusConfig = toml::from_str(
            "socket = \"/tmp/a.sock\"\nsocket-mode = 0o660\nsocket-group = \"deploy-ops\"\n\
             operator-group = 4242\nmax-clients = 8\n",
        )
        .unwrap();
        let s = SocketSettings::from(c);
        assert_eq!(s.path, PathBuf::from("/tmp/a.sock"));
        assert_eq!(s.mode, 0o660);
        assert_eq!(s.group, Some(GroupSpec::Name("deploy-ops".into())));
        assert_eq!(s.operator_group, Some(GroupSpec::Gid(4242)));
        assert_eq!(s.max_clients, 8);
        assert!(toml::from_str::<StatusConfig>("sokcet = \"x\"").is_err());
        let d = SocketSettings::from(StatusConfig::default());
        assert_eq!(d.path, PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn example_config_status_table_parses() {
        #[derive(Deserialize)]
        struct File {
            status: StatusConfig,
        }
        let f: File = toml::from_str(include_str!("../../../systemd/config.example.toml")).unwrap();
        let s = SocketSettings::from(f.status);
        assert_eq!(s.path, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(s.mode, 0o660);
        assert_eq!(s.operator_group, Some(GroupSpec::Name("deploy-ops".into())));
    }

    #[test]
    fn socket_modes_are_octal_and_bounded() {
        let mode = |t: &str| toml::from_str::<StatusConfig>(t).map(|c| c.socket_mode);
        assert_eq!(mode("socket-mode = 0o660").unwrap(), Some(0o660));
        assert_eq!(mode("socket-mode = \"0660\"").unwrap(), Some(0o660));
        assert_eq!(mode("socket-mode = \"660\"").unwrap(), Some(0o660));
        assert_eq!(mode("socket-mode = \"0o600\"").unwrap(), Some(0o600));
        assert!(mode("socket-mode = 0o7777").is_err());
        assert!(mode("socket-mode = \"7777\"").is_err());
        assert!(mode("socket-mode = \"0689\"").is_err());
        // Decimal 660 is 0o1224: above the bound, refused.
        assert!(mode("socket-mode = 660").is_err());
        assert!(mode("socket-mode = -1").is_err());
    }

    #[test]
    fn one_slot_is_kept_for_operators() {
        assert_eq!(split_slots(16), (15, 1));
        assert_eq!(split_slots(2), (1, 1));
        assert_eq!(split_slots(1), (1, 0));
        assert_eq!(split_slots(0), (1, 0));
    }

    #[test]
    fn busy_response_length_is_right() {
        let text = std::str::from_utf8(BUSY_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{text}"
        );
    }
}
