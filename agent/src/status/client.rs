//! The operator CLI: `deploy-agent status|history|hold|resume|rollback|
//! redeploy`, a blocking client of the status socket (hyper's HTTP/1.1
//! client, one request per connection, `Connection: close`, a whole
//! exchange bounded by `CLIENT_TIMEOUT`), with distinct exit codes for
//! "agent not running", "permission denied" and "agent refused".
//!
//! The client changes nothing locally; a command the agent accepted is the
//! agent's to carry out even if the CLI is killed while waiting. Killed
//! before the request is written, nothing reached the agent.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::model::{HistoryEntry, StatusReport};
use super::render::{render_history, render_status};
use super::server::DEFAULT_SOCKET;
use crate::clock::now_secs;
use crate::error::Error;

/// Exit codes of the operator subcommands: the binary's one table
/// ([`crate::exit`]) as `i32`, the type [`run_cli`] returns.
pub mod exit {
    use crate::exit as table;
    pub const OK: i32 = table::OK as i32;
    pub const FAILURE: i32 = table::FAILURE as i32;
    pub const USAGE: i32 = table::USAGE as i32;
    pub const NOT_RUNNING: i32 = table::NOT_RUNNING as i32;
    pub const PERMISSION_DENIED: i32 = table::PERMISSION_DENIED as i32;
    pub const REFUSED: i32 = table::REFUSED as i32;
}

/// How long the client waits for a whole exchange with the agent; above the
/// server's own whole-request bound so the server's answer (even a 504)
/// arrives first.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Where to find the agent.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArgs {
    /// The agent's status socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, env = "DEPLOY_AGENT_SOCKET")]
    pub socket: PathBuf,
}

