//! Fault matrix, hostile archives at the agent level: path escapes by every
//! route (`..`, absolute paths, through symlinks, through hard links),
//! special files, archives expanding past their limits, and setuid bits.
//! The deploy is refused (setuid bits are stripped instead), nothing is
//! written outside the slot, the hot build keeps serving, the error is in
//! status and in the log, and the next good build deploys. Unit-level
//! coverage of the same refusals is in tests/agent/unpack.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::os::unix::fs::PermissionsExt;

use deploy_agent::unpack::Format;
use deploy_agent_tests::agent::{fast_consul, Harness};
use deploy_agent_tests::archive::{compress, file, raw_entry, symlink, tar_of};
use deploy_agent_tests::DEADLINE;
use sha2::Digest;

/// A tar.gz with a BUILD file naming `id`, then `entries`.
fn archive(id: &str, entries: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let tar = tar_of(|b| {
        file(b, "BUILD", id.as_bytes());
        entries(b);
    });
    compress(&tar, Format::TarGz)
}

/// Serves `bytes` as build `id` and returns its manifest (plus `extra`
/// top-level manifest fields).
fn serve(h: &Harness, id: &str, bytes: Vec<u8>, extra: serde_json::Value) -> String {
    let path = format!("/hostile/{id}.tar.gz");
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let mut m = serde_json::json!({
        "build": id,
        "url": h.artifacts.url(&path),
        "sha256": sha,
        "size": bytes.len(),
        "format": "tar.gz",
    });
    if let serde_json::Value::Object(o) = extra {
        for (k, v) in o {
            m[k] = v;
        }
    }
    h.artifacts.add(&path, bytes);
    m.to_string()
}

/// The archive of build `id` is refused with `needle`, writes nothing
/// outside the slot, and the matrix (a)-(d) holds.
async fn hostile(
    id: &str,
    entries: impl FnOnce(&mut tar::Builder<Vec<u8>>),
    extra: serde_json::Value,
    needle: &str,
) {
    let mut h = Harness::live(fast_consul).await;
    let outside = h.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let m = serve(&h, id, archive(id, entries), extra);
    let msg = h.fault_case(&m, id, None, needle, |_| {}, "next").await;
    println!("{id}: {msg}");
    for p in [
        h.root.join("escape"),
        h.root.join(".deploy/escape"),
        h.tmp.path().join("escape"),
        outside.join("escape"),
        std::path::PathBuf::from(format!("/tmp/escape-{id}")),
    ] {
        assert!(!p.exists(), "{} was written outside the slot", p.display());
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    h.stop_agent().await;
}

fn none() -> serde_json::Value {
    serde_json::json!({})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_dot_escape() {
    hostile("h-dotdot", |b| file(b, "../escape", b"x"), none(), "escape").await;
    hostile(
        "h-dotdot-mid",
        |b| file(b, "a/../../escape", b"x"),
        none(),
        "escape",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_path() {
    hostile(
        "h-abs",
        |b| file(b, "/tmp/escape-h-abs", b"x"),
        none(),
        "escape",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_symlink() {
    hostile(
        "h-symlink-out",
        |b| {
            symlink(b, "link", "../../outside");
            file(b, "link/escape", b"x");
        },
        none(),
        "link",
    )
    .await;
    hostile(
        "h-symlink-abs",
        |b| {
            symlink(b, "l2", "/tmp");
            file(b, "l2/escape-h-symlink-abs", b"x");
        },
        none(),
        "l2",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_hard_link() {
    hostile(
        "h-hardlink",
        |b| raw_entry(b, b"pw", tar::EntryType::Link, b"/etc/passwd", 0o644, b""),
        none(),
        "pw",
    )
    .await;
    hostile(
        "h-hardlink-up",
        |b| {
            raw_entry(
                b,
                b"up",
                tar::EntryType::Link,
                b"../../outside/x",
                0o644,
                b"",
            )
        },
        none(),
        "up",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_files() {
    hostile(
        "h-chardev",
        |b| raw_entry(b, b"dev", tar::EntryType::Char, b"", 0o666, b""),
        none(),
        "dev",
    )
    .await;
    hostile(
        "h-fifo",
        |b| raw_entry(b, b"fifo", tar::EntryType::Fifo, b"", 0o666, b""),
        none(),
        "fifo",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expanding_past_the_limits() {
    hostile(
        "h-bytes",
        |b| file(b, "zeros", &vec![0u8; 4 << 20]),
        serde_json::json!({"max_unpacked_bytes": 1 << 20}),
        "unpacked bytes limit of 1048576",
    )
    .await;
    hostile(
        "h-entries",
        |b| {
            for i in 0..200 {
                file(b, &format!("f{i}"), b"");
            }
        },
        serde_json::json!({"max_entries": 50}),
        "limit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setuid_bits_are_stripped_not_deployed() {
    let mut h = Harness::live(fast_consul).await;
    let m = serve(
        &h,
        "h-suid",
        archive("h-suid", |b| {
            raw_entry(
                b,
                b"suid",
                tar::EntryType::Regular,
                b"",
                0o4755,
                b"#!/bin/sh\n",
            );
            raw_entry(b, b"sgid", tar::EntryType::Regular, b"", 0o2777, b"x");
        }),
        none(),
    );
    h.publish(&m);
    h.wait_live("h-suid", DEADLINE).await;
    for f in ["suid", "sgid"] {
        let mode = std::fs::metadata(h.root.join("current").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o6002, 0, "{f} kept mode {mode:o}");
    }
    h.assert_next_good_deploys("next", DEADLINE).await;
    h.stop_agent().await;
}
