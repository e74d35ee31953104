//! Drain detection with real processes holding a slot through their cwd, an
//! open file and a memory mapping.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use deploy_agent_tests::fast_tempdir;
use swapper::drain::{holders, wait_until_drained, Use};
use swapper::Error;

fn wait_for_holders(dir: &std::path::Path, n: usize) {
    let start = Instant::now();
    while holders(dir).unwrap().len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "holders never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_holders(dir: &std::path::Path, secs: u32) -> Vec<Child> {
    std::fs::write(dir.join("data.bin"), vec![7u8; 8192]).unwrap();
    let cwd = Command::new("sleep")
        .arg(secs.to_string())
        .current_dir(dir)
        .spawn()
        .unwrap();
    let fd = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 3<'{}/data.bin'; exec sleep {secs}",
            dir.display()
        ))
        .current_dir("/")
        .spawn()
        .unwrap();
    let mmap = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import mmap,os,time\nf=open('{}/data.bin','rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nf.close()\ntime.sleep({secs})",
            dir.display()
        ))
        .current_dir("/")
        .spawn()
        .unwrap();
    vec![cwd, fd, mmap]
}

#[test]
fn reports_cwd_fd_and_mmap_holders_and_waits_for_exit() {
    let tmp = fast_tempdir();
    let dir = tmp.path().join("slot");
    std::fs::create_dir(&dir).unwrap();
    let mut kids = spawn_holders(&dir, 2);
    wait_for_holders(&dir, 3);
    let hs = holders(&dir).unwrap();
    let by_pid = |pid: u32| {
        hs.iter()
            .find(|h| h.pid == pid as i32)
            .unwrap_or_else(|| panic!("pid {pid} not reported: {hs:?}"))
    };
    assert!(by_pid(kids[0].id())
        .uses
        .iter()
        .any(|u| matches!(u, Use::Cwd(_))));
    assert!(by_pid(kids[1].id())
        .uses
        .iter()
        .any(|u| matches!(u, Use::Fd(p) if p.ends_with("data.bin"))));
    let mm = by_pid(kids[2].id());
    assert!(
        mm.uses
            .iter()
            .any(|u| matches!(u, Use::Mmap(p) if p.ends_with("data.bin"))),
        "{mm:?}"
    );
    assert!(mm.command.contains("python3"));
    let start = Instant::now();
    let mut polls = 0;
    wait_until_drained(
        &dir,
        Duration::from_secs(20),
        Duration::from_millis(50),
        |_| {
            polls += 1;
            true
        },
    )
    .unwrap();
    assert!(polls > 0);
    assert!(start.elapsed() < Duration::from_secs(15));
    for k in kids.iter_mut() {
        k.wait().unwrap();
    }
}

#[test]
fn deadline_reports_the_pids_still_holding() {
    let tmp = fast_tempdir();
    let dir = tmp.path().join("slot");
    std::fs::create_dir(&dir).unwrap();
    let mut kids = spawn_holders(&dir, 30);
    wait_for_holders(&dir, 3);
    let err = wait_until_drained(
        &dir,
        Duration::from_millis(300),
        Duration::from_millis(50),
        |_| true,
    )
    .unwrap_err();
    let Error::DrainTimeout { holders, .. } = &err else {
        panic!("expected DrainTimeout, got {err}");
    };
    for k in &kids {
        assert!(
            holders.iter().any(|h| h.pid == k.id() as i32),
            "pid {} missing in {err}",
            k.id()
        );
        assert!(err.to_string().contains(&format!("pid {}", k.id())));
    }
    for k in kids.iter_mut() {
        let _ = k.kill();
        let _ = k.wait();
    }
    assert!(holders_after_exit(&dir));
}

fn holders_after_exit(dir: &std::path::Path) -> bool {
    wait_until_drained(
        dir,
        Duration::from_secs(5),
        Duration::from_millis(20),
        |_| true,
    )
    .is_ok()
}

#[test]
fn a_process_holding_another_directory_is_not_reported() {
    let tmp = fast_tempdir();
    let (a, b) = (tmp.path().join("slot-a"), tmp.path().join("slot-ab"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    // slot-ab shares a prefix string with slot-a but is another directory.
    let mut k = Command::new("sleep")
        .arg("5")
        .current_dir(&b)
        .spawn()
        .unwrap();
    wait_for_holders(&b, 1);
    assert!(holders(&a).unwrap().is_empty());
    let _ = k.kill();
    let _ = k.wait();
}