/// The operator subcommands; embed with `#[command(flatten)]` in the
/// binary's subcommand enum.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum OperatorCommand {
    /// Show the hot and cold slots, the deploy phase and progress, drain
    /// holders, Consul health and the hold state.
    Status {
        #[command(flatten)]
        socket: SocketArgs,
        /// Print the raw JSON report.
        #[arg(long)]
        json: bool,
        /// Redraw every second until interrupted; exits 3 when the agent
        /// goes away. Off a terminal, prints one report per second
        /// separated by a blank line, without terminal codes.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Show the last deploys.
    History {
        #[command(flatten)]
        socket: SocketArgs,
        /// Print the raw JSON list.
        #[arg(long)]
        json: bool,
    },
    /// Stop starting new deploys until `resume`; a running deploy is
    /// cancelled at its next safe point (a flip or health verdict already
    /// under way completes).
    Hold {
        #[command(flatten)]
        socket: SocketArgs,
        /// Why; shown in `status` to everyone else.
        #[arg(long)]
        reason: String,
    },
    /// Lift a hold.
    Resume {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Flip back to the build in the cold slot.
    Rollback {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Deploy the desired build again (e.g. after a failure).
    Redeploy {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Check the live slot against its record (stat; hashing what the
    /// stat cannot prove). Exits 5 naming every modified, added or missing
    /// path when the slot is not exactly its build.
    Verify {
        #[command(flatten)]
        socket: SocketArgs,
        /// Hash every file, whatever its stat says.
        #[arg(long)]
        full: bool,
    },
}

/// Runs a subcommand against the agent, printing to stdout/stderr; returns
/// the process exit code (see [`exit`]).
pub fn run_cli(cmd: OperatorCommand) -> i32 {
    let terminal = std::io::stdout().is_terminal();
    let color = terminal && color_allowed(std::env::var_os("NO_COLOR"));
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    run_cli_on(cmd, &mut out, &mut err, color, terminal)
}

/// `NO_COLOR` set to anything non-empty disables colour (no-color.org).
pub fn color_allowed(no_color: Option<std::ffi::OsString>) -> bool {
    no_color.is_none_or(|v| v.is_empty())
}

/// [`run_cli`] with explicit output streams and colour choice (for tests).
pub fn run_cli_with(
    cmd: OperatorCommand,
    out: &mut dyn Write,
    err: &mut dyn Write,
    color: bool,
) -> i32 {
    run_cli_on(cmd, out, err, color, color)
}

/// [`run_cli_with`], also saying whether `out` is a terminal (`status
/// --watch` redraws in place only on one).
pub fn run_cli_on(
    cmd: OperatorCommand,
    out: &mut dyn Write,
    err: &mut dyn Write,
    color: bool,
    terminal: bool,
) -> i32 {
    let result = match cmd {
        OperatorCommand::Status {
            socket,
            json,
            watch,
        } if watch && !json => watch_status_on(
            &socket.socket,
            out,
            WatchOptions {
                color,
                terminal,
                iterations: None,
                interval: Duration::from_secs(1),
            },
        ),
        OperatorCommand::Status { socket, json, .. } => status(&socket.socket, out, json, color),
        OperatorCommand::History { socket, json } => history(&socket.socket, out, json, color),
        OperatorCommand::Hold { socket, reason } => {
            let body = serde_json::json!({ "reason": reason }).to_string();
            command(&socket.socket, out, "hold", Some(body.as_bytes()))
        }
        OperatorCommand::Resume { socket } => command(&socket.socket, out, "resume", None),
        OperatorCommand::Rollback { socket } => command(&socket.socket, out, "rollback", None),
        OperatorCommand::Redeploy { socket } => command(&socket.socket, out, "redeploy", None),
        OperatorCommand::Verify { socket, full } => {
            let body = serde_json::json!({ "full": full }).to_string();
            command(&socket.socket, out, "verify", Some(body.as_bytes()))
        }
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            let _ = writeln!(err, "deploy-agent: {e}");
            exit_code(&e)
        }
    }
}

/// The exit code for an error (see [`exit`]).
pub fn exit_code(e: &Error) -> i32 {
    match e {
        Error::AgentNotRunning { .. } => exit::NOT_RUNNING,
        Error::SocketPermissionDenied { .. }
        | Error::SocketRootOnly { .. }
        | Error::Forbidden { .. } => exit::PERMISSION_DENIED,
        Error::AgentRefused { .. } => exit::REFUSED,
        _ => exit::FAILURE,
    }
}

fn status(socket: &Path, out: &mut dyn Write, json: bool, color: bool) -> Result<(), Error> {
    let resp = request(socket, "GET", "/v1/status", None)?.ok("status")?;
    if json {
        write_out(out, &resp.body);
        return Ok(());
    }
    let report: StatusReport = resp.json(socket)?;
    write_out(out, render_status(&report, color, now_secs()).as_bytes());
    Ok(())
}

/// How `status --watch` draws.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// ANSI colours in the report.
    pub color: bool,
    /// `out` is a terminal: redraw in place (home + clear screen). Off a
    /// terminal each report is appended, followed by a blank line, so a
    /// pipe or a file gets no terminal codes.
    pub terminal: bool,
    /// Stop after this many reports (tests); `None`: until interrupted.
    pub iterations: Option<u64>,
    pub interval: Duration,
}

/// [`watch_status_on`] for a terminal.
pub fn watch_status(
    socket: &Path,
    out: &mut dyn Write,
    color: bool,
    iterations: Option<u64>,
    interval: Duration,
) -> Result<(), Error> {
    watch_status_on(
        socket,
        out,
        WatchOptions {
            color,
            terminal: true,
            iterations,
            interval,
        },
    )
}

/// Shows the status every `interval`. When the agent goes away (socket
/// gone or refusing: [`Error::AgentNotRunning`]) the watch ends with that
/// error, so a script watching a host learns it (exit 3) instead of
/// waiting forever. Other failures (busy, a slow answer) are shown and
/// retried.
pub fn watch_status_on(
    socket: &Path,
    out: &mut dyn Write,
    opts: WatchOptions,
) -> Result<(), Error> {
    let WatchOptions {
        color,
        terminal,
        iterations,
        interval,
    } = opts;
    let mut n = 0u64;
    loop {
        let screen = match request(socket, "GET", "/v1/status", None)
            .and_then(|r| r.ok("status"))
            .and_then(|r| r.json::<StatusReport>(socket))
        {
            Ok(report) => render_status(&report, color, now_secs()),
            Err(e @ Error::AgentNotRunning { .. }) => return Err(e),
            Err(e) => format!("{e}\n"),
        };
        let frame = if terminal {
            // Home + clear screen, then the frame, in one write to avoid
            // flicker.
            format!(
                "\x1b[H\x1b[2J{screen}\n(every {}, Ctrl-C to quit)\n",
                crate::clock::human_duration(interval)
            )
        } else {
            format!("{screen}\n")
        };
        write_out(out, frame.as_bytes());
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

fn history(socket: &Path, out: &mut dyn Write, json: bool, color: bool) -> Result<(), Error> {
    let resp = request(socket, "GET", "/v1/history", None)?.ok("history")?;
    if json {
        write_out(out, &resp.body);
        return Ok(());
    }
    let entries: Vec<HistoryEntry> = resp.json(socket)?;
    write_out(out, render_history(&entries, color, now_secs()).as_bytes());
    Ok(())
}

/// How long a command is sent again while the agent says it did not run
/// it (its parts restarting on a config reload, a full socket).
const NOT_RUN_RETRY: Duration = Duration::from_secs(10);

fn command(
    socket: &Path,
    out: &mut dyn Write,
    name: &str,
    body: Option<&[u8]>,
) -> Result<(), Error> {
    let resp = send_until_run(socket, name, body)?.ok(name)?;
    let v: serde_json::Value = resp.json(socket)?;
    let mut line = format!("{name}: ok");
    match v.get("result") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(s)) => line = format!("{line}: {s}"),
        Some(other) => line = format!("{line}: {other}"),
    }
    line.push('\n');
    write_out(out, line.as_bytes());
    Ok(())
}

/// Sends command `name` and returns the agent's answer, sending it again
/// (every 200 ms, for up to [`NOT_RUN_RETRY`]) while the agent answers
/// that it did not run it: a 503 with `retry-after`, a connection closed
/// before the command was read, or, once such an answer came, no socket
/// yet (a reload's new parts create theirs). A command that may have run
/// is never sent twice.
fn send_until_run(socket: &Path, name: &str, body: Option<&[u8]>) -> Result<HttpResponse, Error> {
    let start = std::time::Instant::now();
    let mut restarting = false;
    loop {
        let sent = request(socket, "POST", &format!("/v1/{name}"), body);
        let not_run = match &sent {
            Ok(r) => r.status == 503 && r.retry_after,
            Err(Error::CommandNotRead { .. }) => true,
            Err(Error::AgentNotRunning { .. }) => restarting,
            Err(_) => false,
        };
        if !not_run || start.elapsed() >= NOT_RUN_RETRY {
            return sent;
        }
        if !restarting {
            eprintln!("deploy-agent: the agent did not run {name} (restarting its parts?); sending it again");
            restarting = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes a command's report; a failed write ends the command
/// ([`crate::exit::output_failed`]): a reader that went away is not an
/// error of the agent or its socket.
fn write_out(out: &mut dyn Write, bytes: &[u8]) {
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        crate::exit::output_failed(e)
    }
}

/// An HTTP answer: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
    /// The answer had `retry-after`: the agent did not run the command.
    pub retry_after: bool,
}

impl HttpResponse {
    /// Maps non-2xx answers to errors: 403 -> `Forbidden`, 409 ->
    /// `AgentRefused`, others -> `AgentFailed`, each with the agent's
    /// `{"error": ...}` message.
    pub fn ok(self, command: &str) -> Result<HttpResponse, Error> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let message = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_owned());
        Err(match self.status {
            403 => Error::Forbidden { message },
            409 => Error::AgentRefused {
                command: command.to_owned(),
                message,
            },
            status => Error::AgentFailed {
                command: command.to_owned(),
                status,
                message,
            },
        })
    }

    fn json<T: serde::de::DeserializeOwned>(&self, socket: &Path) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|e| Error::AgentProtocol {
            path: socket.into(),
            detail: format!("invalid JSON: {e}"),
        })
    }
}

