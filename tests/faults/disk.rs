//! Fault matrix, disk full: on a small tmpfs (needs root; skipped with a
//! message otherwise) the disk fills once before/while downloading (the
//! cache's filesystem) and once while unpacking (the slots' filesystem).
//! The live build keeps serving, the error names the space problem in
//! status and in the log, nothing is left that keeps the disk full, and
//! once space is freed the agent deploys by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::time::Duration;

use deploy_agent::deploy::Phase;
use deploy_agent_tests::agent::{capture_logs, Harness, ServeWatch};
use deploy_agent_tests::disk::{fill, Tmpfs};
use deploy_agent_tests::{needs_root, precondition};
use deploy_agent_tests::{wait_until_async, wait_until_every_async, DEADLINE};
use testkit::testserver::artifact::{Fault, FaultRule};

/// Polls every 5 ms: the test fills the disk while the download runs.
async fn wait_downloading(h: &Harness, build: &str) {
    wait_until_every_async(
        "never downloading",
        DEADLINE,
        Duration::from_millis(5),
        || async {
            let d = h.status().deploy;
            if d.as_ref()
                .is_some_and(|d| d.build == build && d.phase == Phase::Downloading)
                && h.agent
                    .as_ref()
                    .unwrap()
                    .deployer
                    .progress
                    .snapshot()
                    .bytes_downloaded
                    > 0
            {
                Ok(())
            } else {
                Err(format!("{d:?}"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_the_cache_before_and_during_download() {
    if !precondition(needs_root("to mount a small tmpfs")) {
        return;
    }
    capture_logs();
    let mut h = Harness::new(|_| {}).await;
    let cache = h.tmp.path().join("cache");
    h.config.cache_dir = Some(cache.clone());
    let _mount = Tmpfs::mount(&cache, 16);
    h.start_agent().await;
    let (m, _) = h.build("good");
    h.publish(&m);
    h.wait_live("good", DEADLINE).await;

    // Full before the download: the free-space check refuses up front.
    let filler = fill(&cache);
    let (bad, _) = h.build("full1");
    let c = cache.clone();
    let msg = h
        .fault_case(
            &bad,
            "full1",
            None,
            "free space",
            move |_| std::fs::remove_file(c.join("filler")).unwrap(),
            "next1",
        )
        .await;
    assert!(
        msg.contains(&cache.display().to_string()),
        "names the filesystem: {msg}"
    );
    assert!(!filler.exists());

    // Full while downloading: preallocation reserved the artifact's space,
    // so the download either completes or fails visibly; either way the
    // rules hold.
    let (m2, a2) = h.build("full2");
    h.artifacts.set_fault(
        FaultRule::always(Fault::Trickle {
            bytes_per_sec: a2.size / 2,
        })
        .on_path(Harness::url_path("full2")),
    );
    let watch = ServeWatch::start_any(&h.root, &["next1", "full2"]);
    h.publish(&m2);
    wait_downloading(&h, "full2").await;
    let filler = fill(&cache);
    wait_until_async("full2 served or an error in status", DEADLINE, || async {
        let served = h.served();
        if served == "full2" || h.status().last_error.is_some() {
            Ok(())
        } else {
            Err(format!("serving {served:?}, no error in status"))
        }
    })
    .await;
    watch.finish();
    std::fs::remove_file(&filler).unwrap();
    h.artifacts.clear_faults();
    h.wait_live("full2", DEADLINE).await;
    h.assert_no_leftovers(None, None, DEADLINE).await;
    h.assert_next_good_deploys("next2", DEADLINE).await;
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_while_unpacking() {
    if !precondition(needs_root("to mount a small tmpfs")) {
        return;
    }
    capture_logs();
    let mut h = Harness::new(|_| {}).await;
    let _mount = Tmpfs::mount(&h.root, 24);
    h.start_agent().await;
    let (m, _) = h.build("good");
    h.publish(&m);
    h.wait_live("good", DEADLINE).await;

    // The download is slow, the unpack streams behind it; the disk fills
    // after the space check passed and the artifact was preallocated.
    let (bad, a) = h.build("unpackfull");
    h.artifacts.set_fault(
        FaultRule::always(Fault::Trickle {
            bytes_per_sec: a.size / 3,
        })
        .on_path(Harness::url_path("unpackfull")),
    );
    let watch = ServeWatch::start(&h.root, "good");
    h.publish(&bad);
    wait_downloading(&h, "unpackfull").await;
    let filler = fill(&h.root);
    let msg = h.assert_error_visible("space", DEADLINE).await;
    println!("{msg}");
    watch.finish();
    assert_eq!(h.served(), "good");
    // Freeing the space is all the operator does; the retry succeeds.
    std::fs::remove_file(&filler).unwrap();
    h.artifacts.clear_faults();
    h.wait_live("unpackfull", DEADLINE).await;
    h.assert_no_leftovers(None, None, DEADLINE).await;
    h.assert_next_good_deploys("next", DEADLINE).await;
    h.assert_no_leftovers(None, None, DEADLINE).await;
    h.stop_agent().await;
}

/// A tar.gz of `n` files of `mib` MiB of zeros: tiny compressed, so it
/// passes the free-space estimate, and far larger unpacked.
fn zero_bomb(path: &Path, n: usize, mib: usize) -> testkit::buildgen::Artifact {
    use sha2::Digest;
    let f = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    let zeros = vec![0u8; mib << 20];
    for i in 0..n {
        let mut hdr = tar::Header::new_gnu();
        hdr.set_size(zeros.len() as u64);
        hdr.set_mode(0o644);
        hdr.set_cksum();
        tar.append_data(&mut hdr, format!("z{i}"), &zeros[..])
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    let bytes = std::fs::read(path).unwrap();
    testkit::buildgen::Artifact {
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        size: bytes.len() as u64,
        entries: n as u64,
        unpacked_bytes: (n * (mib << 20)) as u64,
    }
}

/// Issue 13, item 1: a build that fills the disk while unpacking leaves
/// its leftovers in the cold slot; the next (small) build must still go
/// live with no operator action, and status must show what the cold slot
/// really holds in the meantime. Before the fix every later build was
/// refused ("need N bytes, 4096 free") until someone deleted files by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_filled_the_disk_does_not_wedge_the_next_one() {
    if !precondition(needs_root("to mount a small tmpfs")) {
        return;
    }
    capture_logs();
    let mut h = Harness::new(|c| {
        // The cache on the same small filesystem as the slots.
        c.cache_dir = None;
    })
    .await;
    let _mount = Tmpfs::mount(&h.root, 50);
    h.start_agent().await;
    let (a, _) = h.build("small-a");
    h.publish(&a);
    h.wait_live("small-a", DEADLINE).await;

    let path = h.tmp.path().join("bomb.tar.gz");
    let art = zero_bomb(&path, 20, 4);
    h.artifacts
        .add("/b/bomb.tar.gz", std::fs::read(&path).unwrap());
    let bomb = testkit::buildgen::manifest_json(
        "bomb",
        &h.artifacts.url("/b/bomb.tar.gz"),
        &art,
        deploy_agent::manifest::Format::TarGz,
    );
    h.publish(&bomb);
    let msg = h.assert_error_visible("space", DEADLINE).await;
    println!("{msg}");
    assert_eq!(h.served(), "small-a");
    // Status says what the cold slot really holds, not "(empty)".
    let sock = h.tmp.path().join("agent.sock");
    // Every 200 ms: each poll runs the CLI.
    wait_until_every_async(
        "cold slot leftovers not shown",
        DEADLINE,
        Duration::from_millis(200),
        || async {
            let v = deploy_agent_tests::process::status_json(&sock).unwrap_or_default();
            if v["cold"]["unmarked_bytes"].as_u64().unwrap_or(0) > 20 << 20 {
                assert!(v["cold"]["build"].is_null(), "{v:#}");
                Ok(())
            } else {
                Err(format!("{v:#}"))
            }
        },
    )
    .await;

    // The next small build goes live by itself.
    let (c, _) = h.build("small-c");
    h.publish(&c);
    h.wait_live("small-c", DEADLINE).await;
    h.assert_no_leftovers(None, None, DEADLINE).await;
    h.stop_agent().await;
}
