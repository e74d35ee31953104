//! The test server against the behaviours measured by hand on Consul 1.9.0
//! (`tests/data/consul-reference/WAKEUPS.md`): which writes wake a blocking
//! query, listings and deletes, ACL-filtered listings, and the odd corners
//! of parameter parsing. Real HTTP against `testserver::consul`.
//!
//! Blocking queries use `wait=2s` (the server adds up to 1/16 of jitter) and
//! write 300 ms in. "Woke" means well before the wait ended (< 1.5 s), "did
//! not wake" means it ran close to the full wait (>= 1.8 s): both margins
//! are wide enough for a loaded 2-core machine.

// Test code: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use testkit::testserver::consul::{
    AclConfig, AclToken, ConsulServer, ConsulServerConfig, KeyPolicy,
};

const MASTER: &str = "11111111-2222-3333-4444-555555555555";
const APP_READER: &str = "22222222-2222-3333-4444-555555555555";
const OTHER_READER: &str = "33333333-2222-3333-4444-555555555555";

/// Woke before the wait ended.
const WOKE: Duration = Duration::from_millis(1500);
/// Ran (about) the full `wait=2s`.
const FULL_WAIT: Duration = Duration::from_millis(1800);
const WRITE_AFTER: Duration = Duration::from_millis(300);

