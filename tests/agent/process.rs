//! The real `deploy-agent run` process: sd_notify messages on a test
//! NOTIFY_SOCKET, SIGHUP reload with a good and a bad config, and SIGTERM in
//! the middle of a download.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use deploy_agent::manifest::Format;
use deploy_agent_tests::process::{self, Proc};
use deploy_agent_tests::{agent_bin, fast_tempdir, wait_until_async, wait_until_every_async};
use nix::sys::signal::Signal;
use testkit::buildgen::{self, BuildProfile};
use testkit::testserver::artifact::{ArtifactServer, Fault, FaultRule};
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig};

const KEY: &str = "deploy/app/production";

/// The config under `dir`: Consul key [`KEY`], a 5 s watch, then `extra`.
fn write_config(dir: &Path, consul: &str, extra: &str) -> PathBuf {
    let tables = format!("[source]\nkey = \"{KEY}\"\n{extra}");
    process::write_config(dir, &dir.join("root"), consul, "wait = \"5s\"", &tables)
}

fn publish(
    consul: &ConsulServer,
    art: &ArtifactServer,
    dir: &Path,
    id: &str,
    profile: BuildProfile,
) -> u64 {
    let path = dir.join(format!("{id}.tar.gz"));
    let a = buildgen::write_build(profile, 3, id, Format::TarGz, &path).unwrap();
    let url = format!("/{id}.tar.gz");
    art.add(&url, std::fs::read(&path).unwrap());
    consul.put(
        KEY,
        buildgen::manifest_json(id, &art.url(&url), &a, Format::TarGz),
    );
    a.size
}

fn served(dir: &Path) -> String {
    process::served(&dir.join("root"))
}

fn wait_served(dir: &Path, id: &str, limit: Duration) {
    process::wait_served_sync(&dir.join("root"), id, limit, String::new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_status_watchdog_and_stopping() {
    let tmp = fast_tempdir();
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let art = ArtifactServer::start().await.unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let cfg = write_config(tmp.path(), &consul.url(), "");
    let mut p = Proc::start(&cfg, Some(&sock_path));
    publish(&consul, &art, tmp.path(), "n1", BuildProfile::TINY);
    let mut msgs = Vec::new();
    let mut buf = [0u8; 4096];
    let saw = |msgs: &Vec<String>, needle: &str| msgs.iter().any(|m| m.contains(needle));
    // Each poll takes one message (waiting up to the socket's 100 ms read
    // timeout): they queue in the socket meanwhile.
    wait_until_async(
        "READY=1, STATUS=done n1 and WATCHDOG=1",
        Duration::from_secs(30),
        || {
            let done = |msgs: &Vec<String>| {
                saw(msgs, "READY=1") && saw(msgs, "STATUS=done n1") && saw(msgs, "WATCHDOG=1")
            };
            if !done(&msgs) {
                if let Ok(n) = sock.recv(&mut buf) {
                    msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            std::future::ready(if done(&msgs) {
                Ok(())
            } else {
                Err(format!(
                    "messages so far: {msgs:?}\nlog:\n{}",
                    p.log.lock().unwrap()
                ))
            })
        },
    )
    .await;
    let ready_at = msgs.iter().position(|m| m.contains("READY=1")).unwrap();
    let first_status = msgs.iter().position(|m| {
        m.contains("STATUS=waiting-for-cold-slot n1") || m.contains("STATUS=downloading n1")
    });
    assert!(
        first_status.is_some_and(|i| i > ready_at),
        "READY=1 must come first: {msgs:?}"
    );
    p.signal(Signal::SIGTERM);
    let st = p.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "exit status {st:?}");
    while let Ok(n) = sock.recv(&mut buf) {
        msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(saw(&msgs, "STOPPING=1"), "{msgs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_config_and_keeps_the_old_one_on_a_bad_one() {
    let tmp = fast_tempdir();
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let art = ArtifactServer::start().await.unwrap();
    let cfg = write_config(tmp.path(), &consul.url(), "");
    let mut p = Proc::start(&cfg, None);
    publish(&consul, &art, tmp.path(), "r1", BuildProfile::TINY);
    wait_served(tmp.path(), "r1", Duration::from_secs(30));

    // A good change, then SIGHUP.
    write_config(tmp.path(), &consul.url(), "[hooks]\ntimeout = \"42s\"");
    p.signal(Signal::SIGHUP);
    p.wait_log("config changed", Duration::from_secs(10));
    // The restarted parts serve the socket and deploy again.
    let sock = tmp.path().join("agent.sock");
    // Every 100 ms: each poll runs the CLI.
    wait_until_every_async(
        "status socket not back after reload",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            let out = Command::new(agent_bin())
                .args(["status", "--json", "--socket"])
                .arg(&sock)
                .output()
                .unwrap();
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["hot"]["build"] == "r1" {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        },
    )
    .await;
    publish(&consul, &art, tmp.path(), "r2", BuildProfile::TINY);
    wait_served(tmp.path(), "r2", Duration::from_secs(30));

    // A bad config: rejected, old one kept, the agent keeps working.
    std::fs::write(&cfg, "deploy-root = \"relative\"\nbogus = 1\n").unwrap();
    p.signal(Signal::SIGHUP);
    p.wait_log("new config rejected", Duration::from_secs(10));
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["last_error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("config reload rejected"),
        "{v}"
    );
    publish(&consul, &art, tmp.path(), "r3", BuildProfile::TINY);
    wait_served(tmp.path(), "r3", Duration::from_secs(30));
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "agent must still run"
    );
    p.signal(Signal::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_download_leaves_a_consistent_root_and_exits_zero() {
    let tmp = fast_tempdir();
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let art = ArtifactServer::start().await.unwrap();
    let cfg = write_config(tmp.path(), &consul.url(), "");
    // Published before the start, so the watch's first answer carries it and
    // its next query blocks until t2 (the token bucket then refunds it).
    publish(&consul, &art, tmp.path(), "t1", BuildProfile::TINY);
    let mut p = Proc::start(&cfg, None);
    wait_served(tmp.path(), "t1", Duration::from_secs(30));
    art.set_fault(FaultRule::always(Fault::Trickle {
        bytes_per_sec: 100_000,
    }));
    art.reset_stats();
    let size = publish(&consul, &art, tmp.path(), "t2", BuildProfile::DEMO);
    wait_until_async(
        "download never started",
        Duration::from_secs(30),
        || async {
            match art.stats().bytes_sent {
                sent if sent < size / 10 => Err(format!("{sent} of {size} bytes sent")),
                _ => Ok(()),
            }
        },
    )
    .await;
    let t = Instant::now();
    p.signal(Signal::SIGTERM);
    let st = p.wait_exit(Duration::from_secs(25));
    assert!(
        st.success(),
        "exit status {st:?}\n{}",
        p.log.lock().unwrap()
    );
    eprintln!("stopped {:?} after SIGTERM", t.elapsed());
    // The root is consistent: t1 serves, the cold slot is not marked.
    assert_eq!(served(tmp.path()), "t1");
    let (root, _) = swapper::DeployRoot::open(tmp.path().join("root")).unwrap();
    assert_eq!(
        root.marker(root.cold()),
        None,
        "unfinished slot must stay unmarked"
    );
    assert_eq!(root.served().unwrap(), root.hot());
    // The partial download is kept for resume.
    let cache: Vec<String> = std::fs::read_dir(tmp.path().join("root/.deploy/cache"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        cache.iter().any(|n| n.ends_with(".partial")),
        "{cache:?}\n{}",
        p.log.lock().unwrap()
    );
}
