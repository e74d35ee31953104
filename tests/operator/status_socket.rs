#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The status socket end to end: a real server on a temp Unix socket, a test
//! `StatusSource` with fixed data, a command channel answered by a test
//! task, and real clients (the CLI functions, raw sockets, `curl` — run as
//! an unprivileged user for the access checks when we are root).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deploy_agent::clock::now_secs;
use deploy_agent::config::GroupSpec;
use deploy_agent::status::client::{exit, request, run_cli_with, watch_status, SocketArgs};
use deploy_agent::status::model::*;
use deploy_agent::status::{
    CancellationToken, Metrics, OperatorCommand, SocketSettings, StatusServer,
};
use deploy_agent::Error;
use deploy_agent_tests::disk::is_root;
use deploy_agent_tests::{agent_bin, fast_tempdir, wait_until_async, DEADLINE};
use deploy_agent_tests::{needs_program, needs_root, precondition};
use tokio::sync::mpsc;

const OPERATOR_GID: u32 = 4242;
const NOBODY: u32 = 65534;

/// Test data: a deploy in the middle of downloading, held, with an error.
fn fixed_report() -> StatusReport {
    let mut r = StatusReport::new(3725);
    r.desired = Some(DesiredBuild {
        build: "web-2".into(),
        sha256: Some("ab".repeat(32)),
        source: Source {
            kind: SourceKind::Consul,
            location: "http://127.0.0.1:8500 deploy/web".into(),
        },
        modify_index: Some(77),
    });
    r.hot = Some(SlotInfo {
        name: "a".into(),
        build: Some("web-1".into()),
        sha256: Some("cd".repeat(32)),
        marked_unix: Some(now_secs() - 7200),
        unmarked_bytes: None,
        integrity: None,
    });
    r.cold = Some(SlotInfo {
        name: "b".into(),
        ..SlotInfo::default()
    });
    r.phase = Phase::Downloading;
    r.phase_since_unix = Some(now_secs() - 12);
    r.progress = Some(ProgressInfo {
        bytes_done: 12 << 20,
        bytes_total: Some(24 << 20),
        rate_bytes_per_sec: Some(3 << 20),
        eta_seconds: Some(4),
        entries: None,
    });
    r.drain_holders = vec![DrainHolder {
        pid: 4321,
        command: "gunicorn".into(),
        how: "cwd".into(),
    }];
    r.last_error = Some(LastError {
        message: "consul: connection refused".into(),
        at_unix: now_secs() - 300,
        build: None,
        current: true,
    });
    r.consul = Some(ConsulInfo {
        address: "http://127.0.0.1:8500".into(),
        key: "deploy/web".into(),
        last_index: Some(77),
        last_contact_ms: Some(120),
        consecutive_errors: 2,
        last_error: None,
    });
    r.hold = HoldState {
        held: true,
        reason: Some("db migration".into()),
        since_unix: Some(now_secs() - 60),
        by_uid: Some(1000),
    };
    r
}

struct FixedSource {
    metrics: Metrics,
}

