//! Fault matrix, artifact server: truncated bodies, flipped bytes, a wrong
//! length, no Range support, 404, 503-then-recovering, a mid-body stall
//! past the read timeout, and a very slow trickle. Each case checks (a) the
//! live build serves throughout, (b) nothing is left that grows the disk,
//! (c) the error is in status and in the log, (d) the next good build
//! deploys.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use deploy_agent::deploy::{Outcome, Phase};
use deploy_agent_tests::agent::{fast_consul, Harness, ServeWatch};
use deploy_agent_tests::{wait_until_async, DEADLINE};
use testkit::testserver::artifact::{Fault, FaultRule};

/// A bad build `id` served with `fault`, checked through the whole matrix.
async fn artifact_case(id: &str, fault: Fault, needle: &str, digest_fails: bool) {
    let mut h = Harness::live(fast_consul).await;
    let (m, a) = h.build(id);
    h.artifacts
        .set_fault(FaultRule::always(fault).on_path(Harness::url_path(id)));
    let discarded = digest_fails.then_some(a.sha256.as_str());
    let msg = h
        .fault_case(
            &m,
            id,
            discarded,
            needle,
            |h| h.artifacts.clear_faults(),
            "next",
        )
        .await;
    assert!(msg.contains(id), "the error names the build: {msg}");
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body() {
    artifact_case(
        "bad-trunc",
        Fault::Truncate { after: 1000 },
        "bad-trunc",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes() {
    artifact_case("bad-flip", Fault::FlipByte { offset: 700 }, "sha256", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_length() {
    artifact_case(
        "bad-len",
        Fault::WrongLength { extra: 100 },
        "bad-len",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found() {
    artifact_case("bad-404", Fault::NotFound, "404", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_mid_body_past_the_read_timeout() {
    artifact_case(
        "bad-stall",
        Fault::Stall {
            after: 2000,
            duration: Duration::from_secs(30),
        },
        "bad-stall",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_then_recovering() {
    let mut h = Harness::live(fast_consul).await;
    let (m, _) = h.build("flaky");
    // More 503s than one attempt's retries: the first deploy fails, a
    // later retry (with backoff) succeeds without anyone healing anything.
    h.artifacts
        .set_fault(FaultRule::times(Fault::Unavailable, 12).on_path(Harness::url_path("flaky")));
    let watch = ServeWatch::start(&h.root, "good");
    h.publish(&m);
    h.assert_error_visible("503", DEADLINE).await;
    watch.finish();
    h.wait_live("flaky", DEADLINE).await;
    let failed = h
        .status()
        .history
        .iter()
        .filter(|r| r.build == "flaky" && r.outcome == Some(Outcome::Failed))
        .count();
    assert!(failed >= 1, "{:#?}", h.status().history);
    h.assert_no_leftovers(None, None, DEADLINE).await;
    h.assert_next_good_deploys("next", DEADLINE).await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ignoring_range() {
    let mut h = Harness::live(fast_consul).await;
    let (m, _) = h.build("norange");
    h.artifacts
        .set_fault(FaultRule::always(Fault::IgnoreRange).on_path(Harness::url_path("norange")));
    let watch = ServeWatch::start_any(&h.root, &["good", "norange"]);
    h.publish(&m);
    // Not an error: the whole body in one stream works too.
    h.wait_live("norange", DEADLINE).await;
    watch.finish();
    // Ignoring Range AND cutting the body: the restart from zero is bounded.
    let (m, a) = h.build("norange-cut");
    h.artifacts
        .set_fault(FaultRule::always(Fault::IgnoreRange).on_path(Harness::url_path("norange-cut")));
    h.artifacts.set_fault(
        FaultRule::always(Fault::Truncate { after: 1500 })
            .on_path(Harness::url_path("norange-cut")),
    );
    let _ = a;
    h.fault_case(
        &m,
        "norange-cut",
        None,
        "norange-cut",
        |h| h.artifacts.clear_faults(),
        "next",
    )
    .await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn very_slow_trickle_is_visible_and_superseded() {
    let mut h = Harness::live(fast_consul).await;
    let (m, a) = h.build("slow");
    // Slow enough that the download cannot finish within twice the
    // deadline, over every parallel range: at 2,000 B/s it finished in
    // about a second, so a test delayed by a loaded machine saw "slow" go
    // live instead of being superseded (the flaky CI failure).
    let bytes_per_sec = (a.size / (4 * 2 * DEADLINE.as_secs())).max(1);
    h.artifacts.set_fault(
        FaultRule::always(Fault::Trickle { bytes_per_sec }).on_path(Harness::url_path("slow")),
    );
    let watch = ServeWatch::start(&h.root, "good");
    h.publish(&m);
    // Visible: status shows the download and its progress moving.
    wait_until_async("no visible progress", DEADLINE, || async {
        let s = h.status();
        let d = s.deploy.clone().unwrap();
        if d.build == "slow" && d.phase == Phase::Downloading {
            let p = h.agent.as_ref().unwrap().deployer.progress.snapshot();
            if p.bytes_downloaded > 0 {
                assert!(p.bytes_downloaded < a.size, "a trickle is not done yet");
                return Ok(());
            }
        }
        Err(format!("{s:#?}"))
    })
    .await;
    assert!(
        deploy_agent_tests::agent::captured_logs().contains("slow"),
        "the log names the deploy"
    );
    // Bytes keep coming, so no read timeout: the agent waits; a newer
    // manifest cancels the trickle at a safe point.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watch.finish();
    let (next, _) = h.build("next");
    h.publish(&next);
    h.wait_live("next", DEADLINE).await;
    assert!(h
        .status()
        .history
        .iter()
        .any(|r| r.build == "slow" && r.outcome == Some(Outcome::Cancelled)));
    h.assert_no_leftovers(Some("slow"), None, DEADLINE).await;
    h.stop_agent().await;
}
