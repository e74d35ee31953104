//! The real watch loop (`watch::consul`) and file source (`watch::file`)
//! against the real Consul test server on loopback sockets. Settings are
//! shortened (wait, backoff, token bucket) so the suite stays fast; the
//! rules they check are the same.
//!
//! Nothing persists: every test uses its own server and temp dir.

// Test code: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use deploy_agent::consul::{ConsulClient, ConsulSettings, QueryOptions};
use deploy_agent::pacing::{Backoff, RateLimit};
use deploy_agent::source::consul::{next_index, watch_key, WatchEvent, WatchStats};
use deploy_agent_tests::DEADLINE;
use testkit::testserver::consul::{
    AclConfig, AclToken, ConsulServer, ConsulServerConfig, Fault, KeyPolicy,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
// The agent re-exports the token type it takes, so tests need no
// tokio-util dependency of their own.
use tokio_util::sync::CancellationToken;

const KEY: &str = "deploy/web/prod";
const REFILL: Duration = Duration::from_millis(100);
const BURST: u32 = 2;

fn fast(url: String) -> ConsulSettings {
    ConsulSettings {
        address: url,
        wait: Duration::from_secs(2),
        max_stale: Duration::from_secs(1),
        rate: RateLimit {
            burst: BURST,
            refill_interval: REFILL,
        },
        backoff: Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(20),
        },
        timeout_margin: Duration::from_millis(300),
        first_request_splay: Duration::from_millis(10),
        forbidden_retry: Duration::from_millis(200),
        ..ConsulSettings::default()
    }
}