impl StatusSource for FixedSource {
    fn status(&self) -> StatusReport {
        fixed_report()
    }
    fn history(&self) -> Vec<HistoryEntry> {
        // More than the limit, to see the server truncate.
        (0..60)
            .map(|i| HistoryEntry {
                id: format!("d{i}"),
                build: format!("web-{i}"),
                started_unix: now_secs() - 1000 + i,
                finished_unix: Some(now_secs() - 900 + i),
                outcome: Some(if i == 0 {
                    Outcome::Failed
                } else {
                    Outcome::Success
                }),
                error: (i == 0).then(|| "checksum mismatch".to_owned()),
                kind: Default::default(),
                by_uid: None,
                reason: None,
                phase_ms: BTreeMap::from([(Phase::Downloading, 1500), (Phase::Flipping, 3)]),
                from_delta: i == 1,
                integrity: None,
            })
            .collect()
    }
    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

struct Agent {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    seen: Arc<Mutex<Vec<(Command, Peer)>>>,
}

impl Agent {
    async fn start(tweak: impl FnOnce(&mut SocketSettings)) -> Agent {
        let dir = fast_tempdir();
        // Unprivileged test clients must be able to reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("agent.sock");
        let mut settings = SocketSettings {
            path: path.clone(),
            mode: 0o666,
            header_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_millis(900),
            ..SocketSettings::default()
        };
        tweak(&mut settings);
        let metrics = Metrics::new();
        metrics.set_build("web-1", "a");
        metrics.deploy_finished(Outcome::Success);
        let (tx, mut rx) = mpsc::channel::<CommandRequest>(4);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                seen2.lock().unwrap().push((req.command.clone(), req.peer));
                let answer = match req.command {
                    Command::Hold { reason } => {
                        Ok(serde_json::json!({ "held": true, "reason": reason }))
                    }
                    Command::Resume => Ok(serde_json::Value::Null),
                    Command::Rollback => Err(
                        "nothing to roll back to: the cold slot holds no valid build".to_owned(),
                    ),
                    Command::Redeploy => Ok(serde_json::json!("deploy of web-2 restarted")),
                    Command::Verify { .. } => Ok(serde_json::json!("slot-a holds exactly web-1")),
                };
                let _ = req.reply.send(answer);
            }
        });
        let shutdown = CancellationToken::new();
        let handle = StatusServer::start(
            settings,
            Arc::new(FixedSource { metrics }),
            tx,
            shutdown.clone(),
        )
        .await
        .unwrap();
        Agent {
            _dir: dir,
            path,
            shutdown,
            handle,
            seen,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.handle)
            .await
            .unwrap()
            .unwrap();
        assert!(!self.path.exists(), "socket removed on shutdown");
    }
}

/// Runs a CLI subcommand off the async threads; returns (exit, stdout, stderr).
async fn cli(cmd: OperatorCommand) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_cli_with(cmd, &mut out, &mut err, false);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    })
    .await
    .unwrap()
}

fn sock(path: &Path) -> SocketArgs {
    SocketArgs {
        socket: path.into(),
    }
}

async fn raw(
    path: &Path,
    method: &'static str,
    uri: &'static str,
    body: Option<Vec<u8>>,
) -> (u16, serde_json::Value) {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let r = request(&path, method, uri, body.as_deref()).unwrap();
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
        )
    })
    .await
    .unwrap()
}

