//! Deploy root behaviour: init, lock contention, adoption of existing
//! deploys, flips, rollback, recovery of each inconsistency, and a property
//! test over random operation sequences with crashes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;

use deploy_agent_tests::{check_build, children, fast_tempdir, write_build};
use proptest::prelude::*;
use swapper::{BuildInfo, DeployRoot, Error, Slot};

fn deploy(dr: &mut DeployRoot, build: &str) -> Slot {
    let (slot, dir) = dr.claim_cold().unwrap();
    let (entries, bytes) = write_build(&dir, build, 3, 100);
    dr.mark_ready(slot, info(build, entries, bytes)).unwrap();
    dr.flip_to(slot).unwrap();
    slot
}

fn info(build: &str, entries: u64, bytes: u64) -> BuildInfo {
    BuildInfo {
        build_id: build.into(),
        sha256: None,
        entries,
        bytes,
    }
}

fn served_build(root: &Path) -> String {
    check_build(&root.join("current"), 3, 100).unwrap()
}

#[test]
fn init_is_idempotent_and_creates_layout() {
    let tmp = fast_tempdir();
    let root = tmp.path().join("app");
    {
        let (dr, rep) = DeployRoot::open(&root).unwrap();
        assert_eq!(dr.hot(), None);
        assert_eq!(dr.cold(), Slot::A);
        assert!(rep.adopted.is_none());
    }
    for d in ["slot-a", "slot-b", ".deploy", ".deploy/trash"] {
        assert!(root.join(d).is_dir(), "{d} missing");
    }
    let state1 = std::fs::read(root.join(".deploy/state.json")).unwrap();
    let (_dr, rep) = DeployRoot::open(&root).unwrap();
    assert!(!rep.state_repaired);
    assert_eq!(
        std::fs::read(root.join(".deploy/state.json")).unwrap(),
        state1
    );
}

#[test]
fn second_owner_gets_locked_by_pid() {
    let tmp = fast_tempdir();
    let (_dr, _) = DeployRoot::open(tmp.path()).unwrap();
    let err = DeployRoot::open(tmp.path()).unwrap_err();
    match &err {
        Error::Locked { pid, .. } => assert_eq!(pid, &std::process::id().to_string()),
        other => panic!("expected Locked, got {other}"),
    }
    assert!(err
        .to_string()
        .contains(&format!("locked by pid {}", std::process::id())));
}

