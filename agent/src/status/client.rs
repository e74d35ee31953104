//! The operator CLI: `deploy-agent status|history|hold|resume|rollback|
//! redeploy`, a minimal blocking HTTP/1.1 client over the status socket
//! (one request per connection, `Connection: close`), with distinct exit
//! codes for "agent not running", "permission denied" and "agent refused".
//!
//! The client changes nothing locally; a command the agent accepted is the
//! agent's to carry out even if the CLI is killed while waiting.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// How long the client waits for the agent; above the server's own
/// whole-request bound so the server's answer (even a 504) arrives first.
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
        return write_out(socket, out, &resp.body);
    }
    let report: StatusReport = resp.json(socket)?;
    write_out(
        socket,
        out,
        render_status(&report, color, now_secs()).as_bytes(),
    )
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
        write_out(socket, out, frame.as_bytes())?;
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
        return write_out(socket, out, &resp.body);
    }
    let entries: Vec<HistoryEntry> = resp.json(socket)?;
    write_out(
        socket,
        out,
        render_history(&entries, color, now_secs()).as_bytes(),
    )
}

fn command(
    socket: &Path,
    out: &mut dyn Write,
    name: &str,
    body: Option<&[u8]>,
) -> Result<(), Error> {
    let resp = request(socket, "POST", &format!("/v1/{name}"), body)?.ok(name)?;
    let v: serde_json::Value = resp.json(socket)?;
    let mut line = format!("{name}: ok");
    match v.get("result") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(s)) => line = format!("{line}: {s}"),
        Some(other) => line = format!("{line}: {other}"),
    }
    line.push('\n');
    write_out(socket, out, line.as_bytes())
}

fn write_out(socket: &Path, out: &mut dyn Write, bytes: &[u8]) -> Result<(), Error> {
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Error::io(socket, e))
}

/// An HTTP answer: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
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
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<HttpResponse, Error> {
    let mut stream = UnixStream::connect(socket).map_err(|e| connect_error(socket, e))?;
    let io = |e| Error::io(socket, e);
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: deploy-agent\r\nConnection: close\r\n\
         User-Agent: deploy-agent-cli/{}\r\nContent-Length: {}\r\n",
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    let mut raw = req.into_bytes();
    raw.extend_from_slice(body);
    // A server that turns us away (too many clients) answers 503 and closes
    // without reading the request: our write may then fail and our read end
    // in ECONNRESET after the answer. Keep whatever answer arrived.
    let written = stream.write_all(&raw);
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    if answer.is_empty() {
        written.map_err(io)?;
        read.map_err(io)?;
    }
    parse_response(&answer).map_err(|detail| Error::AgentProtocol {
        path: socket.into(),
        detail,
    })
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

/// Parses `HTTP/1.1 200 OK\r\n...\r\n\r\nbody`, honouring Content-Length
/// and chunked transfer encoding.
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {} bytes", raw.len()))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "header is not UTF-8".to_owned())?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..5))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| format!("bad content-length {v:?}"))?,
            );
        } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| format!("body truncated: {} of {n} bytes", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk header")?;
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk header")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = data.get(..size).ok_or("truncated chunk")?;
        body.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or("truncated chunk trailer")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi-extra").unwrap();
        assert_eq!(
            r,
            HttpResponse {
                status: 200,
                body: b"hi".to_vec()
            }
        );
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(
            r,
            HttpResponse {
                status: 404,
                body: b"abcde".to_vec()
            }
        );
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhi").is_err());
    }

    #[test]
    fn maps_statuses_to_exit_codes() {
        let r = |status: u16, body: &str| HttpResponse {
            status,
            body: body.as_bytes().to_vec(),
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