/// Runs curl against the socket as `uid`/`gid` with supplementary `groups`
/// (or as ourselves when `uid` is None); returns (http status, body).
fn curl_as(user: Option<(u32, u32, Vec<u32>)>, socket: &Path, args: &[&str]) -> (u16, String) {
    let mut cmd = Proc::new("curl");
    cmd.args(["-s", "-m", "10", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .args(args);
    if let Some((uid, gid, groups)) = user {
        // Built before fork: allocating between fork and exec is not
        // async-signal-safe (another thread may hold the allocator's lock).
        let groups: Vec<_> = groups
            .iter()
            .map(|g| nix::unistd::Gid::from_raw(*g))
            .collect();
        // SAFETY: between fork and exec the child may only do what is
        // async-signal-safe. The closure makes three syscalls (setgroups,
        // setgid, setuid) on data built before the fork (`groups` is moved
        // in, not cloned), and `?` turns a nix `Errno` into an
        // `io::Error::from_raw_os_error`, which does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(nix::unistd::Gid::from_raw(gid))?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))?;
                Ok(())
            });
        }
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_through_the_cli_functions() {
    let agent = Agent::start(|_| {}).await;
    let p = agent.path.clone();

    let (code, out, err) = cli(OperatorCommand::Status {
        socket: sock(&p),
        json: true,
        watch: false,
    })
    .await;
    assert_eq!(code, exit::OK, "{err}");
    let report: StatusReport = serde_json::from_str(&out).unwrap();
    assert_eq!(report, fixed_report_without_clock(&report));
    assert_eq!(report.version, env!("CARGO_PKG_VERSION"));

    let (code, out, _) = cli(OperatorCommand::Status {
        socket: sock(&p),
        json: false,
        watch: false,
    })
    .await;
    assert_eq!(code, exit::OK);
    println!("{out}");
    for want in [
        "hot       a  web-1  sha256 cdcdcdcdcdcd  marked 2h00m ago",
        "cold      b  (empty)",
        "desired   web-2  from consul http://127.0.0.1:8500 deploy/web (index 77)",
        "phase     downloading for 12s",
        "[############------------]  50%  12.0 MiB / 24.0 MiB  3.0 MiB/s  ETA 4s",
        "pid 4321    gunicorn         cwd",
        "2 consecutive errors",
        "HELD since 1m00s ago by uid 1000: db migration",
        "consul: connection refused (5m00s ago)",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert!(!out.contains('\x1b'), "no colour when not asked");

    let (code, out, _) = cli(OperatorCommand::History {
        socket: sock(&p),
        json: true,
    })
    .await;
    assert_eq!(code, exit::OK);
    let h: Vec<HistoryEntry> = serde_json::from_str(&out).unwrap();
    assert_eq!(h.len(), HISTORY_LIMIT, "history truncated to the limit");
    let (code, out, _) = cli(OperatorCommand::History {
        socket: sock(&p),
        json: false,
    })
    .await;
    assert_eq!(code, exit::OK);
    assert!(
        out.contains("web-0") && out.contains("failed") && out.contains("checksum mismatch"),
        "{out}"
    );
    assert!(out.contains("downloading 1.5s, flipping 3ms"), "{out}");
    let delta_line = out.lines().find(|l| l.contains("web-1 ")).unwrap_or("");
    assert!(delta_line.contains("(delta) downloading"), "{out}");

    let metrics = tokio::task::spawn_blocking({
        let p = p.clone();
        move || request(&p, "GET", "/metrics", None).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(
        text.contains("deploy_agent_build_info{build=\"web-1\",slot=\"a\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("deploy_agent_deploys_total{outcome=\"success\"} 1"),
        "{text}"
    );

    let (code, out, err) = cli(OperatorCommand::Hold {
        socket: sock(&p),
        reason: "db migration".into(),
    })
    .await;
    assert_eq!(code, exit::OK, "{err}");
    assert_eq!(
        out,
        "hold: ok: {\"held\":true,\"reason\":\"db migration\"}\n"
    );
    let (code, out, _) = cli(OperatorCommand::Resume { socket: sock(&p) }).await;
    assert_eq!((code, out.as_str()), (exit::OK, "resume: ok\n"));
    let (code, out, _) = cli(OperatorCommand::Redeploy { socket: sock(&p) }).await;
    assert_eq!(
        (code, out.as_str()),
        (exit::OK, "redeploy: ok: deploy of web-2 restarted\n")
    );
    let (code, out, err) = cli(OperatorCommand::Rollback { socket: sock(&p) }).await;
    assert_eq!(code, exit::REFUSED, "{out}{err}");
    assert!(
        err.contains("the agent refused rollback: nothing to roll back to"),
        "{err}"
    );

    let seen = agent.seen.lock().unwrap().clone();
    let names: Vec<_> = seen.iter().map(|(c, _)| c.name()).collect();
    assert_eq!(names, ["hold", "resume", "redeploy", "rollback"]);
    assert_eq!(
        seen[0].0,
        Command::Hold {
            reason: "db migration".into()
        }
    );
    let me = nix::unistd::geteuid().as_raw();
    assert!(seen
        .iter()
        .all(|(_, peer)| peer.uid == me && peer.pid as u32 == std::process::id()));
    agent.stop().await;
}

/// The report as served, with the clock-dependent fields taken from `got`
/// (the fixed report is built anew, seconds apart, on every call).
fn fixed_report_without_clock(got: &StatusReport) -> StatusReport {
    let mut want = fixed_report();
    want.phase_since_unix = got.phase_since_unix;
    want.hot.as_mut().unwrap().marked_unix = got.hot.as_ref().unwrap().marked_unix;
    want.last_error.as_mut().unwrap().at_unix = got.last_error.as_ref().unwrap().at_unix;
    want.hold.since_unix = got.hold.since_unix;
    want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_the_right_status() {
    let agent = Agent::start(|s| s.max_body_bytes = 1024).await;
    let p = agent.path.clone();
    let (code, body) = raw(&p, "GET", "/nope", None).await;
    assert_eq!(code, 404);
    assert!(body["error"].as_str().unwrap().contains("/nope"), "{body}");
    let (code, body) = raw(&p, "GET", "/v1/hold", None).await;
    assert_eq!(code, 405);
    assert!(
        body["error"].as_str().unwrap().contains("use POST"),
        "{body}"
    );
    let (code, _) = raw(&p, "POST", "/v1/status", None).await;
    assert_eq!(code, 405);
    let (code, body) = raw(&p, "POST", "/v1/hold", None).await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("reason"), "{body}");
    let (code, _) = raw(&p, "POST", "/v1/hold", Some(b"{not json".to_vec())).await;
    assert_eq!(code, 400);
    let (code, _) = raw(&p, "POST", "/v1/hold", Some(br#"{"reason": ""}"#.to_vec())).await;
    assert_eq!(code, 400);
    let (code, _) = raw(
        &p,
        "POST",
        "/v1/rollback",
        Some(b"\x00\x01garbage".to_vec()),
    )
    .await;
    assert_eq!(code, 400);
    let (code, body) = raw(&p, "POST", "/v1/hold", Some(vec![b' '; 4096])).await;
    assert_eq!(code, 413, "{body}");
    assert!(
        agent.seen.lock().unwrap().is_empty(),
        "no malformed request reached the daemon"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_works_and_metrics_have_the_prometheus_content_type() {
    if !precondition(needs_program("curl", "curl")) {
        return;
    }
    let agent = Agent::start(|_| {}).await;
    let p = agent.path.clone();
    let (code, body) = tokio::task::spawn_blocking({
        let p = p.clone();
        move || curl_as(None, &p, &["http://x/v1/status"])
    })
    .await
    .unwrap();
    assert_eq!(code, 200);
    let r: StatusReport = serde_json::from_str(&body).unwrap();
    assert_eq!(r.phase, Phase::Downloading);
    let (code, head) = tokio::task::spawn_blocking({
        let p = p.clone();
        move || {
            curl_as(
                None,
                &p,
                &["-o", "/dev/null", "-D", "-", "http://x/metrics"],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let (code, body) = tokio::task::spawn_blocking({
        let p = p.clone();
        move || {
            curl_as(
                None,
                &p,
                &[
                    "-X",
                    "POST",
                    "-d",
                    r#"{"reason":"from curl"}"#,
                    "http://x/v1/hold",
                ],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprivileged_peer_may_read_but_gets_403_naming_the_group() {
    if !precondition(needs_root("to connect as uid 65534").or(needs_program("curl", "curl"))) {
        return;
    }
    let agent = Agent::start(|s| s.operator_group = Some(GroupSpec::Gid(OPERATOR_GID))).await;
    let p = agent.path.clone();
    let (code, body) = tokio::task::spawn_blocking({
        let p = p.clone();
        move || {
            curl_as(
                Some((NOBODY, NOBODY, vec![])),
                &p,
                &["-X", "POST", "http://x/v1/resume"],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains(&format!("operator group {OPERATOR_GID}")) && msg.contains("usermod -aG"),
        "{msg}"
    );
    let (code, _) = tokio::task::spawn_blocking({
        let p = p.clone();
        move || curl_as(Some((NOBODY, NOBODY, vec![])), &p, &["http://x/v1/status"])
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "reading stays open to anyone who can connect");
    assert!(
        agent.seen.lock().unwrap().is_empty(),
        "the refused command never reached the daemon"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_group_members_may_send_commands() {
    if !precondition(needs_root("to connect as uid 65534").or(needs_program("curl", "curl"))) {
        return;
    }
    let agent = Agent::start(|s| s.operator_group = Some(GroupSpec::Gid(OPERATOR_GID))).await;
    let p = agent.path.clone();
    // Supplementary membership (read from /proc/<pid>/status).
    let (code, body) = tokio::task::spawn_blocking({
        let p = p.clone();
        move || {
            curl_as(
                Some((NOBODY, NOBODY, vec![100, OPERATOR_GID])),
                &p,
                &["-X", "POST", "http://x/v1/resume"],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    // Primary group membership (from SO_PEERCRED).
    let (code, body) = tokio::task::spawn_blocking({
        let p = p.clone();
        move || {
            curl_as(
                Some((NOBODY, OPERATOR_GID, vec![])),
                &p,
                &["-X", "POST", "http://x/v1/redeploy"],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let seen = agent.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|(_, peer)| peer.uid == NOBODY));
    assert_eq!(seen[1].1.gid, OPERATOR_GID);
    agent.stop().await;
}

/// Reads until EOF or `limit`; returns what was read and how long it took.
async fn read_until_closed(mut s: tokio::net::UnixStream, limit: Duration) -> (Vec<u8>, Duration) {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(limit, s.read_to_end(&mut buf)).await;
    assert!(
        r.is_ok(),
        "connection still open after {limit:?}: the server hangs"
    );
    (buf, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_dropped_while_others_are_served() {
    use tokio::io::AsyncWriteExt;
    let agent = Agent::start(|_| {}).await;
    let p = agent.path.clone();
    // Slow loris: half a request line, then nothing.
    let mut loris = tokio::net::UnixStream::connect(&p).await.unwrap();
    loris
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Slow body: headers promise 100 bytes, 10 arrive.
    let mut slow_body = tokio::net::UnixStream::connect(&p).await.unwrap();
    slow_body
        .write_all(b"POST /v1/hold HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"reason\":")
        .await
        .unwrap();
    let (code, _) = raw(&p, "GET", "/v1/status", None).await;
    assert_eq!(code, 200);
    // Served while the slow clients wait: both are still connected, not
    // dropped first (their timeouts are 1 and 2 s; a server that served
    // one client at a time would have closed them before answering).
    for (name, s) in [("loris", &loris), ("slow body", &slow_body)] {
        let mut probe = [0u8; 1];
        match s.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => {
                panic!("the {name} client was dropped before the status was served: {other:?}")
            }
        }
    }
    let (a, b) = tokio::join!(
        read_until_closed(loris, Duration::from_secs(5)),
        read_until_closed(slow_body, Duration::from_secs(5)),
    );
    // header_timeout is 1 s, request_timeout 2 s.
    assert!(
        a.1 >= Duration::from_millis(800),
        "loris dropped too early: {:?}",
        a.1
    );
    assert!(
        b.1 >= Duration::from_millis(1800),
        "slow body dropped too early: {:?}",
        b.1
    );
    assert!(
        !String::from_utf8_lossy(&b.0).contains(" 200 "),
        "slow body never answered 200"
    );
    assert!(agent.seen.lock().unwrap().is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_503_and_never_stall_a_request() {
    use tokio::io::AsyncReadExt;
    let agent = Agent::start(|s| s.max_clients = 4).await;
    let p = agent.path.clone();
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::UnixStream::connect(&p).await.unwrap());
    }
    // Let the server accept them all.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The last ones were turned away at once with a 503.
    let mut late = idle.pop().unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, late.read_to_end(&mut buf))
        .await
        .expect("a connection beyond the limit is closed")
        .unwrap();
    // Turned away with an answer, not dropped by a timeout.
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 503"),
        "{buf:?}"
    );
    // A normal request now is answered (503 while the idle ones hold
    // every slot), never left hanging until they time out.
    let (code, body) = raw(&p, "GET", "/v1/status", None).await;
    assert_eq!(code, 503, "{body}");
    // After the header timeout drops the idle clients, service resumes
    // although their sockets are still open on our side.
    wait_until_async(
        "service resumes after the idle clients time out",
        DEADLINE,
        || {
            let p = p.clone();
            async move {
                match raw(&p, "GET", "/v1/status", None).await {
                    (200, _) => Ok(()),
                    (code, body) => Err(format!("{code} {body}")),
                }
            }
        },
    )
    .await;
    drop(idle);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_400_or_a_close_never_a_hang() {
    use tokio::io::AsyncWriteExt;
    let agent = Agent::start(|_| {}).await;
    let p = agent.path.clone();
    let inputs: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(),
        b"GET /v1/status SPDY/9\r\n\r\n".to_vec(),
        vec![0xff; 40_000],
        b"GET /v1/status HTTP/1.1\r\nContent-Length: banana\r\n\r\n".to_vec(),
    ];
    for input in inputs {
        let mut s = tokio::net::UnixStream::connect(&p).await.unwrap();
        // The server may close before reading everything; that is fine.
        let _ = s.write_all(&input).await;
        let (answer, _) = read_until_closed(s, Duration::from_secs(4)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 4"),
            "{text}"
        );
    }
    let (code, _) = raw(&p, "GET", "/v1/status", None).await;
    assert_eq!(code, 200, "still serving");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_but_a_live_one_is_refused() {
    let dir = fast_tempdir();
    let path = dir.path().join("agent.sock");
    // A socket left behind by a dead agent: bound, then the listener closed.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let settings = SocketSettings {
        path: path.clone(),
        ..SocketSettings::default()
    };
    let source = Arc::new(FixedSource {
        metrics: Metrics::new(),
    });
    let (tx, _rx) = mpsc::channel(1);
    let shutdown = CancellationToken::new();
    let first = StatusServer::start(
        settings.clone(),
        source.clone(),
        tx.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    // A second agent on the same path must not steal the live socket.
    let second = StatusServer::start(
        settings.clone(),
        source.clone(),
        tx.clone(),
        CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(second, Err(Error::StatusSocketInUse { .. })),
        "{second:?}"
    );
    let (code, _) = raw(&path, "GET", "/v1/status", None).await;
    assert_eq!(code, 200, "the first agent still answers");
    shutdown.cancel();
    first.await.unwrap();
    assert!(!path.exists());
    // Something that is not a socket is never removed.
    std::fs::write(&path, "precious").unwrap();
    let r = StatusServer::start(settings, source, tx, CancellationToken::new()).await;
    assert!(
        matches!(r, Err(Error::StatusSocketNotSocket { .. })),
        "{r:?}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_gets_the_configured_mode_and_group() {
    let agent = Agent::start(|s| {
        s.mode = 0o660;
        s.group = Some(GroupSpec::Gid(OPERATOR_GID));
    })
    .await;
    let meta = std::fs::metadata(&agent.path).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    if is_root() {
        assert_eq!(meta.gid(), OPERATOR_GID);
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_redraws_and_not_running_has_its_own_exit_code() {
    let agent = Agent::start(|_| {}).await;
    let p = agent.path.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        watch_status(&p, &mut out, true, Some(2), Duration::from_millis(10)).unwrap();
        String::from_utf8(out).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.matches("\x1b[H\x1b[2J").count(), 2, "{out}");
    assert!(out.contains("\x1b[33mHELD"), "hold in yellow: {out}");
    assert!(
        out.contains("\x1b[31mconsul: connection refused"),
        "error in red: {out}"
    );
    let gone = agent.path.clone();
    agent.stop().await;
    let (code, _, err) = cli(OperatorCommand::Status {
        socket: sock(&gone),
        json: false,
        watch: false,
    })
    .await;
    assert_eq!(code, exit::NOT_RUNNING);
    assert!(
        err.contains("not running") && err.contains("systemctl status deploy-agent"),
        "{err}"
    );
    let (code, _, _) = cli(OperatorCommand::Rollback {
        socket: sock(&gone),
    })
    .await;
    assert_eq!(code, exit::NOT_RUNNING);
}

#[test]
fn exit_codes_are_distinct() {
    let codes = [
        exit::OK,
        exit::FAILURE,
        exit::USAGE,
        exit::NOT_RUNNING,
        exit::PERMISSION_DENIED,
        exit::REFUSED,
    ];
    let mut sorted = codes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), codes.len());
}

/// Runs the real `deploy-agent resume --socket <socket>` as nobody;
/// returns (exit code, stderr).
fn cli_as_nobody(socket: &Path) -> (i32, String) {
    let mut cmd = Proc::new(agent_bin());
    cmd.arg("resume").arg("--socket").arg(socket);
    // std drops the supplementary groups (setgroups(0)) when it changes the
    // uid as root, then sets gid and uid: no code of ours runs after fork.
    cmd.uid(NOBODY).gid(NOBODY);
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_as_unprivileged_user_exits_4_naming_the_group() {
    if !precondition(needs_root("to run the CLI as uid 65534")) {
        return;
    }
    // Connect allowed (0666), command refused by the agent: 403.
    let agent = Agent::start(|s| s.operator_group = Some(GroupSpec::Gid(OPERATOR_GID))).await;
    let p = agent.path.clone();
    let (code, err) = tokio::task::spawn_blocking(move || cli_as_nobody(&p))
        .await
        .unwrap();
    assert_eq!(code, exit::PERMISSION_DENIED, "{err}");
    assert!(
        err.contains(&format!("operator group {OPERATOR_GID}")),
        "{err}"
    );
    agent.stop().await;

    // Connect refused by the socket's mode (0660, group 4242): EACCES.
    let agent = Agent::start(|s| {
        s.mode = 0o660;
        s.group = Some(GroupSpec::Gid(OPERATOR_GID));
    })
    .await;
    let p = agent.path.clone();
    let (code, err) = tokio::task::spawn_blocking(move || cli_as_nobody(&p))
        .await
        .unwrap();
    assert_eq!(code, exit::PERMISSION_DENIED, "{err}");
    assert!(
        err.contains(&format!("join group {OPERATOR_GID}")) && err.contains("sudo"),
        "{err}"
    );
    assert!(agent.seen.lock().unwrap().is_empty());
    agent.stop().await;
}
