//! The agent end to end: Consul watch -> fetch -> verify -> unpack -> drain
//! -> flip, against real loopback servers and a real deploy root, including
//! the failure paths. Every failure asserts the hot build keeps serving and
//! the error is reported.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use deploy_agent::deploy::Outcome;
use deploy_agent_tests::agent::Harness;
use deploy_agent_tests::{wait_until_async, DEADLINE};
use testkit::testserver::artifact::{Fault, FaultRule};
use testkit::testserver::consul::Fault as ConsulFault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_same_again_then_new_build_then_rollback() {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m1, _) = h.build("b1");
    let (m2, _) = h.build("b2");
    h.publish(&m1);
    let r1 = h.wait_live("b1", DEADLINE).await;
    assert_eq!(r1.outcome, Some(Outcome::Success));
    assert!(r1
        .phase_ms
        .contains_key(&deploy_agent::deploy::Phase::Downloading));
    assert!(r1.progress.entries > 60);

    // The same value again (a spurious write): no work at all.
    let reqs = h.artifacts.stats().requests;
    h.publish(&m1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.artifacts.stats().requests,
        reqs,
        "no download for the same value"
    );
    assert_eq!(h.status().history.len(), 1);

    h.publish(&m2);
    h.wait_live("b2", DEADLINE).await;
    assert_eq!(
        std::fs::read_link(h.root.join("current")).unwrap().to_str(),
        Some("slot-b")
    );

    // Back to b1 by setting the key back: flips from the cold slot, no download.
    let reqs = h.artifacts.stats().requests;
    h.publish(&m1);
    let r = h.wait_live("b1", DEADLINE).await;
    assert_eq!(r.outcome, Some(Outcome::RolledBack));
    assert_eq!(
        h.artifacts.stats().requests,
        reqs,
        "rollback must not download"
    );
    h.stop_agent().await;
}

