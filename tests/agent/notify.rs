#![allow(clippy::unwrap_used, clippy::expect_used)]
//! sd_notify against real datagram sockets standing in for systemd's
//! `$NOTIFY_SOCKET` (a filesystem path, as systemd, nspawn and podman set it). The
//! notifier reads only the environment, so every case runs in a child
//! process, the `test-child` program (no `set_var` races).

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use deploy_agent_tests::{children, fast_tempdir};

/// One datagram, without the trailing newline sd_notify puts after each
/// `KEY=VALUE`.
fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    String::from_utf8(buf[..n].to_vec())
        .unwrap()
        .trim_end_matches('\n')
        .to_string()
}

/// Runs the child program in `mode` with `NOTIFY_SOCKET=socket` (the
/// notifier reads only the environment, and a child keeps `set_var` out
/// of the parallel tests); returns its exit status and stderr.
fn run_child(mode: &str, socket: &std::ffi::OsStr) -> (bool, String) {
    let out = children::command(mode)
        .env("NOTIFY_SOCKET", socket)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check_all_messages(sock: &UnixDatagram, socket: &std::ffi::OsStr) {
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (ok, stderr) = run_child("notify-all-messages", socket);
    assert!(ok, "{stderr}");
    assert_eq!(recv(sock), "READY=1\nSTATUS=serving web-1 from slot a");
    assert_eq!(recv(sock), "STATUS=downloading web-2 50%");
    assert_eq!(recv(sock), "WATCHDOG=1");
    assert_eq!(recv(sock), "STOPPING=1");
    let mut last = 0u64;
    for _ in 0..2 {
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
    check_all_messages(&sock, path.as_os_str());
}

#[test]
fn a_missing_socket_is_an_error_not_a_panic() {
    let dir = fast_tempdir();
    let nowhere = dir.path().join("nobody-listens");
    let (ok, stderr) = run_child("notify-missing-socket", nowhere.as_os_str());
    assert!(ok, "{stderr}");
}

#[test]
fn reads_notify_socket_and_watchdog_from_the_environment() {
    let dir = fast_tempdir();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let me = children::command("notify-from-env")
        .get_program()
        .to_owned();
    // systemd sets WATCHDOG_PID to the service's main pid: `exec` from a
    // shell keeps `$$` as the child's pid.
    let run = |watchdog_pid: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "WATCHDOG_PID={watchdog_pid} exec \"$0\" notify-from-env"
            ))
            .arg(&me)
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "30000000")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        recv(&sock)
    };
    // Half of WATCHDOG_USEC.
    assert_eq!(run("$$"), "READY=1\nSTATUS=interval 15000");
    // A watchdog meant for another process (pid 1 is never the child).
    assert_eq!(run("1"), "READY=1\nSTATUS=interval 0");

    // Without NOTIFY_SOCKET the child sends nothing and still succeeds.
    let out = children::command("notify-from-env")
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

#[test]
fn watchdog_task_pings_at_half_the_interval() {
    let dir = fast_tempdir();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" notify-watchdog-task")
        .arg(children::command("notify-watchdog-task").get_program())
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000")
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
    assert_eq!(pings, 4, "pings in 350 ms (virtual) at 100 ms");
}
