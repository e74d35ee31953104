//! The child processes some tests start: a program of their own (the
//! `test-child` test target without a harness, `tests/support/test_child.rs`),
//! not `#[test]`s that return early, so a normal run never counts a child
//! helper as a passing test. The mode is the first argument; every mode
//! reads its inputs from its arguments, except the sd_notify ones, which
//! test reading the environment itself.
//!
//! Nothing persists: a child holds only what its parent gave it, and the
//! parent's temp dir goes when the test ends.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use deploy_agent::daemon::notify::{spawn_watchdog, watchdog_interval, Notifier};
use deploy_agent::status::CancellationToken;
use swapper::{BuildInfo, DeployRoot};

use crate::{file_content, self_exe, write_build};

/// Files and size of each file in the swapper atomicity builds.
pub const READER_FILES: usize = 8;
pub const READER_LEN: usize = 16 * 1024;
/// Files and size of each file in the swapper crash builds.
pub const CRASH_FILES: usize = 40;
pub const CRASH_LEN: usize = 2048;
/// The crash child's steps, in order: `CRASH_AT=<step>` kills it there.
pub const CRASH_STEPS: [&str; 6] = [
    "after-open",
    "after-claim",
    "mid-write",
    "after-write",
    "after-mark",
    "after-flip",
];

/// A command running the child program in `mode`.
pub fn command(mode: &str) -> Command {
    let mut cmd = Command::new(program());
    cmd.arg(mode);
    cmd
}

/// The child program: the `test-child` test target, which Cargo builds
/// beside the test binaries (`target/<profile>/deps/test_child-<hash>`).
/// The newest one is this build's.
fn program() -> &'static Path {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let exe = self_exe();
        let deps = exe
            .parent()
            .unwrap_or_else(|| panic!("unexpected test binary path {}", exe.display()));
        let newest = std::fs::read_dir(deps)
            .unwrap_or_else(|e| panic!("{}: {e}", deps.display()))
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("test_child-") && !name.contains('.')
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .max();
        match newest {
            Some((_, path)) => path,
            None => panic!(
                "no test-child program in {}: build the tests with cargo \
                 (cargo test -p deploy-agent --test test-child --no-run)",
                deps.display()
            ),
        }
    })
}

/// The child program's entry point: runs `mode` with `args`.
pub fn run(mode: &str, args: &[String]) {
    match (mode, args) {
        ("swapper-reader", [root, stop]) => swapper_reader(Path::new(root), Path::new(stop)),
        ("swapper-deployer", [root, seq]) => swapper_deployer(root, seq.parse().unwrap_or(0)),
        ("notify-all-messages", []) => notify_all_messages(),
        ("notify-missing-socket", []) => notify_missing_socket(),
        ("notify-from-env", []) => notify_from_env(),
        ("notify-watchdog-task", []) => notify_watchdog_task(),
        ("swapper-lock-holder", [root]) => swapper_lock_holder(root),
        ("flood", [socket, n]) => flood(socket, n.parse().unwrap_or(0)),
        _ => panic!("test-child: unknown mode {mode:?} with arguments {args:?}"),
    }
}