/// Sends one request and reads the whole answer.
///
/// Blocking: the CLI has no runtime of its own, so each request runs on a
/// current-thread runtime that lives as long as the request (the HTTP is
/// hyper's client, one request per connection, `Connection: close`).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<HttpResponse, Error> {
    // A blocking connect, as `connect(2)` reports it: a full backlog waits
    // instead of failing with EAGAIN as a non-blocking connect would, and
    // "no socket" / "nobody listening" / EACCES keep their own exit codes.
    let stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| connect_error(socket, e))?;
    request_on(socket, stream, method, path, body)
}

/// [`request`] over a connected socket.
fn request_on(
    socket: &Path,
    stream: std::os::unix::net::UnixStream,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<HttpResponse, Error> {
    let io = |e| Error::io(socket, e);
    stream.set_nonblocking(true).map_err(io)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(io)?;
    let body = Bytes::copy_from_slice(body.unwrap_or_default());
    runtime.block_on(async {
        match tokio::time::timeout(CLIENT_TIMEOUT, exchange(socket, stream, method, path, body))
            .await
        {
            Ok(answer) => answer,
            Err(_) => Err(Error::io(
                socket,
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer from the agent within {}",
                        crate::clock::human_duration(CLIENT_TIMEOUT)
                    ),
                ),
            )),
        }
    })
}

