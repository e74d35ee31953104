#![allow(clippy::unwrap_used, clippy::expect_used)]
//! sd_notify against real datagram sockets standing in for systemd's
//! `$NOTIFY_SOCKET`: a filesystem path and an abstract (`@`) name, plus the
//! environment wrapper exercised in a child process (no `set_var` races).

use std::ffi::OsString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::Command;
use std::time::Duration;

use deploy_agent::daemon::notify::{spawn_watchdog, watchdog_interval, Notifier};
use deploy_agent::status::CancellationToken;
use deploy_agent_tests::fast_tempdir;

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn check_all_messages(sock: &UnixDatagram, n: &Notifier) {
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(n.is_enabled());
    n.ready("serving web-1 from slot a").unwrap();
    assert_eq!(recv(sock), "READY=1\nSTATUS=serving web-1 from slot a");
    n.status("downloading web-2\n50%").unwrap();
    assert_eq!(recv(sock), "STATUS=downloading web-2 50%");
    n.watchdog().unwrap();
    assert_eq!(recv(sock), "WATCHDOG=1");
    n.stopping().unwrap();
    assert_eq!(recv(sock), "STOPPING=1");
    let mut last = 0u64;
    for _ in 0..2 {
        n.reloading().unwrap();
        let msg = recv(sock);
        let (first, second) = msg.split_once('\n').unwrap();
        assert_eq!(first, "RELOADING=1");
        let usec: u64 = second
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > last, "monotonic: {usec} after {last}");
        last = usec;
    }
}

#[test]
fn sends_every_message_to_a_path_socket() {
    let dir = fast_tempdir();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    check_all_messages(&sock, &Notifier::new(Some(path.into_os_string())));
}

#[test]
fn sends_every_message_to_an_abstract_socket() {
    let name = format!(
        "deploy-agent-test-notify-{}-{}",
        std::process::id(),
        line!()
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    check_all_messages(
        &sock,
        &Notifier::new(Some(OsString::from(format!("@{name}")))),
    );
}

#[test]
fn a_missing_socket_is_an_error_not_a_panic() {
    let dir = fast_tempdir();
    let n = Notifier::new(Some(dir.path().join("nobody-listens").into_os_string()));
    let e = n.ready("x").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
}

/// Child half of `reads_notify_socket_and_watchdog_from_the_environment`:
/// runs only when re-executed with the marker variable set.
#[test]
fn child_mode_notify_from_env() {
    if std::env::var_os("DEPLOY_AGENT_NOTIFY_CHILD").is_none() {
        return;
    }
    let n = Notifier::from_env();
    let interval = watchdog_interval().map_or(0, |d| d.as_millis());
    n.ready(&format!("interval {interval}")).unwrap();
}

#[test]
fn reads_notify_socket_and_watchdog_from_the_environment() {
    let dir = fast_tempdir();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let me = std::env::current_exe().unwrap();
    let run = |watchdog_pid: Option<&str>| {
        let mut cmd = Command::new(&me);
        cmd.args(["--exact", "child_mode_notify_from_env", "--test-threads=1"])
            .env("DEPLOY_AGENT_NOTIFY_CHILD", "1")
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "30000000")
            .env_remove("WATCHDOG_PID");
        if let Some(pid) = watchdog_pid {
            cmd.env("WATCHDOG_PID", pid);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        recv(&sock)
    };
    // Half of WATCHDOG_USEC.
    assert_eq!(run(None), "READY=1\nSTATUS=interval 15000");
    // A watchdog meant for another process (pid 1 is never the child).
    assert_eq!(run(Some("1")), "READY=1\nSTATUS=interval 0");

    // Without NOTIFY_SOCKET the child sends nothing and still succeeds.
    let out = Command::new(&me)
        .args(["--exact", "child_mode_notify_from_env", "--test-threads=1"])
        .env("DEPLOY_AGENT_NOTIFY_CHILD", "1")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(out.status.success());
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        sock.recv(&mut buf).is_err(),
        "nothing sent without NOTIFY_SOCKET"
    );
}

/// Child half of `watchdog_task_pings_at_half_the_interval`.
#[test]
fn child_mode_watchdog_task() {
    if std::env::var_os("DEPLOY_AGENT_WATCHDOG_CHILD").is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let task = spawn_watchdog(Notifier::from_env(), shutdown.clone()).unwrap();
        // 200 ms watchdog -> a ping every 100 ms, the first at once.
        tokio::time::sleep(Duration::from_millis(350)).await;
        shutdown.cancel();
        task.await.unwrap();
        Notifier::from_env().stopping().unwrap();
    });
}

#[test]
fn watchdog_task_pings_at_half_the_interval() {
    let dir = fast_tempdir();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_mode_watchdog_task", "--test-threads=1"])
        .env("DEPLOY_AGENT_WATCHDOG_CHILD", "1")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pings = 0;
    loop {
        match recv(&sock).as_str() {
            "WATCHDOG=1" => pings += 1,
            "STOPPING=1" => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (3..=5).contains(&pings),
        "{pings} pings in 350 ms at 100 ms"
    );
}
