//! Fault matrix, two agents on one deploy root: the second (the real
//! binary, as an operator would start it by mistake) refuses with "locked
//! by pid N" naming the first, exits non-zero, and the first keeps working.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use deploy_agent_tests::agent::{capture_logs, Harness, ServeWatch, KEY};
use deploy_agent_tests::agent_bin;
use deploy_agent_tests::DEADLINE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_agent_on_the_same_root_refuses() {
    capture_logs();
    let bin = tokio::task::spawn_blocking(agent_bin).await.unwrap();
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m, _) = h.build("one");
    h.publish(&m);
    h.wait_live("one", DEADLINE).await;

    // In process: the library refuses with the owner's pid.
    let second = deploy_agent::daemon::Agent::start(
        h.config.clone(),
        deploy_agent::daemon::RunOptions {
            status_socket: false,
            notify: false,
            ..Default::default()
        },
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    let err = second
        .expect_err("a second agent must not start")
        .to_string();
    let pid = std::process::id();
    assert!(err.contains(&format!("locked by pid {pid}")), "{err}");

    // The real binary, with its own socket path so only the lock decides.
    let watch = ServeWatch::start(&h.root, "one");
    let config = h.tmp.path().join("second.toml");
    std::fs::write(
        &config,
        format!(
            "deploy-root = \"{}\"\n[source]\nkey = \"{KEY}\"\n[consul]\naddress = \"{}\"\n[status]\nsocket = \"{}\"\n",
            h.root.display(),
            h.consul.url(),
            h.tmp.path().join("second.sock").display()
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(&bin)
            .args(["--log-format", "text", "run", "--config"])
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .output(),
    )
    .await
    .expect("the second agent exits instead of waiting for the lock")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second agent exited 0: {stderr}");
    assert!(stderr.contains(&format!("locked by pid {pid}")), "{stderr}");
    watch.finish();
    assert!(
        !h.tmp.path().join("second.sock").exists(),
        "the refused agent left no socket"
    );

    // The first keeps working.
    let st = h.status();
    assert!(st.last_error.is_none(), "{:?}", st.last_error);
    h.assert_next_good_deploys("two", DEADLINE).await;
    h.stop_agent().await;
}