/// One request and its whole answer over a connected socket.
async fn exchange(
    socket: &Path,
    stream: std::os::unix::net::UnixStream,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<HttpResponse, Error> {
    use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};

    let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| Error::io(socket, e))?;
    let write_error = Arc::new(OnceLock::new());
    let io = TokioIo::new(KeepAnswer {
        stream,
        write_error: write_error.clone(),
    });
    let failed = |e: hyper::Error| hyper_error(socket, e, &write_error);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(failed)?;
    // The connection's errors reach us through `send_request` and the body;
    // the task ends with the runtime.
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "deploy-agent")
        .header(CONNECTION, "close")
        .header(
            USER_AGENT,
            concat!("deploy-agent-cli/", env!("CARGO_PKG_VERSION")),
        )
        .header(CONTENT_LENGTH, body.len());
    if !body.is_empty() {
        req = req.header(CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| Error::AgentProtocol {
            path: socket.into(),
            detail: format!("cannot send {method} {path}: {e}"),
        })?;
    let resp = sender.send_request(req).await.map_err(failed)?;
    let status = resp.status().as_u16();
    let retry_after = resp.headers().contains_key(hyper::header::RETRY_AFTER);
    // hyper undoes Content-Length and chunked framing; a body cut short is
    // an error, never a silently shorter answer.
    let body = resp.into_body().collect().await.map_err(failed)?.to_bytes();
    Ok(HttpResponse {
        status,
        body: body.to_vec(),
        retry_after,
    })
}

/// A failed exchange as the operator should read it: I/O trouble on the
/// socket as [`Error::Io`], anything else the agent sent as
/// [`Error::AgentProtocol`].
fn hyper_error(socket: &Path, e: hyper::Error, write_error: &OnceLock<std::io::Error>) -> Error {
    let protocol = |detail: String| Error::AgentProtocol {
        path: socket.into(),
        detail,
    };
    let cause = std::error::Error::source(&e).and_then(|c| c.downcast_ref::<std::io::Error>());
    // No answer came after a failed write: the write's error is what
    // happened (the read only saw the close that followed it).
    if e.is_incomplete_message() || cause.is_some() {
        if let Some(w) = write_error.get() {
            // Our write failed: the agent closed before reading all of the
            // request, so it cannot have acted on it.
            return Error::CommandNotRead {
                path: socket.into(),
                source: copy_io(w),
            };
        }
    }
    match cause {
        // hyper's word for a body shorter than its Content-Length or chunks.
        Some(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            protocol(format!("answer cut short: {io}"))
        }
        // Reset with no answer: the server serves every connection it
        // accepted to the end (`status::server`), so this one was still in
        // the listen backlog when the listener closed (a reload's old
        // parts going): never read.
        Some(io) if io.kind() == std::io::ErrorKind::ConnectionReset => Error::CommandNotRead {
            path: socket.into(),
            source: copy_io(io),
        },
        Some(io) => Error::io(socket, copy_io(io)),
        None => protocol(e.to_string()),
    }
}

