//! Drain detection with real processes holding a slot through their cwd, an
//! open file and a memory mapping.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use deploy_agent_tests::{fast_tempdir, wait_until, DEADLINE};
use swapper::drain::{holders, wait_until_drained, Use};
use swapper::Error;

fn wait_for_holders(dir: &std::path::Path, n: usize) {
    wait_until("the holders to appear", DEADLINE, || {
        match holders(dir).unwrap() {
            hs if hs.len() >= n => Ok(()),
            hs => Err(format!("{hs:?}")),
        }
    });
}

/// Three processes holding `dir` (by cwd, an open fd, a mapping) until
/// their stdin closes: each lives exactly as long as the test wants, however
/// slowly the others start on a loaded machine.
fn spawn_holders(dir: &std::path::Path) -> Vec<Child> {
    std::fs::write(dir.join("data.bin"), vec![7u8; 8192]).unwrap();
    let piped = |cmd: &mut Command| cmd.stdin(Stdio::piped()).spawn().unwrap();
    let cwd = piped(
        Command::new("sh")
            .args(["-c", "exec cat >/dev/null"])
            .current_dir(dir),
    );
    let fd = piped(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec 3<'{}/data.bin'; exec cat >/dev/null",
                dir.display()
            ))
            .current_dir("/"),
    );
    let mmap = piped(
        Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import mmap,sys\nf=open('{}/data.bin','rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nf.close()\nsys.stdin.read()",
                dir.display()
            ))
            .current_dir("/"),
    );
    vec![cwd, fd, mmap]
}

#[test]
fn reports_cwd_fd_and_mmap_holders_and_waits_for_exit() {
    let tmp = fast_tempdir();
    let dir = tmp.path().join("slot");
    std::fs::create_dir(&dir).unwrap();
    let mut kids = spawn_holders(&dir);
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
    // The holders exit once the wait has seen them (its first poll), and
    // the wait returns when they are gone.
    let mut polls = 0;
    wait_until_drained(&dir, DEADLINE, Duration::from_millis(50), |_| {
        polls += 1;
        for k in kids.iter_mut() {
            drop(k.stdin.take());
        }
        true
    })
    .unwrap();
    assert!(polls > 0);
    for k in kids.iter_mut() {
        k.wait().unwrap();
    }
}

#[test]
fn deadline_reports_the_pids_still_holding() {
    let tmp = fast_tempdir();
    let dir = tmp.path().join("slot");
    std::fs::create_dir(&dir).unwrap();
    let mut kids = spawn_holders(&dir);
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
    // Lives until killed below, however long the detection takes.
    let mut k = Command::new("sleep")
        .arg("infinity")
        .current_dir(&b)
        .spawn()
        .unwrap();
    wait_for_holders(&b, 1);
    assert!(holders(&a).unwrap().is_empty());
    let _ = k.kill();
    let _ = k.wait();
}