#[test]
fn lock_is_released_when_owner_process_dies() {
    let tmp = fast_tempdir();
    // Another process opens the root (taking its lock) and says so.
    let mut holder = children::command("swapper-lock-holder")
        .arg(tmp.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked", "the holder did not take the lock");
    // While it lives, the root is its.
    let err = DeployRoot::open(tmp.path()).unwrap_err();
    match &err {
        Error::Locked { pid, .. } => assert_eq!(pid, &holder.id().to_string()),
        other => panic!("expected Locked by the holder, got {other}"),
    }
    // SIGKILL: no destructor runs; the kernel drops the lock with the fd.
    holder.kill().unwrap();
    holder.wait().unwrap();
    DeployRoot::open(tmp.path()).unwrap();
}

#[test]
fn flip_and_rollback() {
    let tmp = fast_tempdir();
    let (mut dr, _) = DeployRoot::open(tmp.path()).unwrap();
    // Nothing to roll back to yet.
    assert!(matches!(dr.rollback(), Err(Error::NoPreviousBuild { .. })));
    let a = deploy(&mut dr, "one");
    assert_eq!(served_build(tmp.path()), "one");
    assert!(matches!(dr.rollback(), Err(Error::NoPreviousBuild { .. })));
    let b = deploy(&mut dr, "two");
    assert_ne!(a, b);
    assert_eq!(served_build(tmp.path()), "two");
    let rep = dr.rollback().unwrap();
    assert_eq!(rep.to, a);
    assert_eq!(rep.build_id, "one");
    assert_eq!(served_build(tmp.path()), "one");
    // Rolling "back" again returns to two: both slots stay valid.
    dr.rollback().unwrap();
    assert_eq!(served_build(tmp.path()), "two");
    // Claiming the cold slot invalidates it: no rollback any more.
    dr.claim_cold().unwrap();
    let err = dr.rollback().unwrap_err();
    assert!(matches!(err, Error::NoPreviousBuild { .. }), "{err}");
    assert_eq!(served_build(tmp.path()), "two");
    assert!(dr.state().history.len() >= 4);
    // current is a relative link.
    assert_eq!(
        std::fs::read_link(tmp.path().join("current")).unwrap(),
        Path::new(b.dir_name())
    );
}

#[test]
fn flip_refuses_unmarked_slot_and_bad_build_id() {
    let tmp = fast_tempdir();
    let (mut dr, _) = DeployRoot::open(tmp.path()).unwrap();
    deploy(&mut dr, "one");
    let (slot, dir) = dr.claim_cold().unwrap();
    write_build(&dir, "two", 3, 100);
    let err = dr.flip_to(slot).unwrap_err();
    assert!(matches!(err, Error::SlotNotReady { .. }), "{err}");
    assert!(err.to_string().contains("no valid ready-marker"));
    let err = dr.mark_ready(slot, info("../evil", 1, 1)).unwrap_err();
    assert!(matches!(err, Error::BadBuildId { .. }), "{err}");
    assert_eq!(served_build(tmp.path()), "one");
}

#[test]
fn claim_moves_old_contents_to_trash_and_purge_deletes_them() {
    let tmp = fast_tempdir();
    let (mut dr, _) = DeployRoot::open(tmp.path()).unwrap();
    deploy(&mut dr, "one");
    deploy(&mut dr, "two");
    let (_, dir) = dr.claim_cold().unwrap();
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "slot not empty"
    );
    assert_eq!(std::fs::read_dir(dr.trash_dir()).unwrap().count(), 1);
    assert_eq!(swapper::purge_trash(dr.path()).unwrap(), 1);
    assert_eq!(std::fs::read_dir(dr.trash_dir()).unwrap().count(), 0);
}

/// A keeping claim leaves the old build readable outside the trash (a
/// purge running meanwhile cannot touch it) until it is discarded; a crash
/// before that leaves it for `open` to move into the trash.
#[test]
fn a_keeping_claim_survives_a_purge_and_a_crash_leaves_it_to_the_trash() {
    let tmp = fast_tempdir();
    let (mut dr, _) = DeployRoot::open(tmp.path()).unwrap();
    deploy(&mut dr, "one");
    deploy(&mut dr, "two");
    let (_, dir, kept) = dr.claim_cold_keeping().unwrap();
    let kept = kept.expect("the cold slot held a build");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert_eq!(swapper::purge_trash(dr.path()).unwrap(), 0);
    assert_eq!(check_build(&kept, 3, 100).unwrap(), "one");
    dr.discard_kept(&kept).unwrap();
    assert!(!kept.exists());
    assert_eq!(swapper::purge_trash(dr.path()).unwrap(), 1);

    deploy(&mut dr, "three");
    let (_, _, kept) = dr.claim_cold_keeping().unwrap();
    let kept = kept.unwrap();
    drop(dr); // the process dies while reading it
    let (dr, report) = DeployRoot::open(tmp.path()).unwrap();
    assert!(!kept.exists());
    assert_eq!(report.trash_entries, 1);
    assert_eq!(served_build(dr.path()), "three");
}