/// An owned copy of an `io::Error` only borrowed from its holder.
fn copy_io(e: &std::io::Error) -> std::io::Error {
    e.raw_os_error().map_or_else(
        || std::io::Error::new(e.kind(), e.to_string()),
        std::io::Error::from_raw_os_error,
    )
}

/// The socket, with write errors set aside so the answer can still be read.
///
/// A server that turns us away (too many clients) answers 503 and closes
/// without reading the request: our write may then fail (EPIPE, or
/// ECONNRESET) while the 503 waits in our receive buffer. hyper polls its
/// reads before its writes, so it usually has the 503 first; but if the
/// server answers and closes between that read and the write, hyper gives
/// up at the write error and the 503 is lost. Here the error is recorded,
/// the bytes are reported written, and hyper goes on to read the answer;
/// [`hyper_error`] reports the recorded error if no answer arrives. (The
/// unit tests below pass without this in the interleavings they produce;
/// that window is too narrow to hit on purpose.)
#[derive(Debug)]
struct KeepAnswer {
    stream: tokio::net::UnixStream,
    write_error: Arc<OnceLock<std::io::Error>>,
}

impl KeepAnswer {
    fn set_aside(&self, result: std::io::Result<usize>, len: usize) -> std::io::Result<usize> {
        match result {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                let _ = self.write_error.set(e);
                Ok(len)
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncRead for KeepAnswer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for KeepAnswer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.write_error.get().is_some() {
            return Poll::Ready(Ok(buf.len()));
        }
        let result = ready!(Pin::new(&mut self.stream).poll_write(cx, buf));
        Poll::Ready(self.set_aside(result, buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.write_error.get().is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn connect_error(socket: &Path, e: std::io::Error) -> Error {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound | ConnectionRefused => Error::AgentNotRunning {
            path: socket.into(),
            reason: e.to_string(),
        },
        PermissionDenied => match group_hint(socket) {
            Some(hint) => Error::SocketPermissionDenied {
                path: socket.into(),
                hint,
            },
            None => Error::SocketRootOnly {
                path: socket.into(),
            },
        },
        _ => Error::io(socket, e),
    }
}

/// Names the group to join: the socket's, or its directory's when the
/// socket itself cannot be seen. `None` when that group is root: joining
/// root is never the advice, only sudo is.
fn group_hint(socket: &Path) -> Option<String> {
    let meta = std::fs::metadata(socket).or_else(|_| {
        socket
            .parent()
            .map_or_else(|| std::fs::metadata("/"), std::fs::metadata)
    });
    match meta {
        Ok(m) if m.gid() == 0 => None,
        Ok(m) => {
            let gid = m.gid();
            let name = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                .ok()
                .flatten()
                .map_or_else(|| gid.to_string(), |g| g.name);
            Some(format!(
                "join group {name} (usermod -aG {name} $USER, then log in again)"
            ))
        }
        Err(_) => Some("join the group that owns the socket and its directory".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-connection server that reads the request head (unless
    /// `read` is false), answers `answer` and closes; returns the socket.
    fn answering(
        dir: &tempfile::TempDir,
        answer: impl Into<Vec<u8>>,
        read: bool,
    ) -> (PathBuf, std::thread::JoinHandle<()>) {
        use std::io::Read;
        let path = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let answer = answer.into();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            if read {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                    head.push(byte[0]);
                }
            }
            s.write_all(&answer).unwrap();
        });
        (path, server)
    }

    /// `request` (POST with `body`, else GET) against [`answering`].
    fn against(
        answer: impl Into<Vec<u8>>,
        read: bool,
        body: Option<&[u8]>,
    ) -> Result<HttpResponse, Error> {
        let dir = tempfile::tempdir().unwrap();
        let (p, server) = answering(&dir, answer, read);
        let method = if body.is_some() { "POST" } else { "GET" };
        let r = request(&p, method, "/v1/hold", body);
        server.join().unwrap();
        r
    }

    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy";

    #[test]
    fn reads_content_length_and_chunked_answers() {
        let r = against(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
            true,
            None,
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hi"[..]));
        let chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n\
                        3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let r = against(chunked, true, Some(br#"{"reason":"x"}"#)).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
    }

    #[test]
    fn garbage_or_a_short_body_is_a_protocol_error() {
        for answer in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhi",
            b"",
        ] {
            let e = against(answer, true, None).unwrap_err();
            assert!(matches!(e, Error::AgentProtocol { .. }), "{answer:?}: {e}");
            assert_eq!(exit_code(&e), exit::FAILURE);
        }
    }

    /// A server turning us away answers without reading: our write fails
    /// (a request larger than the socket buffer makes sure of it), the
    /// answer is still what we report.
    #[test]
    fn an_answer_sent_without_reading_the_request_is_kept() {
        let big = vec![b'x'; 4 << 20];
        let r = against(BUSY, false, Some(&big)).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (503, &b"busy"[..]));
        // Answer and request both larger than the socket buffers: neither
        // side waits for the other forever.
        let mut answer =
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 1048576\r\n\r\n".to_vec();
        answer.resize(answer.len() + (1 << 20), b'b');
        let r = against(answer, false, Some(&big)).unwrap();
        assert_eq!((r.status, r.body.len()), (503, 1 << 20));
    }

    /// The same at the first write: the server has answered and closed
    /// before the client writes a byte.
    #[test]
    fn an_answer_sent_before_the_request_is_written_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (p, server) = answering(&dir, BUSY, false);
        let stream = std::os::unix::net::UnixStream::connect(&p).unwrap();
        server.join().unwrap();
        let r = request_on(&p, stream, "GET", "/v1/status", None).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (503, &b"busy"[..]));
    }

    #[test]
    fn maps_statuses_to_exit_codes() {
        let r = |status: u16, body: &str| HttpResponse {
            status,
            body: body.as_bytes().to_vec(),
            retry_after: false,
        };
        let e = r(403, r#"{"error":"join group ops"}"#)
            .ok("hold")
            .unwrap_err();
        assert_eq!(exit_code(&e), exit::PERMISSION_DENIED);
        assert_eq!(e.to_string(), "join group ops");
        let e = r(409, r#"{"error":"nothing to roll back to"}"#)
            .ok("rollback")
            .unwrap_err();
        assert_eq!(exit_code(&e), exit::REFUSED);
        assert!(e.to_string().contains("nothing to roll back to"));
        let e = r(503, "busy").ok("resume").unwrap_err();
        assert_eq!(exit_code(&e), exit::FAILURE);
        assert!(r(200, "{}").ok("x").is_ok());
    }

    #[test]
    fn missing_socket_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let e = request(&dir.path().join("agent.sock"), "GET", "/v1/status", None).unwrap_err();
        assert_eq!(exit_code(&e), exit::NOT_RUNNING);
        assert!(
            e.to_string().contains("systemctl status deploy-agent"),
            "{e}"
        );
    }

    #[test]
    fn no_color_rules() {
        assert!(color_allowed(None));
        assert!(color_allowed(Some("".into())));
        assert!(!color_allowed(Some("1".into())));
    }
}
