#![allow(clippy::unwrap_used, clippy::expect_used)]
//! sd_notify against real datagram sockets standing in for systemd's
//! `$NOTIFY_SOCKET` (a filesystem path, as systemd, nspawn and podman set it). The
//! notifier reads only the environment, so every case runs in a child
//! process of this test binary (no `set_var` races).

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use deploy_agent::daemon::notify::{spawn_watchdog, watchdog_interval, Notifier};
use deploy_agent::status::CancellationToken;
use deploy_agent_tests::fast_tempdir;

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

/// Re-runs this test binary as `child` with `NOTIFY_SOCKET=socket` (the
/// notifier reads only the environment, and a child keeps `set_var` out
/// of the parallel tests); returns its exit status and stderr.
fn run_child(child: &str, socket: &std::ffi::OsStr) -> (bool, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child, "--test-threads=1", "--nocapture"])
        .env("DEPLOY_AGENT_NOTIFY_CHILD", "1")
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

/// Child half of the two `sends_every_message_*` tests.
#[test]
fn child_mode_all_messages() {
    if std::env::var_os("DEPLOY_AGENT_NOTIFY_CHILD").is_none() {
        return;
    }
    let n = Notifier::from_env();
    assert!(n.is_enabled());
    n.ready("serving web-1 from slot a").unwrap();
    n.status("downloading web-2\n50%").unwrap();
    n.watchdog().unwrap();
    n.stopping().unwrap();
    n.reloading().unwrap();
    std::thread::sleep(Duration::from_millis(2));
    n.reloading().unwrap();
}

fn check_all_messages(sock: &UnixDatagram, socket: &std::ffi::OsStr) {
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (ok, stderr) = run_child("child_mode_all_messages", socket);
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

/// Child half of `a_missing_socket_is_an_error_not_a_panic`.
#[test]
fn child_mode_missing_socket() {
    if std::env::var_os("DEPLOY_AGENT_NOTIFY_CHILD").is_none() {
        return;
    }
    let e = Notifier::from_env().ready("x").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn a_missing_socket_is_an_error_not_a_panic() {
    let dir = fast_tempdir();
    let nowhere = dir.path().join("nobody-listens");
    let (ok, stderr) = run_child("child_mode_missing_socket", nowhere.as_os_str());
    assert!(ok, "{stderr}");
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
    // systemd sets WATCHDOG_PID to the service's main pid: `exec` from a
    // shell keeps `$$` as the child's pid.
    let run = |watchdog_pid: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "WATCHDOG_PID={watchdog_pid} exec \"$0\" --exact child_mode_notify_from_env --test-threads=1"
            ))
            .arg(&me)
            .env("DEPLOY_AGENT_NOTIFY_CHILD", "1")
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
    // A paused clock: the watchdog's interval is the only timer and the
    // pings are blocking sends, so the virtual 350 ms hold exactly the
    // ticks at 0, 100, 200 and 300 ms however loaded the machine is.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
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
    let out = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --exact child_mode_watchdog_task --test-threads=1")
        .arg(std::env::current_exe().unwrap())
        .env("DEPLOY_AGENT_WATCHDOG_CHILD", "1")
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
