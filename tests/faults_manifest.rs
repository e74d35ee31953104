//! Fault matrix, hostile manifests in Consul: malformed JSON, huge
//! documents and values, an unknown format, URL schemes that are not
//! allowed (`file://` from Consul unless the config allows it), non-hex
//! digests. Each is refused before any download: the live build keeps
//! serving, nothing is written, the refusal is in status and in the log,
//! and the next good manifest deploys.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use deploy_agent_tests::agent::{capture_logs, Harness};

const T: Duration = Duration::from_secs(60);

async fn live_harness() -> Harness {
    capture_logs();
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let (m, _) = h.build("good");
    h.publish(&m);
    h.wait_live("good", T).await;
    h
}

/// Publishes `bad` (derived from a valid manifest of build `id`), expects
/// `needle` in the refusal, and no request to the artifact server.
async fn refused(make: impl FnOnce(&Harness) -> String, needle: &str) -> String {
    let mut h = live_harness().await;
    let bad = make(&h);
    let requests = h.artifacts.stats().requests;
    let msg = h
        .fault_case(&bad, "hostile", None, needle, |_| {}, "next")
        .await;
    assert!(msg.contains(needle), "{msg}");
    let s = h.status();
    assert!(
        s.history.iter().all(|r| r.build != "hostile"),
        "a refused manifest starts no deploy: {:#?}",
        s.history
    );
    assert!(
        h.artifacts.stats().requests > requests,
        "next was downloaded"
    );
    h.stop_agent().await;
    msg
}

/// A valid manifest for build `hostile`, as a JSON object to edit.
fn valid(h: &Harness) -> serde_json::Value {
    let (m, _) = h.build("hostile");
    serde_json::from_str(&m).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json() {
    refused(|h| valid(h).to_string()[..40].to_string(), "not valid JSON").await;
    refused(|_| "[1, 2, 3]".into(), "must be a JSON object").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_document() {
    // Deep nesting: the JSON parser's recursion limit refuses it.
    refused(
        |_| format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        "not valid JSON",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_values() {
    refused(
        |h| {
            let mut v = valid(h);
            v["size"] = serde_json::json!(1e30);
            v.to_string()
        },
        "manifest field `size`",
    )
    .await;
    refused(
        |h| {
            let mut v = valid(h);
            v["build"] = serde_json::Value::String("b".repeat(100_000));
            v.to_string()
        },
        "manifest field `build`",
    )
    .await;
    refused(
        |h| {
            let mut v = valid(h);
            v["url"] = serde_json::json!(vec![v["url"].clone(); 100]);
            v.to_string()
        },
        "more than 16 URLs",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_larger_than_the_disk_is_refused_before_downloading() {
    let mut h = live_harness().await;
    let mut v = valid(&h);
    v["size"] = serde_json::json!(1u64 << 44);
    let msg = h
        .fault_case(&v.to_string(), "hostile", None, "free", |_| {}, "next")
        .await;
    assert!(msg.contains("need "), "names the bytes needed: {msg}");
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_format() {
    refused(
        |h| {
            let mut v = valid(h);
            v["format"] = "zip".into();
            v.to_string()
        },
        "manifest field `format`",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_schemes_not_allowed() {
    for url in [
        "file:///etc/shadow",
        "ftp://example.com/a.tar.gz",
        "gopher://x/",
        "javascript:alert(1)",
    ] {
        refused(
            |h| {
                let mut v = valid(h);
                v["url"] = url.into();
                v.to_string()
            },
            "manifest field `url`",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_urls_allowed_only_by_config() {
    capture_logs();
    let mut h = Harness::new(|c| c.download.allow_file_urls = true).await;
    h.start_agent().await;
    let path = h.tmp.path().join("local.tar.gz");
    let a = deploy_agent::buildgen::write_build(
        deploy_agent::buildgen::BuildProfile::TINY,
        3,
        "local",
        deploy_agent::manifest::Format::TarGz,
        &path,
    )
    .unwrap();
    let m = deploy_agent::buildgen::manifest_json(
        "local",
        &format!("file://{}", path.display()),
        &a,
        deploy_agent::manifest::Format::TarGz,
    );
    h.publish(&m);
    h.wait_live("local", T).await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_hex_digest() {
    refused(
        |h| {
            let mut v = valid(h);
            v["sha256"] = "z".repeat(64).into();
            v.to_string()
        },
        "manifest field `sha256`",
    )
    .await;
    refused(
        |h| {
            let mut v = valid(h);
            v["sha256"] = "../../../../etc/passwd".into();
            v.to_string()
        },
        "manifest field `sha256`",
    )
    .await;
}