struct Watch {
    rx: mpsc::Receiver<WatchEvent>,
    stats: Arc<WatchStats>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Watch {
    fn start(settings: &ConsulSettings, key: &str) -> Watch {
        let client = ConsulClient::new(settings).unwrap();
        let (tx, rx) = mpsc::channel(16);
        let stats = Arc::new(WatchStats::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch_key(
            client,
            key.to_string(),
            tx,
            stats.clone(),
            shutdown.clone(),
        ));
        Watch {
            rx,
            stats,
            shutdown,
            task,
        }
    }

    /// The next event, within the shared deadline: how soon it came is
    /// not asserted here; the pacing counters say whether it waited.
    async fn next(&mut self) -> WatchEvent {
        tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no event within {DEADLINE:?}"))
            .expect("watch ended")
    }

    /// The pacing waits so far: (token bucket, WAKE_GAP).
    fn waits(&self) -> (u64, u64) {
        let s = self.stats.snapshot();
        (s.token_waits, s.gap_waits)
    }

    async fn quiet(&mut self, for_: Duration) {
        if let Ok(ev) = tokio::time::timeout(for_, self.rx.recv()).await {
            panic!("unexpected event {ev:?}");
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .expect("watch did not stop on shutdown")
            .unwrap();
    }
}

fn same_value(ev: &WatchEvent, v: &[u8]) -> bool {
    matches!(ev, WatchEvent::Value { value, .. } if value == v)
}

/// Waits until the server holds a blocking query for `key`.
/// The `index` a recorded request asked with (0 without one).
fn index_of(r: &testkit::testserver::consul::RequestRecord) -> u64 {
    r.query
        .split('&')
        .find_map(|kv| kv.strip_prefix("index="))
        .map_or(0, |i| i.parse().unwrap())
}

async fn until_blocking(server: &ConsulServer, key: &str) {
    for _ in 0..200 {
        if server
            .requests_for(key)
            .last()
            .is_some_and(|r| r.query.contains("index="))
        {
            // Give it a moment to get past parsing into the wait.
            tokio::time::sleep(Duration::from_millis(30)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the watch never issued a blocking query");
}

#[tokio::test]
async fn first_value_then_change_delivered_promptly() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let mi = {
        server.put(KEY, b"v1".to_vec());
        server.get(KEY).unwrap().modify_index
    };
    let mut w = Watch::start(&fast(server.url()), KEY);
    match w.next().await {
        WatchEvent::Value {
            value,
            modify_index,
        } => {
            assert_eq!(value, b"v1");
            assert_eq!(modify_index, mi);
        }
        other => panic!("{other:?}"),
    }
    until_blocking(&server, KEY).await;
    let waits = w.waits();
    server.put(KEY, b"v2".to_vec());
    let ev = w.next().await;
    assert!(same_value(&ev, b"v2"), "{ev:?}");
    // Promptly: the blocking query in flight answered it; nothing paced it.
    assert_eq!(w.waits(), waits, "the change waited for pacing");
    // Every watch request is ?stale, blocking after the first, never
    // ?consistent, never a token in the URL.
    let reqs = server.requests_for(KEY);
    assert!(
        !reqs[0].query.contains("index="),
        "first request without index"
    );
    for r in &reqs {
        assert!(r.query.contains("stale"), "{}", r.query);
        assert!(!r.query.contains("consistent") && !r.query.contains("token="));
    }
    assert!(reqs[1..].iter().all(|r| r.query.contains("wait=2000ms")));
    let snap = w.stats.snapshot();
    assert_eq!(snap.events_sent, 2);
    assert_eq!(snap.key, KEY);
    w.stop().await;
}

#[tokio::test]
async fn spurious_wakeups_on_a_missing_key_emit_missing_once() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let mut w = Watch::start(&fast(server.url()), KEY);
    assert_eq!(w.next().await, WatchEvent::Missing);
    until_blocking(&server, KEY).await;
    let before = server.requests_for(KEY).len();
    let gaps = w.waits().1;
    for i in 0..5 {
        server.put("deploy/web/other", format!("x{i}").into_bytes());
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    w.quiet(Duration::from_millis(300)).await;
    // The server did wake the query (404 with a new index), and the watch
    // asked again, paced by WAKE_GAP rather than once per write: every
    // request after a wake-up waited the gap first (the last one may be
    // in its wait still).
    let asked = server.requests_for(KEY).len() - before;
    let gapped = (w.waits().1 - gaps) as usize;
    assert!(asked >= 1, "the server never woke the query");
    assert!(
        asked <= gapped + 1,
        "{asked} requests for 5 wake-ups, only {gapped} paced by WAKE_GAP"
    );
    // ...yet nothing reached the consumer. Creating the key does.
    server.put(KEY, b"v1".to_vec());
    assert!(same_value(&w.next().await, b"v1"));
    w.stop().await;
}

/// Test settings with the shipped token bucket (burst 2, then one request
/// per 15 s).
fn shipped_rates(url: String) -> ConsulSettings {
    ConsulSettings {
        rate: RateLimit::default(),
        ..fast(url)
    }
}

/// With the shipped pacing (burst 2, then one request per 15 s), a stream
/// of wake-ups caused by other keys' writes must not leave the watch asleep
/// when its own key is finally written: the real change is seen within one
/// WAKE_GAP, not after a bucket refill.
#[tokio::test]
async fn wakeups_by_other_writes_do_not_starve_the_watch_with_shipped_rates() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let settings = shipped_rates(server.url());
    let mut w = Watch::start(&settings, KEY);
    assert_eq!(w.next().await, WatchEvent::Missing);
    until_blocking(&server, KEY).await;
    let before = server.requests_for(KEY).len();
    let (tokens, gaps) = w.waits();
    for i in 0..20 {
        server.put("deploy/web/other", format!("x{i}").into_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every wake-up after the first is paced by WAKE_GAP.
    let asked = server.requests_for(KEY).len() - before;
    let gapped = (w.waits().1 - gaps) as usize;
    assert!(
        asked <= gapped + 1,
        "{asked} requests for 20 wake-ups, only {gapped} paced by WAKE_GAP"
    );
    server.put(KEY, b"frozen".to_vec());
    let ev = w.next().await;
    assert!(same_value(&ev, b"frozen"), "{ev:?}");
    // A drained bucket would have made the change wait for the 15 s
    // refill: no request of the storm or the change waited for a token.
    assert_eq!(
        w.waits().0,
        tokens,
        "the wake-ups drained the bucket: a request waited for a token"
    );
    w.stop().await;
}

/// A real change is not a spurious wake-up: after one, the next query goes
/// at once, so a second change right behind it (a rollback just after a
/// publish) is seen at once, not a `WAKE_GAP` later. With the shipped rates.
#[tokio::test]
async fn a_change_right_after_a_change_is_seen_at_once() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let settings = shipped_rates(server.url());
    server.put(KEY, b"v0".to_vec());
    let mut w = Watch::start(&settings, KEY);
    assert!(same_value(&w.next().await, b"v0"));
    until_blocking(&server, KEY).await;
    for v in [&b"v1"[..], b"v2", b"v3"] {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waits = w.waits();
        server.put(KEY, v.to_vec());
        assert!(same_value(&w.next().await, v));
        // Paced like a spurious wake-up it would have waited WAKE_GAP.
        assert_eq!(
            w.waits(),
            waits,
            "{:?} waited for pacing",
            String::from_utf8_lossy(v)
        );
    }
    w.stop().await;
}

/// After an outage has spent the bucket (shipped rates: burst 2, then one
/// request per 15 s), the first read that succeeds waits for a token; the
/// blocking query after it must not wait for another one. Before, a change
/// written right after the outage's first successful read was seen about
/// 15 s late (intent_random seed 3916252348112903514: a promote after a
/// Consul outage reached a host 15 s after it was written).
#[tokio::test]
async fn a_change_right_after_an_outage_is_seen_at_once() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    server.put(KEY, b"v0".to_vec());
    server.set_fault(Fault::Status(500));
    let mut w = Watch::start(&shipped_rates(server.url()), KEY);
    // Two failed requests spend the burst.
    for _ in 0..500 {
        if server.requests_for(KEY).len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(server.requests_for(KEY).len() >= 2, "the watch never asked");
    server.set_fault(Fault::None);
    // The first good read waits for the refill.
    assert!(same_value(&w.next().await, b"v0"));
    until_blocking(&server, KEY).await;
    let waits = w.waits();
    server.put(KEY, b"v1".to_vec());
    assert!(same_value(&w.next().await, b"v1"));
    // The blocking query after the first good read went without waiting
    // for another token, so v1 was not held back by the refill.
    assert_eq!(w.waits(), waits, "v1 waited for pacing after the outage");
    w.stop().await;
}

#[tokio::test]
async fn delete_emits_missing_once_and_keeps_blocking() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    server.put(KEY, b"v1".to_vec());
    let mut w = Watch::start(&fast(server.url()), KEY);
    assert!(same_value(&w.next().await, b"v1"));
    until_blocking(&server, KEY).await;
    server.delete(KEY);
    assert_eq!(w.next().await, WatchEvent::Missing);
    until_blocking(&server, KEY).await;
    let before = server.requests_for(KEY).len();
    w.quiet(Duration::from_millis(800)).await;
    // Blocking, not polling: at most the one in flight returned.
    assert!(server.requests_for(KEY).len() <= before + 1);
    // The same value coming back is a change after Missing.
    server.put(KEY, b"v1".to_vec());
    assert!(same_value(&w.next().await, b"v1"));
    w.stop().await;
}

#[tokio::test]
async fn index_going_backwards_is_recovered_at_once() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    for i in 0..5 {
        server.put("deploy/web/other", format!("x{i}").into_bytes());
    }
    server.put(KEY, b"v1".to_vec());
    let mut w = Watch::start(&fast(server.url()), KEY);
    assert!(same_value(&w.next().await, b"v1"));
    until_blocking(&server, KEY).await;
    // A snapshot restore: every index drops to 2.
    server.reset_index(2);
    // Same value, lower ModifyIndex: confirmed by a default-mode re-read,
    // not handed over again.
    w.quiet(Duration::from_millis(300)).await;
    // The loop did not stay blocked on its old, now-ahead index: it is
    // blocking on one the server has reached.
    until_blocking(&server, KEY).await;
    let asked = index_of(server.requests_for(KEY).last().unwrap());
    assert!(
        asked <= server.index(),
        "blocking on index {asked}, ahead of the server's {}",
        server.index()
    );
    server.put(KEY, b"v2".to_vec());
    assert!(same_value(&w.next().await, b"v2"));
    assert!(w.stats.snapshot().rereads >= 1);
    w.stop().await;
}

#[tokio::test]
async fn index_ahead_of_the_server_returns_lower_index_after_wait() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    server.put(KEY, b"v1".to_vec());
    let client = ConsulClient::new(&fast(server.url())).unwrap();
    let ahead = 99_999_999;
    let t0 = Instant::now();
    let read = client
        .get(
            KEY,
            &QueryOptions {
                index: ahead,
                wait: Some(Duration::from_millis(300)),
                stale: false,
                consistent: false,
            },
        )
        .await
        .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(read.index, server.index());
    assert_eq!(next_index(ahead, read.index), 0, "reset instead of looping");
}

/// Requests the token bucket allows in `period`: the burst, one per refill
/// interval, and one in flight at each end.
fn allowed_in(period: Duration) -> usize {
    BURST as usize + (period.as_millis() / REFILL.as_millis()) as usize + 2
}

/// Runs `fault` for `period` while the watch is on, then clears it, and
/// checks the token bucket held and the watch recovered by itself.
async fn survives(
    fault: Fault,
    period: Duration,
    min_requests: usize,
) -> deploy_agent::source::consul::WatchStatsSnapshot {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    server.put(KEY, b"v1".to_vec());
    let mut w = Watch::start(&fast(server.url()), KEY);
    assert!(same_value(&w.next().await, b"v1"));
    until_blocking(&server, KEY).await;
    server.set_fault(fault);
    let before = server.request_count();
    // Wake the blocked query so the next ones meet the fault.
    server.put(KEY, b"v2".to_vec());
    assert!(same_value(&w.next().await, b"v2"));
    let started = Instant::now();
    tokio::time::sleep(period).await;
    let during = server.request_count() - before;
    server.set_fault(Fault::None);
    // Burst, one per refill interval, and one in flight at each end, over
    // the time that really passed (a loaded machine oversleeps).
    let allowed = allowed_in(started.elapsed());
    assert!(
        during <= allowed,
        "{fault:?}: {during} requests in {period:?}, the bucket allows {allowed}"
    );
    assert!(
        during >= min_requests,
        "{fault:?}: the loop gave up retrying ({during})"
    );
    // Recovers by itself: a new value arrives once the fault is gone.
    server.put(KEY, b"v3".to_vec());
    let ev = w.next().await;
    assert!(same_value(&ev, b"v3"), "{fault:?}: {ev:?}");
    let snap = w.stats.snapshot();
    assert_eq!(snap.consecutive_errors, 0);
    assert!(snap.last_error.is_some());
    w.stop().await;
    snap
}

#[tokio::test]
async fn recovers_from_500s_within_the_token_bucket() {
    let snap = survives(Fault::Status(500), Duration::from_secs(1), 3).await;
    assert!(snap.errors.http_5xx >= 3, "{snap:?}");
}

#[tokio::test]
async fn recovers_from_503s_within_the_token_bucket() {
    let snap = survives(Fault::Status(503), Duration::from_secs(1), 3).await;
    assert!(snap.errors.http_5xx >= 3, "{snap:?}");
}

#[tokio::test]
async fn recovers_from_429s_within_the_token_bucket() {
    let snap = survives(Fault::Status(429), Duration::from_secs(1), 3).await;
    assert!(snap.errors.http_429 >= 3, "{snap:?}");
}

#[tokio::test]
async fn recovers_from_dropped_connections_within_the_token_bucket() {
    let snap = survives(Fault::Drop, Duration::from_secs(1), 3).await;
    assert!(snap.errors.connect >= 3, "{snap:?}");
}

#[tokio::test]
async fn recovers_from_stalls_longer_than_the_timeout() {
    // The stall (3 s) is longer than any request's timeout: the blocking
    // one gives up after 2 s * 17/16 + 300 ms, then the non-blocking
    // retries after the 300 ms margin each.
    let snap = survives(
        Fault::Stall(Duration::from_secs(3)),
        Duration::from_millis(3500),
        3,
    )
    .await;
    assert!(snap.errors.timeout >= 2, "{snap:?}");
}

#[tokio::test]
async fn recovers_when_the_agent_goes_down_and_comes_back() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    server.put(KEY, b"v1".to_vec());
    let mut w = Watch::start(&fast(server.url()), KEY);
    assert!(same_value(&w.next().await, b"v1"));
    until_blocking(&server, KEY).await;
    let before = w.stats.snapshot().requests_total;
    let started = Instant::now();
    server.pause().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = (w.stats.snapshot().requests_total - before) as usize;
    let allowed = allowed_in(started.elapsed());
    assert!(
        during <= allowed,
        "{during} requests while down, allowed {allowed}"
    );
    assert!(w.stats.snapshot().errors.connect >= 1);
    server.put(KEY, b"v2".to_vec());
    server.resume().await.unwrap();
    assert!(same_value(&w.next().await, b"v2"));
    w.stop().await;
}

