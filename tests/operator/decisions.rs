//! How the agent decides on what it reads, and what it tells: Consul errors
//! reach `status` with their text, time and the permission a 403 needs; a
//! fixed token file applies without a restart; status never waits on the
//! deploy root's lock; an already-live build is not counted as a deploy
//! again; SIGTERM is not a reload; an identical racing `release promote`
//! says it changed nothing; a new `deploy_id` deploys the live build again;
//! `resume` after an operator rollback redeploys the desired build.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use deploy_agent::manifest::Format;
use deploy_agent_tests::agent::Harness;
use deploy_agent_tests::process::{status_json as status, Proc};
use deploy_agent_tests::{agent_bin, fast_tempdir};
use deploy_agent_tests::{wait_until_async, wait_until_every_async, DEADLINE};
use nix::sys::signal::Signal;
use testkit::buildgen::{self, BuildProfile};
use testkit::testserver::artifact::ArtifactServer;
use testkit::testserver::consul::{
    AclConfig, AclToken, ConsulServer, ConsulServerConfig, KeyPolicy,
};

/// Waits until `status --json` satisfies `ok`; polls every 100 ms, as
/// each poll runs the CLI.
async fn wait_status(
    sock: &Path,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_until_every_async(what, DEADLINE, Duration::from_millis(100), || async {
        match status(sock) {
            Some(v) if ok(&v) => Ok(v),
            Some(v) => Err(format!("{v:#}")),
            None => Err("no status".to_string()),
        }
    })
    .await
}

