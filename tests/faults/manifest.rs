//! Fault matrix, hostile manifests in Consul: malformed JSON, huge
//! documents and values, an unknown format, URL schemes that are not
//! allowed (`file://` from Consul unless the config allows it), non-hex
//! digests. Each is refused before any download: the live build keeps
//! serving, nothing is written, the refusal is in status and in the log,
//! and the next good manifest deploys.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use deploy_agent_tests::agent::{capture_logs, fast_consul, Harness};
use deploy_agent_tests::{wait_until_async, DEADLINE};

/// Publishes `bad` (derived from a valid manifest of build `id`), expects
/// `needle` in the refusal, and no request to the artifact server.
async fn refused(make: impl FnOnce(&Harness) -> String, needle: &str) -> String {
    let mut h = Harness::live(fast_consul).await;
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
    let mut h = Harness::live(fast_consul).await;
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
    let a = testkit::buildgen::write_build(
        testkit::buildgen::BuildProfile::TINY,
        3,
        "local",
        deploy_agent::manifest::Format::TarGz,
        &path,
    )
    .unwrap();
    let m = testkit::buildgen::manifest_json(
        "local",
        &format!("file://{}", path.display()),
        &a,
        deploy_agent::manifest::Format::TarGz,
    );
    h.publish(&m);
    h.wait_live("local", DEADLINE).await;
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

/// Issue 13, item 3: a manifest file source is read bounded and typed. A
/// FIFO (which blocked the watch, and then SIGTERM, forever), a symlink to
/// `/dev/zero` (which read until memory ran out) and an oversized file are
/// each refused with the reason in status; a good file then deploys, and
/// the agent stops promptly throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_file_is_read_bounded_and_typed() {
    let dir = deploy_agent_tests::fast_tempdir();
    let file = dir.path().join("manifest.json");
    let f2 = file.clone();
    let mut h = Harness::new(move |c| {
        c.source.key = None;
        c.source.file = Some(f2);
    })
    .await;
    let (good, _) = h.build("good");
    std::fs::write(&file, &good).unwrap();
    h.start_agent().await;
    h.wait_live("good", DEADLINE).await;

    let swap = |make: &dyn Fn(&std::path::Path)| {
        let _ = std::fs::remove_file(&file);
        make(&file);
    };
    type Make<'a> = &'a dyn Fn(&std::path::Path);
    let cases: [(&str, Make); 3] = [
        ("not a regular file", &|p| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
        }),
        ("not a regular file", &|p| {
            std::os::unix::fs::symlink("/dev/zero", p).unwrap()
        }),
        ("larger than the 512 KiB", &|p| {
            std::fs::write(p, vec![b' '; 600 * 1024]).unwrap()
        }),
    ];
    for (needle, make) in cases {
        swap(make);
        let what = format!("{needle:?} never in status");
        wait_until_async(&what, DEADLINE, || async {
            let e = h.status().last_error.map(|e| e.message).unwrap_or_default();
            if e.contains(needle) {
                Ok(())
            } else {
                Err(format!("last error: {e}"))
            }
        })
        .await;
        assert_eq!(h.served(), "good");
    }
    // Still responsive: stops within the harness's bound with a FIFO there.
    swap(&|p| nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.stop_agent().await;
    let (next, _) = h.build("next");
    swap(&|p| std::fs::write(p, &next).unwrap());
    h.start_agent().await;
    h.wait_live("next", DEADLINE).await;
    h.stop_agent().await;
}
