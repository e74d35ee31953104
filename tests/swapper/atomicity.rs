//! 10,000 flips between two builds while readers in threads and in another
//! process read through `current` the whole time: zero failures allowed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use deploy_agent_tests::children::{self, one_request, READER_FILES as FILES, READER_LEN as LEN};
use deploy_agent_tests::{fast_tempdir, write_build};
use swapper::{BuildInfo, DeployRoot};

const FLIPS: usize = 10_000;

#[test]
fn ten_thousand_flips_under_concurrent_readers() {
    let tmp = fast_tempdir();
    let root_path = tmp.path().join("app");
    let (mut root, _) = DeployRoot::open(&root_path).unwrap();
    for build in ["one", "two"] {
        let (slot, dir) = root.claim_cold().unwrap();
        let (entries, bytes) = write_build(&dir, build, FILES, LEN);
        root.mark_ready(
            slot,
            BuildInfo {
                build_id: build.into(),
                sha256: None,
                entries,
                bytes,
            },
        )
        .unwrap();
        root.flip_to(slot).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..2 {
        let (stop, failures, reads, rp) = (
            stop.clone(),
            failures.clone(),
            reads.clone(),
            root_path.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = one_request(&rp, i) {
                    eprintln!("thread reader failure: {e}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                reads.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let stop_file = tmp.path().join("stop");
    let child = children::command("swapper-reader")
        .arg(&root_path)
        .arg(&stop_file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    let mut worst = std::time::Duration::ZERO;
    let mut flips = 0;
    for _ in 0..FLIPS {
        let to = root.cold();
        let rep = root.flip_to(to).unwrap();
        worst = worst.max(rep.took);
        flips += 1;
    }
    stop.store(true, Ordering::Relaxed);
    std::fs::write(&stop_file, b"").unwrap();
    for t in threads {
        t.join().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child reader failed: {text}");
    assert!(text.contains("failures=0"), "child reader output: {text}");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "thread readers failed");
    assert!(reads.load(Ordering::Relaxed) > 100, "readers barely ran");
    assert_eq!(flips, FLIPS);
    eprintln!(
        "{FLIPS} flips, {} thread reads, {text}, slowest flip {worst:?}",
        reads.load(Ordering::Relaxed)
    );
}
