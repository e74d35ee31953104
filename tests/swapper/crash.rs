//! Crash safety: a child process runs claim -> write -> mark -> flip in a
//! loop and is SIGKILLed at every step boundary and at random points. After
//! every kill, recovery must yield a root whose `current` resolves to a
//! complete, marked build and whose state file agrees.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::time::Duration;

use deploy_agent_tests::children::{
    self, CRASH_FILES as FILES, CRASH_LEN as LEN, CRASH_STEPS as STEPS,
};
use deploy_agent_tests::{check_build, fast_tempdir};
use rand::Rng;
use swapper::DeployRoot;

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
    let mut cmd = children::command("swapper-deployer");
    cmd.arg(root)
        .arg(seq.to_string())
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