#[derive(Debug)]
struct Answer {
    status: u16,
    index: Option<u64>,
    content_type: Option<String>,
    body: Vec<u8>,
    elapsed: Duration,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body without the JSON encoder's trailing newline.
    fn trimmed(&self) -> String {
        self.text().trim_end().to_string()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let started = Instant::now();
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let index = header("x-consul-index").map(|v| v.parse().unwrap());
    let content_type = header("content-type");
    let body = resp.bytes().await.unwrap().to_vec();
    Answer {
        status,
        index,
        content_type,
        body,
        elapsed: started.elapsed(),
    }
}

async fn get(server: &ConsulServer, path_and_query: &str) -> Answer {
    send(client().get(format!("{}/v1/kv/{path_and_query}", server.url()))).await
}

/// Blocks on `path_and_query` (which must carry `index=` and `wait=2s`)
/// while `write` runs 300 ms in.
async fn block_while(
    server: &ConsulServer,
    path_and_query: &str,
    write: impl FnOnce(&ConsulServer),
) -> Answer {
    let write = async {
        tokio::time::sleep(WRITE_AFTER).await;
        write(server);
    };
    let (answer, ()) = tokio::join!(get(server, path_and_query), write);
    answer
}

async fn plain() -> ConsulServer {
    ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap()
}

/// The store of the WAKEUPS.md measurement: a fleet's keys next to a
/// freeze flag that is not set.
async fn fleet_store() -> ConsulServer {
    let server = plain().await;
    server.put("a/b/production", b"b1".to_vec());
    server.put("a/b/hosts/h0", b"ok".to_vec());
    server.put("zz/other", b"0".to_vec());
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_wakes_on_a_write_to_a_sibling() {
    let server = fleet_store().await;
    let i = get(&server, "a/b/freeze").await.index.unwrap();
    let a = block_while(&server, &format!("a/b/freeze?index={i}&wait=2s"), |s| {
        s.put("a/b/hosts/h1", b"ok".to_vec());
    })
    .await;
    assert_eq!(a.status, 404);
    assert!(a.elapsed < WOKE, "did not wake: {:?}", a.elapsed);
    assert!(
        a.index.unwrap() > i,
        "a spurious wake-up carries a new index"
    );

    let i = a.index.unwrap();
    let a = block_while(&server, &format!("a/b/freeze?index={i}&wait=2s"), |s| {
        s.put("a/b/production", b"b2".to_vec());
    })
    .await;
    assert_eq!(a.status, 404);
    assert!(a.elapsed < WOKE, "did not wake: {:?}", a.elapsed);
    assert!(a.index.unwrap() > i);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_does_not_wake_on_a_distant_write() {
    let server = fleet_store().await;
    let i = get(&server, "a/b/freeze").await.index.unwrap();
    let a = block_while(&server, &format!("a/b/freeze?index={i}&wait=2s"), |s| {
        s.put("zz/other", b"1".to_vec());
        s.put("zz/more", b"1".to_vec());
        s.delete("zz/more");
    })
    .await;
    assert_eq!(a.status, 404);
    assert!(a.elapsed >= FULL_WAIT, "woke after {:?}", a.elapsed);
    assert_eq!(a.index, Some(i), "a timeout answers the same index");
    // The distant writes did raise the table index: asking again with the
    // old one answers at once.
    let again = get(&server, &format!("a/b/freeze?index={i}&wait=2s")).await;
    assert!(again.elapsed < WOKE && again.index.unwrap() > i);
    // The key itself still wakes it at once.
    let i = again.index.unwrap();
    let a = block_while(&server, &format!("a/b/freeze?index={i}&wait=2s"), |s| {
        s.put("a/b/freeze", b"frozen".to_vec());
    })
    .await;
    assert_eq!(a.status, 200);
    assert!(a.elapsed < WOKE, "did not wake: {:?}", a.elapsed);
}

/// Derived from go-immutable-radix rather than measured: a write that
/// diverges inside the edge leading to the watched node splits that node,
/// which wakes the query although the written key shares only `a/` with
/// it; a delete that leaves a parent with one child merges that child,
/// which wakes a query parked on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_wakes_on_a_split_and_a_merge_of_its_radix_node() {
    let server = plain().await;
    server.put("a/b/x", b"1".to_vec());
    server.put("a/b/y", b"1".to_vec());
    server.put("q/r", b"1".to_vec());
    // Parked on `a/b/` (parent: the root); `a/c` splits it.
    let i = server.index();
    let a = block_while(&server, &format!("a/b/freeze?index={i}&wait=2s"), |s| {
        s.put("a/c", b"1".to_vec());
    })
    .await;
    assert!(a.elapsed < WOKE, "split did not wake: {:?}", a.elapsed);

    // Parked on the leaf `a/b/y` (the search for `a/b/yy` diverges in its
    // label); deleting `a/b/x` leaves `a/b/` with one child and merges it.
    let i = server.index();
    let a = block_while(&server, &format!("a/b/yy?index={i}&wait=2s"), |s| {
        s.delete("a/b/x");
    })
    .await;
    assert!(a.elapsed < WOKE, "merge did not wake: {:?}", a.elapsed);

    // Whereas a write to `q/` touches neither.
    let i = server.index();
    let a = block_while(&server, &format!("a/b/yy?index={i}&wait=2s"), |s| {
        s.put("q/r", b"2".to_vec());
    })
    .await;
    assert!(a.elapsed >= FULL_WAIT, "woke after {:?}", a.elapsed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_key_wakes_only_on_its_own_change() {
    let server = fleet_store().await;
    let i = server.get("a/b/production").unwrap().modify_index;
    let a = block_while(&server, &format!("a/b/production?index={i}&wait=2s"), |s| {
        s.put("a/b/hosts/h1", b"ok".to_vec());
        s.put("a/b/freeze", b"x".to_vec());
    })
    .await;
    assert_eq!(a.status, 200);
    assert!(a.elapsed >= FULL_WAIT, "woke after {:?}", a.elapsed);
    assert_eq!(a.index, Some(i));
}

async fn listing_wakes_on_delete(query: &str) {
    let server = plain().await;
    server.put("p/b", b"2".to_vec());
    server.put("p/a", b"1".to_vec());
    server.put("other", b"x".to_vec());
    let i = get(&server, &format!("p/?{query}")).await.index.unwrap();
    let a = block_while(&server, &format!("p/?{query}&index={i}&wait=2s"), |s| {
        s.delete("p/a");
    })
    .await;
    assert_eq!(a.status, 200, "{query}");
    assert!(a.elapsed < WOKE, "{query}: did not wake: {:?}", a.elapsed);
    let tombstone = a.index.unwrap();
    assert!(tombstone > i, "{query}: the tombstone's index");
    assert!(!a.text().contains("p/a") && a.text().contains("p/b"));
    // The listing's index stays the tombstone's, not the table's.
    server.put("other", b"y".to_vec());
    assert_eq!(
        get(&server, &format!("p/?{query}")).await.index,
        Some(tombstone)
    );
    // Deleting the last key: a 404, still with a higher index.
    let a = block_while(
        &server,
        &format!("p/?{query}&index={tombstone}&wait=2s"),
        |s| {
            s.delete("p/b");
        },
    )
    .await;
    assert_eq!(a.status, 404, "{query}");
    assert!(a.elapsed < WOKE, "{query}: did not wake: {:?}", a.elapsed);
    assert!(a.index.unwrap() > tombstone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurse_listing_wakes_on_delete_under_the_prefix() {
    listing_wakes_on_delete("recurse").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_listing_wakes_on_delete_under_the_prefix() {
    listing_wakes_on_delete("keys").await;
}

#[tokio::test]
async fn delete_with_cas_on_a_missing_key_is_true() {
    let server = plain().await;
    let http = client();
    let a = send(http.delete(format!("{}/v1/kv/nope?cas=5", server.url()))).await;
    assert_eq!((a.status, a.trimmed().as_str()), (200, "true"));
    // A present key with the wrong index is still refused.
    let i = server.put("yes", b"1".to_vec());
    let a = send(http.delete(format!("{}/v1/kv/yes?cas={}", server.url(), i + 1))).await;
    assert_eq!((a.status, a.trimmed().as_str()), (200, "false"));
    assert!(server.get("yes").is_some());
}

#[tokio::test]
async fn acl_listing_returns_only_readable_keys() {
    let server = ConsulServer::start(ConsulServerConfig {
        acl: Some(AclConfig {
            master_token: MASTER.into(),
            tokens: vec![
                AclToken {
                    secret_id: APP_READER.into(),
                    rules: vec![("deploy/app/".into(), KeyPolicy::Read)],
                },
                AclToken {
                    secret_id: OTHER_READER.into(),
                    rules: vec![("elsewhere/".into(), KeyPolicy::Read)],
                },
            ],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    server.put("deploy/app/prod", b"1".to_vec());
    server.put("deploy/app/canary", b"1".to_vec());
    let last = server.put("deploy/other/prod", b"1".to_vec());
    let http = client();
    let list = |q: &str, token: Option<&str>| {
        let mut req = http.get(format!("{}/v1/kv/deploy/?{q}", server.url()));
        if let Some(t) = token {
            req = req.header("X-Consul-Token", t);
        }
        send(req)
    };

    let a = list("recurse", Some(APP_READER)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let keys: Vec<String> = a
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["Key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["deploy/app/canary", "deploy/app/prod"]);
    // The index covers the whole prefix, filtered keys included.
    assert_eq!(a.index, Some(last));

    let a = list("keys", Some(APP_READER)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json(),
        serde_json::json!(["deploy/app/canary", "deploy/app/prod"])
    );
    assert_eq!(a.index, Some(last));

    for (q, token) in [
        ("recurse", None),
        ("keys", None),
        ("recurse", Some(OTHER_READER)),
        ("keys", Some(OTHER_READER)),
    ] {
        let a = list(q, token).await;
        assert_eq!((a.status, a.body.len()), (404, 0), "{q} {token:?}");
        assert_eq!(a.index, Some(last), "{q} {token:?}");
    }
    // The management token sees everything; an unknown token is still 403.
    assert_eq!(
        list("keys", Some(MASTER))
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let a = list("recurse", Some("no-such-token")).await;
    assert_eq!((a.status, a.text().as_str()), (403, "ACL not found"));
}

#[tokio::test]
async fn empty_index_and_wait_are_absent() {
    let server = plain().await;
    server.put("k", b"v".to_vec());
    for q in ["k?index=", "k?index=&wait=2s", "k?wait="] {
        let a = get(&server, q).await;
        assert_eq!(a.status, 200, "{q}: {}", a.text());
        assert!(a.elapsed < Duration::from_secs(1), "{q}: blocked");
    }
}

#[tokio::test]
async fn plus_in_the_key_path_is_a_literal_plus() {
    let server = plain().await;
    let http = client();
    let a = send(
        http.put(format!("{}/v1/kv/plus/a+b", server.url()))
            .body("v"),
    )
    .await;
    assert_eq!(a.trimmed(), "true");
    assert!(server.get("plus/a+b").is_some());
    assert!(server.get("plus/a b").is_none());
    assert_eq!(get(&server, "plus/a%20b").await.status, 404);
    assert_eq!(get(&server, "plus/a+b?raw").await.body, b"v");
}

#[tokio::test]
async fn bad_numbers_are_go_parse_errors() {
    let server = plain().await;
    server.put("k", b"v".to_vec());
    let http = client();
    let url = |q: &str| format!("{}/v1/kv/k?{q}", server.url());
    for (req, bad) in [
        (http.put(url("cas=abc")).body("x"), "abc"),
        (http.put(url("cas=-1")).body("x"), "-1"),
        (http.put(url("flags=abc")).body("x"), "abc"),
        // `%2B` is a `+` (a bare one is a space): Go takes no sign.
        (http.put(url("cas=%2B1")).body("x"), "+1"),
        (http.delete(url("cas=abc")), "abc"),
    ] {
        let a = send(req).await;
        assert_eq!(a.status, 500, "{bad}");
        assert_eq!(
            a.text(),
            format!("strconv.ParseUint: parsing \"{bad}\": invalid syntax")
        );
    }
    assert_eq!(server.get("k").unwrap().value, b"v", "nothing was written");
}

#[tokio::test]
async fn post_is_not_allowed() {
    let server = plain().await;
    let a = send(client().post(format!("{}/v1/kv/k", server.url())).body("v")).await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (405, "method POST not allowed")
    );
    assert!(server.get("k").is_none());
}

#[tokio::test]
async fn raw_content_type_is_sniffed_and_absent_when_empty() {
    let server = plain().await;
    server.put("empty", Vec::new());
    server.put("page", b"<html><body>hi</body></html>".to_vec());
    server.put("text", b"hello".to_vec());
    let a = get(&server, "empty?raw").await;
    assert_eq!((a.status, a.content_type), (200, None));
    assert_eq!(
        get(&server, "page?raw").await.content_type.as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(
        get(&server, "text?raw").await.content_type.as_deref(),
        Some("text/plain; charset=utf-8")
    );
}
