//! Fault matrix, Consul: down at start, down mid-watch, 500s, connection
//! resets, stalls longer than the request timeout, the index going
//! backwards (snapshot restore) or the agent's index ahead of a lagging
//! follower, and 403 for the token. Through each: the live build keeps
//! serving, the watch error is in status and in the log, the request rate
//! never exceeds the token bucket (no busy loop), and once Consul heals
//! the next manifest deploys without anyone restarting the agent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;
use tokio::time::Instant;

use deploy_agent::consul::ConsulSettings;
use deploy_agent::pacing::{Backoff, RateLimit};
use deploy_agent_tests::agent::{captured_logs, fast_consul, Harness, ServeWatch, KEY};
use deploy_agent_tests::{wait_until_async, DEADLINE};
use testkit::testserver::consul::Fault;

const BURST: u32 = 2;
const REFILL: Duration = Duration::from_millis(200);

/// Short waits so stalls and timeouts fit in a test, and a bucket slow
/// enough that a busy loop would break it.
fn settings(url: &str) -> ConsulSettings {
    ConsulSettings {
        wait: Duration::from_secs(1),
        timeout_margin: Duration::from_secs(1),
        rate: RateLimit {
            burst: BURST,
            refill_interval: REFILL,
        },
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(300),
        },
        forbidden_retry: Duration::from_millis(300),
        ..fast_consul(url)
    }
}

/// Requests for the key in `[from, to]` never exceed the bucket.
fn assert_rate(h: &Harness, from: Instant, to: Instant) -> usize {
    let n = h
        .consul
        .requests_for(KEY)
        .iter()
        .filter(|r| r.at >= from && r.at <= to)
        .count();
    let window = to - from;
    let allowed = BURST as usize + (window.as_millis() / REFILL.as_millis()) as usize + 1;
    assert!(
        n <= allowed,
        "{n} requests in {window:?}: more than the bucket allows ({allowed})"
    );
    n
}

async fn wait_watch_error(h: &Harness, needle: &str) -> String {
    let what = format!("no watch error containing {needle:?}");
    wait_until_async(&what, DEADLINE, || async {
        match h.watch_error() {
            Some(e) if e.contains(needle) => Ok(e),
            _ => Err(format!(
                "{:?}",
                h.agent.as_ref().unwrap().watch_stats.snapshot()
            )),
        }
    })
    .await
}

async fn assert_logged(needle: &str) {
    let what = format!("log never says {needle:?}");
    wait_until_async(&what, DEADLINE, || async {
        if captured_logs().contains(needle) {
            Ok(())
        } else {
            Err("not in the captured log".to_string())
        }
    })
    .await;
}

/// With `good` live: `fault` for `window`, then heal, then `next` deploys.
async fn consul_case(fault: Fault, window: Duration, needle: &str) {
    let mut h = Harness::live(settings).await;
    let watch = ServeWatch::start(&h.root, "good");
    let t0 = Instant::now();
    h.consul.set_fault(fault);
    // The in-flight blocking query ends within `wait`; then the fault bites.
    let err = wait_watch_error(&h, needle).await;
    assert!(err.contains(needle), "{err}");
    assert_logged(&err).await;
    tokio::time::sleep(window.saturating_sub(t0.elapsed())).await;
    let n = assert_rate(&h, t0, Instant::now());
    println!("{fault:?}: {n} requests in {:?}", t0.elapsed());
    assert!(n >= 1);
    assert_eq!(h.served(), "good");
    watch.finish();
    h.consul.set_fault(Fault::None);
    h.assert_next_good_deploys("next", DEADLINE).await;
    h.assert_no_leftovers(None, None, DEADLINE).await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_500s() {
    consul_case(Fault::Status(500), Duration::from_secs(4), "500").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets() {
    consul_case(Fault::Drop, Duration::from_secs(4), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_longer_than_the_timeout() {
    consul_case(
        Fault::Stall(Duration::from_secs(6)),
        Duration::from_secs(8),
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_token() {
    consul_case(Fault::Status(403), Duration::from_secs(4), "403").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_mid_watch_then_back() {
    let mut h = Harness::live(settings).await;
    let watch = ServeWatch::start(&h.root, "good");
    let t0 = Instant::now();
    h.consul.pause().await;
    let err = wait_watch_error(&h, "").await;
    assert_logged(&err).await;
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(t0.elapsed())).await;
    assert_rate(&h, t0, Instant::now());
    watch.finish();
    h.consul.resume().await.unwrap();
    h.assert_next_good_deploys("next", DEADLINE).await;
    h.assert_no_leftovers(None, None, DEADLINE).await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_at_start() {
    let mut h = Harness::live(settings).await;
    h.stop_agent().await;
    h.consul.pause().await;
    let watch = ServeWatch::start(&h.root, "good");
    let t0 = Instant::now();
    h.start_agent_consul(settings(&h.consul.url())).await;
    let err = wait_watch_error(&h, "").await;
    assert_logged(&err).await;
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(t0.elapsed())).await;
    assert_rate(&h, t0, Instant::now());
    assert!(h.status().last_error.is_none() || h.served() == "good");
    watch.finish();
    h.consul.resume().await.unwrap();
    h.assert_next_good_deploys("next", DEADLINE).await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_going_backwards() {
    let mut h = Harness::live(settings).await;
    let watch = ServeWatch::start(&h.root, "good");
    let t0 = Instant::now();
    // A snapshot restore: the index drops below what the agent holds.
    h.consul.reset_index(1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_rate(&h, t0, Instant::now());
    watch.finish();
    assert_eq!(h.served(), "good");
    h.assert_next_good_deploys("next", DEADLINE).await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_index_ahead_of_a_lagging_follower() {
    let mut h = Harness::live(settings).await;
    // A follower that stopped replicating before `good` was written.
    let stale = h.consul.follower_view();
    let (m, _) = h.build("mid");
    h.publish(&m);
    h.wait_live("mid", DEADLINE).await;
    let watch = ServeWatch::start(&h.root, "mid");
    let t0 = Instant::now();
    h.consul.set_follower(Some(stale));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_rate(&h, t0, Instant::now());
    watch.finish();
    assert_eq!(h.served(), "mid", "a stale follower must not roll back");
    h.consul.set_follower(None);
    h.assert_next_good_deploys("next", DEADLINE).await;
    h.stop_agent().await;
}