async fn failing_case(fault: FaultRule, needle: &str) {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m1, _) = h.build("good");
    h.publish(&m1);
    h.wait_live("good", DEADLINE).await;
    let (m2, _) = h.build("bad");
    h.artifacts
        .set_fault(fault.on_path(Harness::url_path("bad")));
    h.publish(&m2);
    let msg = h.wait_error(needle, DEADLINE).await;
    assert_eq!(h.served(), "good", "hot build must keep serving ({msg})");
    // The cold slot is not marked: a restart would not serve it.
    let rec = h.status().deploy.unwrap();
    assert_eq!(rec.build, "bad");
    // No partial of a bad artifact is kept to grow the disk.
    assert!(
        !h.cache_entries().iter().any(|e| e.contains(".partial")
            && rec.outcome == Some(Outcome::Failed)
            && needle.contains("sha256")),
        "{:?}",
        h.cache_entries()
    );
    // Recovery: the fault clears and the agent retries by itself.
    h.artifacts.clear_faults();
    h.wait_live("bad", DEADLINE).await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_artifact_is_refused() {
    failing_case(FaultRule::always(Fault::FlipByte { offset: 100 }), "sha256").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_download_is_refused() {
    failing_case(FaultRule::always(Fault::Truncate { after: 1000 }), "bad").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_artifact_is_reported() {
    failing_case(FaultRule::always(Fault::NotFound), "404").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_size_in_manifest_is_refused() {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m1, _) = h.build("good");
    h.publish(&m1);
    h.wait_live("good", DEADLINE).await;
    let (m2, a) = h.build("bad");
    let wrong = m2.replace(
        &format!("\"size\":{}", a.size),
        &format!("\"size\":{}", a.size + 10),
    );
    assert_ne!(wrong, m2);
    h.publish(&wrong);
    h.wait_error("bad", DEADLINE).await;
    assert_eq!(h.served(), "good");
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_manifest_changes_nothing() {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m1, _) = h.build("good");
    h.publish(&m1);
    h.wait_live("good", DEADLINE).await;
    h.publish("{\"build\": \"x\", \"url\": \"http://h/x\", \"size\": 5, \"format\": \"tar\"}");
    let msg = h.wait_error("sha256", DEADLINE).await;
    assert!(msg.contains("manifest field `sha256`"), "{msg}");
    assert_eq!(h.served(), "good");
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_down_and_back() {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m1, _) = h.build("one");
    let (m2, _) = h.build("two");
    h.publish(&m1);
    h.wait_live("one", DEADLINE).await;
    h.consul.set_fault(ConsulFault::Status(500));
    // The blocking query in flight ends after its wait (5 s); the next
    // request meets the outage.
    wait_until_async("the watch must see the outage", DEADLINE, || async {
        let stats = h.agent.as_ref().unwrap().watch_stats.snapshot();
        if stats.consecutive_errors == 0 {
            Err(format!("{stats:?}"))
        } else {
            Ok(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.served(), "one");
    assert!(h.status().last_error.is_none() || h.served() == "one");
    h.consul.set_fault(ConsulFault::None);
    h.publish(&m2);
    h.wait_live("two", DEADLINE).await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_manifest_mid_download_wins() {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m1, _) = h.build("one");
    h.publish(&m1);
    h.wait_live("one", DEADLINE).await;
    let (slow, _) = h.build("slow");
    let (fast, _) = h.build("fast");
    h.artifacts.set_fault(
        FaultRule::always(Fault::Trickle {
            bytes_per_sec: 20_000,
        })
        .on_path(Harness::url_path("slow")),
    );
    h.publish(&slow);
    // Wait until the slow deploy is downloading.
    wait_until_async("the deploy of slow to start", DEADLINE, || async {
        match h.status().deploy.map(|d| d.build) {
            Some(b) if b == "slow" => Ok(()),
            b => Err(format!("deploying {b:?}")),
        }
    })
    .await;
    h.publish(&fast);
    h.wait_live("fast", DEADLINE).await;
    let cancelled = h
        .status()
        .history
        .iter()
        .any(|r| r.build == "slow" && r.outcome == Some(Outcome::Cancelled));
    assert!(cancelled, "{:#?}", h.status().history);
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_a_process_in_the_cold_slot() {
    let mut h = Harness::new(|c| c.drain.cold_deadline = Duration::from_millis(800)).await;
    h.start_agent().await;
    let (m1, _) = h.build("one");
    let (m2, _) = h.build("two");
    let (m3, _) = h.build("three");
    h.publish(&m1);
    h.wait_live("one", DEADLINE).await;
    h.publish(&m2);
    h.wait_live("two", DEADLINE).await;
    // A worker from build one still runs in what is now the cold slot.
    let mut worker = std::process::Command::new("sleep")
        .arg("infinity")
        .current_dir(h.root.join("slot-a"))
        .spawn()
        .unwrap();
    h.publish(&m3);
    let msg = h
        .wait_error(&format!("pid {}", worker.id()), DEADLINE)
        .await;
    assert!(msg.contains("still use"), "{msg}");
    assert_eq!(h.served(), "two");
    // Rollback to one is still possible: the slot was never claimed.
    assert!(std::fs::read_to_string(h.root.join("slot-a/BUILD")).unwrap() == "one");
    worker.kill().unwrap();
    worker.wait().unwrap();
    h.wait_live("three", DEADLINE).await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_hook_fails_the_deploy_and_stays_on_the_hot_build() {
    let mut h = Harness::new(|c| {
        c.hooks.pre_flip = Some(vec!["sleep".into(), "60".into()]);
        c.hooks.timeout = Duration::from_millis(500);
    })
    .await;
    h.start_agent().await;
    let (m1, _) = h.build("one");
    h.publish(&m1);
    let msg = h.wait_error("timed out", DEADLINE).await;
    assert!(msg.contains("pre-flip"), "{msg}");
    assert_eq!(h.served(), "");
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_leaving_a_child_on_stdout_does_not_hang() {
    // The hook's child keeps the hook's stdout open far longer than the
    // deadline below, and the hook timeout is longer still: an agent that
    // waited for that stdout to close would not go live in time.
    let pid_file = std::env::temp_dir().join(format!("da-orphan-{}", std::process::id()));
    let script = format!(
        "sleep 3600 & echo $! > {}; echo reloaded $DEPLOY_BUILD",
        pid_file.display()
    );
    let mut h = Harness::new(|c| {
        c.hooks.post_flip = Some(vec!["sh".into(), "-c".into(), script]);
        c.hooks.timeout = 10 * DEADLINE;
    })
    .await;
    h.start_agent().await;
    let (m1, _) = h.build("one");
    h.publish(&m1);
    h.wait_live("one", DEADLINE).await;
    let orphan = std::fs::read_to_string(&pid_file).unwrap();
    let _ = std::fs::remove_file(&pid_file);
    let orphan = nix::unistd::Pid::from_raw(orphan.trim().parse().unwrap());
    // Still holding the stdout the agent did not wait for.
    nix::sys::signal::kill(orphan, None).expect("the hook's child ended early");
    let _ = nix::sys::signal::kill(orphan, nix::sys::signal::Signal::SIGKILL);
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_download_resumes_and_completes() {
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m1, a) = h.build_with(
        "big",
        testkit::buildgen::BuildProfile::DEMO,
        deploy_agent::manifest::Format::TarGz,
    );
    h.artifacts.set_fault(FaultRule::always(Fault::Trickle {
        bytes_per_sec: 300_000,
    }));
    h.publish(&m1);
    wait_until_async("a third of the artifact downloaded", DEADLINE, || async {
        let got = h
            .agent
            .as_ref()
            .unwrap()
            .deployer
            .progress
            .snapshot()
            .bytes_downloaded;
        if got < a.size / 3 {
            Err(format!("{got} of {} bytes", a.size))
        } else {
            Ok(())
        }
    })
    .await;
    let st = h.status();
    h.stop_agent().await;
    assert_eq!(h.served(), "", "nothing half-written goes live: {st:#?}");
    let sent_before = h.artifacts.stats().bytes_sent;
    h.artifacts.clear_faults();
    h.start_agent().await;
    h.wait_live("big", DEADLINE).await;
    let resent = h.artifacts.stats().bytes_sent - sent_before;
    assert!(
        resent < a.size,
        "resume re-downloaded {resent} of {} bytes",
        a.size
    );
    h.stop_agent().await;
}