fn token(secret: &str, rules: &[(&str, KeyPolicy)]) -> AclToken {
    AclToken {
        secret_id: secret.into(),
        rules: rules.iter().map(|(p, k)| (p.to_string(), *k)).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_errors_reach_status_and_a_fixed_token_file_applies_without_restart() {
    let tmp = fast_tempdir();
    let consul = ConsulServer::start(ConsulServerConfig {
        acl: Some(AclConfig {
            master_token: "master".into(),
            tokens: vec![
                // May read the control keys but not write its report.
                token("reader", &[("deploy/", KeyPolicy::Read)]),
                // The documented host policy.
                token(
                    "host",
                    &[
                        ("deploy/app/", KeyPolicy::Read),
                        ("deploy-hosts/app/", KeyPolicy::Write),
                    ],
                ),
            ],
        }),
        ..ConsulServerConfig::default()
    })
    .await
    .unwrap();
    let art = ArtifactServer::start().await.unwrap();
    let token_file = tmp.path().join("consul.token");
    std::fs::write(&token_file, "reader\n").unwrap();
    let sock = tmp.path().join("agent.sock");
    let cfg = tmp.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "deploy-root = \"{}\"\n[fleet]\napp = \"app\"\ntier = \"production\"\nhost-id = \"h1\"\nsplay-max = \"0s\"\n[consul]\naddress = \"{}\"\ntoken-file = \"{}\"\n[status]\nsocket = \"{}\"\n",
            tmp.path().join("root").display(),
            consul.url(),
            token_file.display(),
            sock.display()
        ),
    )
    .unwrap();
    let path = tmp.path().join("b1.tar.gz");
    let a = buildgen::write_build(BuildProfile::TINY, 3, "b1", Format::TarGz, &path).unwrap();
    art.add("/b1.tar.gz", std::fs::read(&path).unwrap());
    consul.put(
        "deploy/app/production",
        buildgen::manifest_json("b1", &art.url("/b1.tar.gz"), &a, Format::TarGz),
    );
    let mut p = Proc::start(&cfg, None);

    // The report write is refused: status names the write permission.
    let v = wait_status(&sock, "report 403 in status", |v| {
        v["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("403") && m.contains("key:write"))
    })
    .await;
    assert!(v["last_error"]["at_unix"].as_u64().unwrap() > 0, "{v:#}");
    assert!(v["fleet"]["report_error"]
        .as_str()
        .unwrap()
        .contains("deploy-hosts/app/h1"));

    // The deploy ends while the report is still refused: no state change
    // is left to carry the report, so only the writer's own retry can.
    // (Before, a report refused at the deploy's end stayed wrong in
    // `fleet status` until the next deploy: CI run of 1805f5c.)
    let v = wait_status(&sock, "b1 live, report still refused", |v| {
        v["hot"]["build"] == "b1" && v["phase"] == "done"
    })
    .await;
    assert!(v["fleet"]["report_error"].is_string(), "{v:#}");

    // The operator fixes the token file; no SIGHUP, no restart.
    std::fs::write(&token_file, "host\n").unwrap();
    wait_status(&sock, "report error cleared", |v| {
        v["fleet"]["report_error"].is_null()
    })
    .await;
    let rec = consul
        .get("deploy-hosts/app/h1")
        .expect("the report was written");
    assert!(String::from_utf8_lossy(&rec.value).contains("\"host\":\"h1\""));

    // Consul goes away: the transport error and its time are in status.
    let started = deploy_agent::clock::now_secs();
    consul.shutdown();
    let v = wait_status(&sock, "Consul outage in status", |v| {
        v["consul"]["consecutive_errors"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let msg = v["last_error"]["message"].as_str().unwrap();
    assert!(msg.contains("Consul request to"), "{v:#}");
    assert!(v["last_error"]["at_unix"].as_u64().unwrap() >= started);
    assert_eq!(
        v["consul"]["last_error"]["message"],
        v["last_error"]["message"]
    );

    // SIGTERM is a shutdown, not a reload.
    p.signal(Signal::SIGTERM);
    assert!(p.wait_exit(DEADLINE).success());
    assert!(
        !p.log().contains("config unchanged"),
        "a closed reload channel was read as a reload:\n{}",
        p.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_does_not_wait_for_the_deploy_root_lock() {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m1, _) = h.build("one");
    h.publish(&m1);
    h.wait_live("one", DEADLINE).await;
    let sock = h.tmp.path().join("agent.sock");
    // Build and warm the CLI first, so only the answer is timed.
    let s2 = sock.clone();
    tokio::task::spawn_blocking(move || status(&s2))
        .await
        .unwrap()
        .unwrap();
    // Hold the root's lock as `mark_ready` does across a whole syncfs.
    let root = h.agent.as_ref().unwrap().deployer.root.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let _g = root.lock().unwrap();
        tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(5));
    });
    rx.recv().unwrap();
    let t0 = Instant::now();
    let v = tokio::task::spawn_blocking(move || status(&sock))
        .await
        .unwrap()
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "status waited {took:?} for the root lock"
    );
    assert_eq!(v["hot"]["build"], "one", "{v:#}");
    holder.join().unwrap();
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_already_live_build_is_not_counted_again() {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m1, _) = h.build("one");
    h.publish(&m1);
    h.wait_live("one", DEADLINE).await;
    let count = |h: &Harness| {
        let text = h.agent.as_ref().unwrap().metrics.render();
        text.lines()
            .filter(|l| l.starts_with("deploy_agent_deploys_total") && l.contains("success"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert_eq!(count(&h), 1);
    // The watch hands the same manifest over again (a restart of the
    // watch, or a wake-up): no deploy runs, nothing is counted.
    h.stop_agent().await;
    h.start_agent().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.served(), "one");
    assert_eq!(
        count(&h),
        0,
        "the restarted agent counted a deploy that did not run"
    );
    let hist = h.status().control.history;
    assert_eq!(hist.len(), 1, "{hist:#?}");
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_racing_promote_says_it_changed_nothing() {
    use deploy_agent::consul::{ConsulClient, ConsulSettings};
    use deploy_agent::fleet::commander::release::Release;
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let client = ConsulClient::new(&ConsulSettings {
        address: consul.url(),
        ..ConsulSettings::default()
    })
    .unwrap();
    let r = Release {
        client,
        key: "deploy/app/production".into(),
        freeze_key: "deploy/app/freeze".into(),
    };
    let spec =
        deploy_agent::fleet::commander::release::check_spec(deploy_agent::manifest::BuildSpec {
            build: "b1".into(),
            urls: vec!["http://127.0.0.1:1/b1.tar.gz".into()],
            sha256: "a".repeat(64).parse().unwrap(),
            size: 10,
            format: Format::TarGz,
            index: None,
        })
        .unwrap();
    let mut b0 = spec.clone();
    b0.build = "b0".into();
    r.publish(&b0, None).await.unwrap();
    r.publish(&spec, Some(10.0)).await.unwrap();
    // Two commanders read the same state and compute the same promote.
    let cur = r.read().await.unwrap().unwrap();
    let m = r.promoted(&cur, 25.0).unwrap();
    let first = r.write(&m, cur.modify_index).await.unwrap();
    assert!(first > cur.modify_index);
    // The second reads after the first wrote, and writes the same bytes.
    let cur2 = r.read().await.unwrap().unwrap();
    let e = r.write(&m, cur2.modify_index).await.unwrap_err();
    assert!(
        matches!(e, deploy_agent::error::Error::ReleaseNoChange { index, .. } if index == first),
        "{e}"
    );
}

/// Issue 13, item 5: README says a new `deploy_id` deploys the same build
/// again on purpose (rule 18); it used to be reported as "already live".
/// The same id after a restart does not deploy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_deploy_id_deploys_the_live_build_again() {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m1, _) = h.build("one");
    h.publish(&m1);
    h.wait_live("one", DEADLINE).await;
    let with_id = |id: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&m1).unwrap();
        v["deploy_id"] = id.into();
        v.to_string()
    };
    h.publish(&with_id("r2"));
    wait_until_async("no second deploy for a new deploy id", DEADLINE, || async {
        match h.status().history.len() {
            n if n >= 2 => Ok(()),
            n => Err(format!("{n} deploys in history")),
        }
    })
    .await;
    let rec = h.wait_live("one", DEADLINE).await;
    assert_eq!(rec.deploy_id.as_deref(), Some("r2"));
    h.stop_agent().await;
    h.start_agent().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = h.status();
    assert!(
        s.history.is_empty(),
        "a restart redeployed the same deploy id: {:#?} {:#?}",
        s.history,
        s.deploy
    );
    h.stop_agent().await;
}

/// Found by `intent_random` (seed 3702183794245308320): after an operator
/// rollback and `resume`, without a restart in between, the desired build
/// must go live again. The loop still counted it as applied and stayed on
/// the rolled-back build with status saying nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_an_operator_rollback_redeploys_the_desired_build() {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    h.deploy_in_turn(&["one", "two"], DEADLINE).await;
    let sock = h.tmp.path().join("agent.sock");
    let cli = |args: &[&str]| {
        let out = Command::new(agent_bin())
            .args(args)
            .arg("--socket")
            .arg(&sock)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&["rollback"]);
    assert_eq!(h.served(), "one");
    cli(&["resume"]);
    h.wait_live("two", DEADLINE).await;
    h.stop_agent().await;
}