#[test]
fn adopts_plain_served_directory_in_place() {
    let tmp = fast_tempdir();
    let cur = tmp.path().join("current");
    std::fs::create_dir(&cur).unwrap();
    write_build(&cur, "legacy", 3, 100);
    let ino = std::fs::metadata(cur.join("f0")).unwrap().ino();
    // A worker whose cwd is inside the served directory.
    let mut worker = std::process::Command::new("sleep")
        .arg("infinity")
        .current_dir(&cur)
        .spawn()
        .unwrap();
    let (dr, rep) = DeployRoot::open(tmp.path()).unwrap();
    assert!(rep.adopted.is_some());
    assert_eq!(dr.hot(), Some(Slot::A));
    assert!(std::fs::symlink_metadata(&cur)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(served_build(tmp.path()), "legacy");
    // Same inodes: nothing was copied.
    assert_eq!(std::fs::metadata(cur.join("f0")).unwrap().ino(), ino);
    // The worker's cwd now is slot-a.
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", worker.id())).unwrap();
    assert_eq!(cwd, dr.slot_path(Slot::A));
    let _ = worker.kill();
    let _ = worker.wait();
    assert_eq!(dr.marker(Slot::A).unwrap().build.entries, 4);
    drop(dr);
    let (_, rep) = DeployRoot::open(tmp.path()).unwrap();
    assert!(rep.adopted.is_none(), "adoption must happen once");
}

#[test]
fn adopts_capistrano_releases_tree_with_hard_links() {
    let tmp = fast_tempdir();
    let rel = tmp.path().join("releases/20240101120000");
    std::fs::create_dir_all(rel.join("sub")).unwrap();
    write_build(&rel, "cap", 3, 100);
    std::fs::write(rel.join("sub/x"), b"x").unwrap();
    symlink("f0", rel.join("link")).unwrap();
    symlink("releases/20240101120000", tmp.path().join("current")).unwrap();
    let (mut dr, rep) = DeployRoot::open(tmp.path()).unwrap();
    assert!(rep.adopted.unwrap().contains("hard links"));
    let slot = dr.hot().unwrap();
    assert_eq!(served_build(tmp.path()), "cap");
    let a = std::fs::metadata(rel.join("f1")).unwrap().ino();
    let b = std::fs::metadata(dr.slot_path(slot).join("f1"))
        .unwrap()
        .ino();
    assert_eq!(a, b, "files must be hard links, not copies");
    assert_eq!(
        std::fs::read_link(dr.slot_path(slot).join("link")).unwrap(),
        Path::new("f0")
    );
    assert!(dr
        .marker(slot)
        .unwrap()
        .build
        .build_id
        .starts_with("adopted-2024"));
    // The next deploy goes to the other slot; rollback returns to the release.
    deploy(&mut dr, "next");
    dr.rollback().unwrap();
    assert_eq!(served_build(tmp.path()), "cap");
}

#[test]
fn recovery_removes_temp_links_and_restores_missing_current() {
    let tmp = fast_tempdir();
    {
        let (mut dr, _) = DeployRoot::open(tmp.path()).unwrap();
        deploy(&mut dr, "one");
        deploy(&mut dr, "two");
    }
    symlink("slot-a", tmp.path().join(".current.tmp.1.2.3")).unwrap();
    std::fs::write(tmp.path().join(".deploy/.state.json.tmp.9.9.9"), b"{").unwrap();
    std::fs::remove_file(tmp.path().join("current")).unwrap();
    let (dr, rep) = DeployRoot::open(tmp.path()).unwrap();
    assert_eq!(rep.removed_temp.len(), 2, "{rep:?}");
    assert_eq!(rep.current_restored, Some(Slot::B));
    assert_eq!(dr.hot(), Some(Slot::B));
    assert_eq!(served_build(tmp.path()), "two");
}

#[test]
fn recovery_trusts_current_over_state_file() {
    let tmp = fast_tempdir();
    {
        let (mut dr, _) = DeployRoot::open(tmp.path()).unwrap();
        deploy(&mut dr, "one");
        deploy(&mut dr, "two");
    }
    // Someone (a crash between rename and persist) left current on A while
    // the state says B.
    let tmp_link = tmp.path().join("x");
    symlink("slot-a", &tmp_link).unwrap();
    std::fs::rename(&tmp_link, tmp.path().join("current")).unwrap();
    let (dr, rep) = DeployRoot::open(tmp.path()).unwrap();
    assert!(rep.state_repaired);
    assert_eq!(dr.hot(), Some(Slot::A));
    assert_eq!(served_build(tmp.path()), "one");
    // A garbage state file is rebuilt too.
    drop(dr);
    std::fs::write(tmp.path().join(".deploy/state.json"), b"not json").unwrap();
    let (dr, _) = DeployRoot::open(tmp.path()).unwrap();
    assert_eq!(dr.hot(), Some(Slot::A));
}

#[test]
fn invalid_marker_counts_as_empty_and_current_leaves_it() {
    let tmp = fast_tempdir();
    {
        let (mut dr, _) = DeployRoot::open(tmp.path()).unwrap();
        deploy(&mut dr, "one");
        deploy(&mut dr, "two");
    }
    // Corrupt the hot slot's marker: current must not stay on an unmarked slot.
    std::fs::write(tmp.path().join(".deploy/slot-b.ready"), b"garbage").unwrap();
    let (dr, rep) = DeployRoot::open(tmp.path()).unwrap();
    assert!(rep.invalid_slots.contains(&Slot::B));
    assert_eq!(rep.current_restored, Some(Slot::A));
    assert_eq!(served_build(tmp.path()), "one");
    assert!(dr.marker(Slot::B).is_none());
    // A marker copied to the other slot's name is invalid as well.
    drop(dr);
    std::fs::copy(
        tmp.path().join(".deploy/slot-a.ready"),
        tmp.path().join(".deploy/slot-b.ready"),
    )
    .unwrap();
    let (dr, _) = DeployRoot::open(tmp.path()).unwrap();
    assert!(dr.marker(Slot::B).is_none());
}

#[derive(Debug, Clone)]
enum Op {
    Deploy,
    CrashAfterClaim,
    CrashMidWrite,
    CrashAfterMark,
    Rollback,
    Reopen,
    DeleteCurrent,
    CorruptState,
    LeaveTempLink,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Deploy),
        1 => Just(Op::CrashAfterClaim),
        1 => Just(Op::CrashMidWrite),
        1 => Just(Op::CrashAfterMark),
        2 => Just(Op::Rollback),
        1 => Just(Op::Reopen),
        1 => Just(Op::DeleteCurrent),
        1 => Just(Op::CorruptState),
        1 => Just(Op::LeaveTempLink),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever happens, after recovery `current` resolves to a marked slot
    /// holding the complete build its marker names, once anything was live.
    #[test]
    fn current_always_resolves_to_a_marked_complete_build(ops in proptest::collection::vec(op(), 1..24)) {
        let tmp = fast_tempdir();
        let root = tmp.path();
        let mut dr = Some(DeployRoot::open(root).unwrap().0);
        let mut n = 0;
        let mut ever_live = false;
        for op in ops {
            n += 1;
            let build = format!("b{n}");
            let d = dr.as_mut().unwrap();
            match op.clone() {
                Op::Deploy => { deploy(d, &build); ever_live = true; }
                Op::CrashAfterClaim => { d.claim_cold().unwrap(); dr = None; }
                Op::CrashMidWrite => {
                    let (_, dir) = d.claim_cold().unwrap();
                    write_build(&dir, &build, 1, 100);
                    dr = None;
                }
                Op::CrashAfterMark => {
                    let (slot, dir) = d.claim_cold().unwrap();
                    let (e, b) = write_build(&dir, &build, 3, 100);
                    d.mark_ready(slot, info(&build, e, b)).unwrap();
                    dr = None;
                }
                Op::Rollback => { let _ = d.rollback(); }
                Op::Reopen => { dr = None; }
                Op::DeleteCurrent => { dr = None; let _ = std::fs::remove_file(root.join("current")); }
                Op::CorruptState => { dr = None; std::fs::write(root.join(".deploy/state.json"), b"{\"x\":").unwrap(); }
                Op::LeaveTempLink => { symlink("slot-b", root.join(format!(".current.tmp.{n}"))).unwrap(); }
            }
            if dr.is_none() {
                dr = Some(DeployRoot::open(root).unwrap_or_else(|e| panic!("reopen after {op:?}: {e}")).0);
            }
            let d = dr.as_ref().unwrap();
            let served = d.served().unwrap();
            prop_assert_eq!(served, d.hot());
            if ever_live {
                let slot = served.expect("something was live, current must resolve");
                let m = d.marker(slot).expect("current points at a marked slot");
                let got = check_build(&root.join("current"), 3, 100).unwrap();
                prop_assert_eq!(got, m.build.build_id.clone());
            }
        }
    }
}
