//! 10,000 flips between two builds while readers in threads and in another
//! process read through `current` the whole time: zero failures allowed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use deploy_agent_tests::{fast_tempdir, file_content, self_exe, write_build};
use swapper::{BuildInfo, DeployRoot};

const FILES: usize = 8;
const LEN: usize = 16 * 1024;
const FLIPS: usize = 10_000;

/// One read of a "request": pin the build by opening `current` as a
/// directory, then read two files relative to that descriptor. Both must be
/// complete and of the same build.
fn one_request(root: &Path, i: usize) -> Result<(), String> {
    let dir = File::open(root.join("current")).map_err(|e| format!("open current: {e}"))?;
    let build = read_at(&dir, "BUILD")?;
    let build = String::from_utf8(build).map_err(|e| e.to_string())?;
    for k in [i % FILES, (i + 3) % FILES] {
        let got = read_at(&dir, &format!("f{k}"))?;
        if got != file_content(&build, k, LEN) {
            return Err(format!(
                "f{k} is not complete build {build}'s ({} bytes)",
                got.len()
            ));
        }
    }
    // And through the path, the way a naive reader does it: must be one of
    // the two builds, complete.
    let k = i % FILES;
    let got = std::fs::read(root.join("current").join(format!("f{k}")))
        .map_err(|e| format!("read current/f{k}: {e}"))?;
    if got != file_content("one", k, LEN) && got != file_content("two", k, LEN) {
        return Err(format!("current/f{k}: partial or mixed content"));
    }
    Ok(())
}

fn read_at(dir: &File, name: &str) -> Result<Vec<u8>, String> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("openat {name}: {e}"))?;
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    let mut f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .map_err(|e| format!("read {name}: {e}"))?;
    Ok(v)
}

/// Reader mode for the child process: reads until the stop file appears,
/// then prints its counts. A no-op when run as a normal test.
#[test]
fn reader_child() {
    let (Ok(root), Ok(stop)) = (
        std::env::var("SWAPPER_READER_ROOT"),
        std::env::var("SWAPPER_READER_STOP"),
    ) else {
        return;
    };
    let root = PathBuf::from(root);
    let (mut reads, mut failures) = (0u64, 0u64);
    let mut i = 0;
    while !Path::new(&stop).exists() {
        if let Err(e) = one_request(&root, i) {
            failures += 1;
            eprintln!("child reader failure: {e}");
        }
        reads += 1;
        i += 1;
    }
    println!("CHILD reads={reads} failures={failures}");
    assert_eq!(failures, 0);
}

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
    let child = std::process::Command::new(self_exe())
        .args(["--exact", "reader_child", "--nocapture", "--test-threads=1"])
        .env("SWAPPER_READER_ROOT", &root_path)
        .env("SWAPPER_READER_STOP", &stop_file)
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