fn acl_server_config(token: &str) -> ConsulServerConfig {
    ConsulServerConfig {
        acl: Some(AclConfig {
            master_token: "master".into(),
            tokens: vec![AclToken {
                secret_id: token.into(),
                rules: vec![("deploy/web/".into(), KeyPolicy::Read)],
            }],
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn token_goes_in_the_header_and_read_only_suffices() {
    let server = ConsulServer::start(acl_server_config("reader"))
        .await
        .unwrap();
    server.put(KEY, b"v1".to_vec());
    let settings = ConsulSettings {
        token: Some("reader".into()),
        ..fast(server.url())
    };
    let mut w = Watch::start(&settings, KEY);
    assert!(same_value(&w.next().await, b"v1"));
    let reqs = server.requests_for(KEY);
    assert!(reqs
        .iter()
        .all(|r| r.header_token.as_deref() == Some("reader") && !r.query.contains("token")));
    // The same token cannot write: Consul's 403 comes back as an error.
    let client = ConsulClient::new(&settings).unwrap();
    let err = client.put(KEY, b"x", None).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    w.stop().await;
}

#[tokio::test]
async fn forbidden_is_reported_and_retried_slowly() {
    let server = ConsulServer::start(acl_server_config("reader"))
        .await
        .unwrap();
    server.put(KEY, b"v1".to_vec());
    for token in [None, Some("unknown-token")] {
        let settings = ConsulSettings {
            token: token.map(str::to_string),
            ..fast(server.url())
        };
        let before = server.request_count();
        let mut w = Watch::start(&settings, KEY);
        w.quiet(Duration::from_millis(700)).await;
        let snap = w.stats.snapshot();
        assert!(snap.errors.forbidden >= 1, "{snap:?}");
        let msg = snap.last_error.unwrap();
        assert!(msg.contains("key:read on deploy/web/prod"), "{msg}");
        let expected = if token.is_some() {
            "ACL not found"
        } else {
            "Permission denied"
        };
        assert!(msg.contains(expected), "{msg}");
        // forbidden_retry is 200 ms (jittered to 100-200 ms): no hammering.
        assert!(server.request_count() - before <= 9);
        w.stop().await;
    }
}

#[tokio::test]
async fn stale_read_beyond_the_bound_is_reread_in_default_mode() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    server.put(KEY, b"v1".to_vec());
    // A stale follower with the old value, far behind the leader.
    server.set_follower(Some(server.follower_view()));
    server.set_last_contact(Duration::from_secs(5));
    server.put(KEY, b"v2".to_vec());
    let mut w = Watch::start(&fast(server.url()), KEY);
    // The stale answer (v1, LastContact 5 s > 1 s) was not handed over.
    assert!(same_value(&w.next().await, b"v2"));
    let reqs = server.requests_for(KEY);
    assert!(reqs[0].query.contains("stale"));
    assert!(!reqs[1].query.contains("stale"), "{}", reqs[1].query);
    assert!(w.stats.snapshot().rereads >= 1);
    assert_eq!(w.stats.snapshot().last_contact_ms, 0);
    w.stop().await;
}

#[tokio::test]
async fn older_modify_index_is_confirmed_before_it_is_handed_over() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    server.put(KEY, b"v1".to_vec());
    let old = server.follower_view();
    server.put(KEY, b"v2".to_vec());
    let settings = ConsulSettings {
        wait: Duration::from_millis(300),
        ..fast(server.url())
    };
    let mut w = Watch::start(&settings, KEY);
    assert!(same_value(&w.next().await, b"v2"));
    // Now stale reads hit a follower that still has v1 (lower ModifyIndex),
    // within the staleness bound: only rule 12 protects us.
    server.set_follower(Some(old));
    w.quiet(Duration::from_millis(1200)).await;
    let snap = w.stats.snapshot();
    assert!(snap.rereads >= 1, "{snap:?}");
    assert_eq!(snap.events_sent, 1);
    // A real change still gets through.
    server.set_follower(None);
    server.put(KEY, b"v3".to_vec());
    assert!(same_value(&w.next().await, b"v3"));
    w.stop().await;
}

#[tokio::test]
async fn client_reads_writes_and_lists() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let c = ConsulClient::new(&fast(server.url())).unwrap();
    let r = c.get(KEY, &QueryOptions::default()).await.unwrap();
    assert!(r.pair.is_none());
    assert_eq!(r.index, server.index());
    assert!(c.put(KEY, br#"{"build":"b1"}"#, Some(0)).await.unwrap());
    assert!(
        !c.put(KEY, b"other", Some(0)).await.unwrap(),
        "cas=0 only creates"
    );
    let r = c.get(KEY, &QueryOptions::default()).await.unwrap();
    let p = r.pair.unwrap();
    assert_eq!(p.value, br#"{"build":"b1"}"#);
    assert!(r.known_leader);
    assert!(!c.put(KEY, b"b2", Some(p.modify_index + 7)).await.unwrap());
    assert!(c.put(KEY, b"b2", Some(p.modify_index)).await.unwrap());
    c.put("deploy/web/other", b"x", None).await.unwrap();
    let list = c.list("deploy/").await.unwrap();
    assert_eq!(
        list.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(),
        ["deploy/web/other", KEY]
    );
    assert!(c.delete(KEY).await.unwrap());
    assert!(c
        .get(KEY, &QueryOptions::default())
        .await
        .unwrap()
        .pair
        .is_none());
    assert!(c.list("nothing/").await.unwrap().is_empty());
    // Limits are enforced before anything is sent.
    let before = server.request_count();
    assert!(c.put(KEY, &vec![0u8; 512 * 1024 + 1], None).await.is_err());
    assert!(c
        .get("/etc/passwd", &QueryOptions::default())
        .await
        .is_err());
    assert!(c.get("a/../b", &QueryOptions::default()).await.is_err());
    assert_eq!(server.request_count(), before);
    // A wrong datacenter is an error naming the URL.
    let c2 = ConsulClient::new(&ConsulSettings {
        datacenter: Some("dc9".into()),
        ..fast(server.url())
    })
    .unwrap();
    let err = c2.get(KEY, &QueryOptions::default()).await.unwrap_err();
    assert!(err.to_string().contains("dc=dc9"), "{err}");
}

mod file {
    use super::*;
    use deploy_agent::source::file::watch_file;

    async fn next(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .expect("no file event within 3 s")
            .expect("file watch ended")
    }

    fn write_atomically(path: &std::path::Path, content: &[u8]) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[tokio::test]
    async fn initial_change_by_rename_dedupe_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.json");
        std::fs::write(&path, b"b1").unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch_file(path.clone(), tx, shutdown.clone()));
        assert_eq!(
            next(&mut rx).await,
            WatchEvent::Value {
                value: b"b1".to_vec(),
                modify_index: 1
            }
        );
        // Let the watcher settle before changing the file.
        tokio::time::sleep(Duration::from_millis(100)).await;
        write_atomically(&path, b"b2");
        assert_eq!(
            next(&mut rx).await,
            WatchEvent::Value {
                value: b"b2".to_vec(),
                modify_index: 2
            }
        );
        // Same content again, in several writes: nothing.
        write_atomically(&path, b"b2");
        std::fs::write(&path, b"b2").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(400), rx.recv())
                .await
                .is_err(),
            "identical content must not produce an event"
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(next(&mut rx).await, WatchEvent::Missing);
        std::fs::write(&path, b"b3").unwrap();
        assert!(same_value(&next(&mut rx).await, b"b3"));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn unwatchable_directory_falls_back_to_polling() {
        let dir = tempfile::tempdir().unwrap();
        // The parent does not exist yet: notify cannot watch it.
        let path = dir.path().join("later").join("desired.json");
        let (tx, mut rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch_file(path.clone(), tx, shutdown.clone()));
        assert_eq!(next(&mut rx).await, WatchEvent::Missing);
        std::fs::create_dir(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"b1").unwrap();
        assert!(same_value(&next(&mut rx).await, b"b1"));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn missing_file_first_then_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.json");
        let (tx, mut rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let _task = tokio::spawn(watch_file(path.clone(), tx, shutdown.clone()));
        assert_eq!(next(&mut rx).await, WatchEvent::Missing);
        tokio::time::sleep(Duration::from_millis(100)).await;
        write_atomically(&path, b"b1");
        assert!(same_value(&next(&mut rx).await, b"b1"));
        shutdown.cancel();
    }
}

#[tokio::test]
async fn test_server_fault_switches_and_handle() {
    let server = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("{}/v1/kv/{KEY}", server.url());
    let status = |r: reqwest::Result<reqwest::Response>| r.map(|r| r.status().as_u16()).ok();

    // The next N requests only.
    server.set_fault_for(Fault::Status(503), 2);
    assert_eq!(status(http.get(&url).send().await), Some(503));
    assert_eq!(status(http.get(&url).send().await), Some(503));
    assert_eq!(status(http.get(&url).send().await), Some(404));
    // Until cleared.
    server.set_fault(Fault::Status(429));
    for _ in 0..3 {
        assert_eq!(status(http.get(&url).send().await), Some(429));
    }
    server.set_fault(Fault::None);
    // Dropped without an answer.
    server.set_fault_for(Fault::Drop, 1);
    assert_eq!(status(http.get(&url).send().await), None);
    // Stalled, then answered.
    server.set_fault_for(Fault::Stall(Duration::from_millis(400)), 1);
    let t0 = Instant::now();
    assert_eq!(status(http.get(&url).send().await), Some(404));
    assert!(t0.elapsed() >= Duration::from_millis(400));
    // Down, then back on the same port.
    let addr = server.addr();
    server.pause().await;
    assert_eq!(status(http.get(&url).send().await), None);
    server.resume().await.unwrap();
    assert_eq!(server.addr(), addr);
    assert_eq!(status(http.get(&url).send().await), Some(404));

    // The handle: identical writes keep the index (rule 18).
    let i1 = server.put(KEY, b"a".to_vec());
    assert_eq!(server.put(KEY, b"a".to_vec()), i1);
    assert_eq!(server.get(KEY).unwrap().modify_index, i1);
    let i2 = server.put(KEY, b"b".to_vec());
    assert!(i2 > i1);
    // A snapshot restore lowers every index.
    server.reset_index(1);
    assert_eq!(server.index(), 1);
    assert_eq!(server.get(KEY).unwrap().modify_index, 1);
    // ?keys with a separator folds sub-folders, like Consul.
    server.put("deploy/web/a/x", b"x".to_vec());
    let body = http
        .get(format!(
            "{}/v1/kv/deploy/web/?keys&separator=/",
            server.url()
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let keys: Vec<String> = serde_json::from_slice(&body).unwrap();
    assert_eq!(keys, ["deploy/web/a/", KEY]);
    // Every request is in the log, in order (the refused one excepted).
    let log = server.requests();
    assert_eq!(log.len(), 10);
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
    server.delete(KEY);
    assert!(server.get(KEY).is_none());
}

#[tokio::test]
async fn test_server_acl_accepts_query_token_and_prefix_rules() {
    let server = ConsulServer::start(ConsulServerConfig {
        acl: Some(AclConfig {
            master_token: "master".into(),
            tokens: vec![AclToken {
                secret_id: "writer".into(),
                rules: vec![
                    ("deploy/".into(), KeyPolicy::Read),
                    ("deploy/web/".into(), KeyPolicy::Write),
                    ("deploy/web/secret".into(), KeyPolicy::Deny),
                ],
            }],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let put = |key: &str, token: &str| {
        http.put(format!("{}/v1/kv/{key}?token={token}", server.url()))
            .body("v")
            .send()
    };
    let code = |r: reqwest::Result<reqwest::Response>| r.unwrap().status().as_u16();
    assert_eq!(code(put("deploy/web/prod", "writer").await), 200);
    assert_eq!(code(put("deploy/db/prod", "writer").await), 403);
    assert_eq!(code(put("deploy/web/secret", "writer").await), 403);
    assert_eq!(code(put("elsewhere", "master").await), 200);
    let r = http
        .put(format!("{}/v1/kv/x?token=nope", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(r.text().await.unwrap(), "ACL not found");
}