/// One read of a "request" through `<root>/current`: pin the build by
/// opening `current` as a directory, then read two files relative to that
/// descriptor. Both must be complete and of the same build; and a read
/// through the path, the way a naive reader does it, must be one of the
/// two builds, complete.
pub fn one_request(root: &Path, i: usize) -> Result<(), String> {
    let dir = File::open(root.join("current")).map_err(|e| format!("open current: {e}"))?;
    let build = read_at(&dir, "BUILD")?;
    let build = String::from_utf8(build).map_err(|e| e.to_string())?;
    for k in [i % READER_FILES, (i + 3) % READER_FILES] {
        let got = read_at(&dir, &format!("f{k}"))?;
        if got != file_content(&build, k, READER_LEN) {
            return Err(format!(
                "f{k} is not complete build {build}'s ({} bytes)",
                got.len()
            ));
        }
    }
    let k = i % READER_FILES;
    let got = std::fs::read(root.join("current").join(format!("f{k}")))
        .map_err(|e| format!("read current/f{k}: {e}"))?;
    if got != file_content("one", k, READER_LEN) && got != file_content("two", k, READER_LEN) {
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

/// Reads until the stop file appears, then prints its counts; fails if
/// any read failed.
fn swapper_reader(root: &Path, stop: &Path) {
    let (mut reads, mut failures) = (0u64, 0u64);
    let mut i = 0;
    while !stop.exists() {
        if let Err(e) = one_request(root, i) {
            failures += 1;
            eprintln!("child reader failure: {e}");
        }
        reads += 1;
        i += 1;
    }
    println!("CHILD reads={reads} failures={failures}");
    assert_eq!(failures, 0);
}

/// Opens the deploy root (taking its lock), says "locked", and holds it
/// until killed.
fn swapper_lock_holder(root: &str) {
    let (_root, _) = DeployRoot::open(root).unwrap_or_else(|e| panic!("open {root}: {e}"));
    println!("locked");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

fn die_if(step: &str) {
    if std::env::var("CRASH_AT").as_deref() == Ok(step) {
        // SIGKILL: no destructors, no flush, exactly like the OOM killer.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Deploys builds `b<seq>`, `b<seq+1>`, ... in a loop, dying where
/// `CRASH_AT` says (or wherever the parent kills it).
fn swapper_deployer(root: &str, start: u64) {
    let (mut dr, _) = DeployRoot::open(root).unwrap_or_else(|e| panic!("open {root}: {e}"));
    die_if("after-open");
    for n in start.. {
        let build = format!("b{n}");
        let (slot, dir) = dr.claim_cold().unwrap_or_else(|e| panic!("claim: {e}"));
        die_if("after-claim");
        // Write half, maybe die, then write everything (rewriting is harmless).
        write_build(&dir, &build, CRASH_FILES / 2, CRASH_LEN);
        die_if("mid-write");
        let (entries, bytes) = write_build(&dir, &build, CRASH_FILES, CRASH_LEN);
        die_if("after-write");
        let info = BuildInfo {
            build_id: build,
            sha256: None,
            entries,
            bytes,
        };
        dr.mark_ready(slot, info)
            .unwrap_or_else(|e| panic!("mark: {e}"));
        die_if("after-mark");
        dr.flip_to(slot).unwrap_or_else(|e| panic!("flip: {e}"));
        die_if("after-flip");
    }
}

fn notify_all_messages() {
    let n = Notifier::from_env();
    assert!(n.is_enabled(), "NOTIFY_SOCKET is not set");
    n.ready("serving web-1 from slot a")
        .unwrap_or_else(|e| panic!("{e}"));
    n.status("downloading web-2\n50%")
        .unwrap_or_else(|e| panic!("{e}"));
    n.watchdog().unwrap_or_else(|e| panic!("{e}"));
    n.stopping().unwrap_or_else(|e| panic!("{e}"));
    n.reloading().unwrap_or_else(|e| panic!("{e}"));
    // Two RELOADING messages carry increasing MONOTONIC_USEC values.
    std::thread::sleep(Duration::from_millis(2));
    n.reloading().unwrap_or_else(|e| panic!("{e}"));
}

fn notify_missing_socket() {
    match Notifier::from_env().ready("x") {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
        Ok(()) => panic!("sent to a socket nobody listens on"),
    }
}

fn notify_from_env() {
    let interval = watchdog_interval().map_or(0, |d| d.as_millis());
    Notifier::from_env()
        .ready(&format!("interval {interval}"))
        .unwrap_or_else(|e| panic!("{e}"));
}

fn notify_watchdog_task() {
    // A paused clock: the watchdog's interval is the only timer and the
    // pings are blocking sends, so the virtual 350 ms hold exactly the
    // ticks at 0, 100, 200 and 300 ms however loaded the machine is.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let task = spawn_watchdog(Notifier::from_env(), shutdown.clone())
            .unwrap_or_else(|| panic!("no watchdog: WATCHDOG_USEC is not set for this pid"));
        // 200 ms watchdog -> a ping every 100 ms, the first at once.
        tokio::time::sleep(Duration::from_millis(350)).await;
        shutdown.cancel();
        task.await.unwrap_or_else(|e| panic!("{e}"));
        Notifier::from_env()
            .stopping()
            .unwrap_or_else(|e| panic!("{e}"));
    });
}

/// Opens `n` connections to `socket`, says "ready", and holds them until
/// stdin closes.
fn flood(socket: &str, n: usize) {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(
            std::os::unix::net::UnixStream::connect(socket)
                .unwrap_or_else(|e| panic!("connect {socket}: {e}")),
        );
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
}
