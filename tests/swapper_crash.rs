//! Crash safety: a child process runs claim -> write -> mark -> flip in a
//! loop and is SIGKILLed at every step boundary and at random points. After
//! every kill, recovery must yield a root whose `current` resolves to a
//! complete, marked build and whose state file agrees.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use deploy_agent_tests::{check_build, fast_tempdir, self_exe, write_build};
use rand::Rng;
use swapper::{BuildInfo, DeployRoot};

const FILES: usize = 40;
const LEN: usize = 2048;
const STEPS: [&str; 6] = [
    "after-open",
    "after-claim",
    "mid-write",
    "after-write",
    "after-mark",
    "after-flip",
];

fn die_if(step: &str) {
    if std::env::var("CRASH_AT").as_deref() == Ok(step) {
        // SIGKILL: no destructors, no flush, exactly like the OOM killer.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Child mode: deploys builds in a loop, dying where CRASH_AT says (or
/// wherever the parent kills it). A no-op as a normal test.
#[test]
fn deployer_child() {
    let Ok(root) = std::env::var("CRASH_ROOT") else {
        return;
    };
    let start: u64 = std::env::var("CRASH_SEQ")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut dr, _) = DeployRoot::open(&root).unwrap();
    die_if("after-open");
    for n in start.. {
        let build = format!("b{n}");
        let (slot, dir) = dr.claim_cold().unwrap();
        die_if("after-claim");
        let (entries, bytes) = write_build_dying(&dir, &build);
        die_if("after-write");
        dr.mark_ready(
            slot,
            BuildInfo {
                build_id: build,
                sha256: None,
                entries,
                bytes,
            },
        )
        .unwrap();
        die_if("after-mark");
        dr.flip_to(slot).unwrap();
        die_if("after-flip");
    }
}

fn write_build_dying(dir: &Path, build: &str) -> (u64, u64) {
    // Write half, maybe die, then write everything (rewriting is harmless).
    write_build(dir, build, FILES / 2, LEN);
    die_if("mid-write");
    write_build(dir, build, FILES, LEN)
}

fn check_root(root: &Path) -> String {
    let (dr, report) = DeployRoot::open(root).unwrap();
    let served = dr.served().unwrap();
    assert_eq!(
        served,
        dr.hot(),
        "state disagrees with current ({report:?})"
    );
    let Some(slot) = served else {
        return String::new();
    };
    let marker = dr
        .marker(slot)
        .unwrap_or_else(|| panic!("current points at unmarked {slot} ({report:?})"));
    let build = check_build(&dr.current_path(), FILES, LEN)
        .unwrap_or_else(|e| panic!("current is not a complete build: {e} ({report:?})"));
    assert_eq!(build, marker.build.build_id, "marker names another build");
    // The state file on disk agrees too.
    let state: swapper::State =
        serde_json::from_slice(&std::fs::read(dr.meta_dir().join("state.json")).unwrap()).unwrap();
    assert_eq!(state.hot, Some(slot));
    // No temp names survive recovery.
    for e in std::fs::read_dir(root).unwrap().flatten() {
        assert!(
            !e.file_name().to_string_lossy().contains(".tmp."),
            "leftover {:?}",
            e.path()
        );
    }
    build
}

fn spawn_child(root: &PathBuf, seq: u64, crash_at: Option<&str>) -> std::process::Child {
    let mut cmd = Command::new(self_exe());
    cmd.args(["--exact", "deployer_child", "--test-threads=1"])
        .env("CRASH_ROOT", root)
        .env("CRASH_SEQ", seq.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(s) = crash_at {
        cmd.env("CRASH_AT", s);
    }
    cmd.spawn().unwrap()
}

#[test]
fn killed_at_every_step_boundary() {
    let tmp = fast_tempdir();
    let root = tmp.path().join("app");
    let mut seq = 0;
    // Two rounds so each step is hit both before and after a first build is live.
    for round in 0..2 {
        for step in STEPS {
            let status = spawn_child(&root, seq, Some(step)).wait().unwrap();
            assert!(!status.success(), "child did not die at {step}");
            seq += 1;
            let live = check_root(&root);
            if round == 1 || step == "after-flip" {
                assert!(!live.is_empty() || round == 0, "nothing live after {step}");
            }
        }
    }
}

#[test]
fn killed_at_random_points() {
    let tmp = fast_tempdir();
    let root = tmp.path().join("app");
    let mut rng = rand::thread_rng();
    let mut seq = 0;
    let mut live_seen = 0;
    for _ in 0..60 {
        let mut child = spawn_child(&root, seq, None);
        std::thread::sleep(Duration::from_micros(rng.gen_range(500..30_000)));
        let _ = child.kill();
        let _ = child.wait();
        seq += 1000;
        if !check_root(&root).is_empty() {
            live_seen += 1;
        }
    }
    assert!(live_seen > 0, "the child never got a build live");
}
