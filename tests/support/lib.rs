//! Shared helpers for the integration tests: temp dirs on a fast
//! filesystem, and writing small builds into slots.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::path::{Path, PathBuf};

/// A temp dir on tmpfs (`/dev/shm`) when there is one: these tests check
/// ordering and atomicity, which do not depend on the disk, and tmpfs keeps
/// them fast and immune to other builds flushing the shared disk.
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("da-test-").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("da-test-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"))
}

/// The content every file of a test build carries: the build id repeated,
/// so a reader can tell a complete file of one build from anything else.
pub fn file_content(build: &str, i: usize, len: usize) -> Vec<u8> {
    let unit = format!("{build}:{i};");
    unit.as_bytes().iter().copied().cycle().take(len).collect()
}

/// Writes `n` files `f0..f{n-1}` of `len` bytes for `build` into `dir`,
/// plus a `BUILD` file naming it. Returns (entries, bytes).
pub fn write_build(dir: &Path, build: &str, n: usize, len: usize) -> (u64, u64) {
    for i in 0..n {
        std::fs::write(dir.join(format!("f{i}")), file_content(build, i, len))
            .unwrap_or_else(|e| panic!("write {}: {e}", dir.display()));
    }
    std::fs::write(dir.join("BUILD"), build).unwrap_or_else(|e| panic!("write BUILD: {e}"));
    ((n + 1) as u64, (n * len + build.len()) as u64)
}

/// Checks that `dir` holds a complete build written by [`write_build`]
/// with `n` files of `len` bytes; returns its build id or a description
/// of what is wrong.
pub fn check_build(dir: &Path, n: usize, len: usize) -> Result<String, String> {
    let build = std::fs::read_to_string(dir.join("BUILD"))
        .map_err(|e| format!("BUILD in {}: {e}", dir.display()))?;
    for i in 0..n {
        let p = dir.join(format!("f{i}"));
        let got = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if got != file_content(&build, i, len) {
            return Err(format!("{}: content is not build {build}'s", p.display()));
        }
    }
    Ok(build)
}

/// The path of this test binary, to re-run it as a child in a special mode.
pub fn self_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"))
}

pub mod agent;
pub mod archive;
pub mod children;
pub mod disk;
pub mod host;
pub mod netns;
pub mod process;
pub mod slots;

/// The repository's root directory (tests and benches are targets of the
/// agent package, so their own `CARGO_MANIFEST_DIR` is `agent/`).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `deploy-agent` binary under test.
///
/// The tests and benchmarks are targets of the agent package, so Cargo
/// builds its binary before them and puts it in the profile directory, one
/// level above the test executable (target/<profile>/deps/<test>).
/// `tests/operator/registered.rs` checks this path against the one Cargo gives the
/// test itself (`CARGO_BIN_EXE_deploy-agent`), so a change in Cargo's layout
/// fails there instead of running a stale binary.
pub fn agent_bin() -> PathBuf {
    let exe = self_exe();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test binary path {}", exe.display()))
        .join("deploy-agent");
    assert!(
        bin.exists(),
        "{} missing: run the tests through cargo",
        bin.display()
    );
    bin
}
pub mod containers;
pub mod fleet;

/// How long a test waits for one step it expects (a deploy to go live, a
/// process to answer, a file to appear) before it fails naming the step.
/// Generous on purpose: a loaded 2-core machine must not fail a test, and
/// a test that waits this long has failed anyway. Timing is measured in
/// `benches/`, never asserted here.
pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// How often [`wait_until`] and [`wait_until_async`] poll.
pub const POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Polls `f` every 20 ms until it returns `Ok`, or panics after `limit`
/// naming `what` and the last thing `f` said. The one deadline loop of
/// the synchronous tests.
pub fn wait_until<T>(
    what: &str,
    limit: std::time::Duration,
    f: impl FnMut() -> Result<T, String>,
) -> T {
    wait_until_every(what, limit, POLL, f)
}

/// [`wait_until`] polling every `every`: for a wait that must poll faster
/// to see a short window, or slower because each poll costs (a process
/// started, a request over the network).
pub fn wait_until_every<T>(
    what: &str,
    limit: std::time::Duration,
    every: std::time::Duration,
    f: impl FnMut() -> Result<T, String>,
) -> T {
    poll_until(limit, every, f)
        .unwrap_or_else(|last| panic!("{what}: not after {limit:?}; last: {last}"))
}

/// The loop behind the waits: polls `f` every `every` until it returns
/// `Ok`, or returns the last `Err` after `limit`, for a caller that acts on
/// the timeout itself (kills what it waited for, returns an error, or goes
/// on). A test that fails on the timeout uses [`wait_until`].
pub fn poll_until<T, E>(
    limit: std::time::Duration,
    every: std::time::Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let start = std::time::Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(last) if start.elapsed() > limit => return Err(last),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// [`wait_until`] for async tests: polls `f` every 20 ms without blocking
/// the runtime.
pub async fn wait_until_async<T, F>(
    what: &str,
    limit: std::time::Duration,
    f: impl FnMut() -> F,
) -> T
where
    F: std::future::Future<Output = Result<T, String>>,
{
    wait_until_every_async(what, limit, POLL, f).await
}

/// [`wait_until_every`] for async tests.
pub async fn wait_until_every_async<T, F>(
    what: &str,
    limit: std::time::Duration,
    every: std::time::Duration,
    f: impl FnMut() -> F,
) -> T
where
    F: std::future::Future<Output = Result<T, String>>,
{
    poll_until_async(limit, every, f)
        .await
        .unwrap_or_else(|last| panic!("{what}: not after {limit:?}; last: {last}"))
}

/// [`poll_until`] for async tests: sleeps without blocking the runtime.
pub async fn poll_until_async<T, E, F>(
    limit: std::time::Duration,
    every: std::time::Duration,
    mut f: impl FnMut() -> F,
) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    let start = std::time::Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(last) if start.elapsed() > limit => return Err(last),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// Whether a test may run. `missing` names a precondition that is not
/// there (root, a package). Then, under CI (`CI=true`, where `.ci/run`
/// installs everything and runs as root), the test fails saying what is
/// missing; elsewhere it writes `SKIPPED: <test>: <why>` to the real
/// stderr (past the test harness's capture) and the caller returns.
pub fn precondition(missing: Option<String>) -> bool {
    let Some(why) = missing else {
        return true;
    };
    let current = std::thread::current();
    let test = current.name().unwrap_or("this test");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run under CI: {why} (.ci/run runs as root and installs what the tests need)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {test}: {why}");
    false
}

/// `Some(why)` when not running as root: for [`precondition`].
pub fn needs_root(why: &str) -> Option<String> {
    (!disk::is_root()).then(|| format!("needs root ({why})"))
}

/// `Some(why)` when `program` is not on PATH: for [`precondition`].
pub fn needs_program(program: &str, package: &str) -> Option<String> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()));
    (!found).then(|| format!("`{program}` is not installed (Debian package {package})"))
}
