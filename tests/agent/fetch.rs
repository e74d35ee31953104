//! Integration tests for the data path: `fetch_and_unpack` against the
//! misbehaving artifact server over real loopback HTTP, into real temp dirs.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use deploy_agent::artifact::cache::make_room;
use deploy_agent::artifact::{
    free_space_check, ArtifactCache, BuildSpec, FetchSettings, Format, Sha256Sum,
};
use deploy_agent::config::UnpackLimits;
use deploy_agent::deploy::pipeline::{fetch_and_unpack, UnpackOutcome};
use deploy_agent::progress::Progress;
use deploy_agent::Error;
use deploy_agent_tests::archive::{compress, file, php_tree, tar_of};
use deploy_agent_tests::{needs_root, precondition, DEADLINE};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use testkit::testserver::artifact::{ArtifactServer, Fault, FaultRule};

/// A generated build: a tar.gz of `files` files with random (incompressible)
/// contents, about `bytes` in total.
struct Build {
    archive: Vec<u8>,
    sha256: Sha256Sum,
    files: Vec<(String, Vec<u8>)>,
}

fn build(seed: u64, files: usize, bytes: usize, format: Format) -> Build {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut list = Vec::new();
    let tar = tar_of(|tar| {
        for i in 0..files {
            let mut data = vec![0u8; rng.gen_range(0..2 * bytes / files)];
            rng.fill(&mut data[..]);
            let name = format!("app/d{}/f{i}.php", i % 7);
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(1_600_000_000 + i as u64);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, &name, &data[..]).unwrap();
            list.push((name, data));
        }
    });
    let archive = compress(&tar, format);
    let sha256 = Sha256Sum::from_bytes(Sha256::digest(&archive).into());
    Build {
        archive,
        sha256,
        files: list,
    }
}

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    cache: ArtifactCache,
    server: ArtifactServer,
    client: reqwest::Client,
    settings: FetchSettings,
    slots: usize,
}

impl Env {
    async fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let cache = ArtifactCache::new(root.join("cache"), 2).unwrap();
        let server = ArtifactServer::start().await.unwrap();
        let settings = FetchSettings {
            parallel_ranges: 4,
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_millis(500),
            retries_per_range: 3,
            backoff: deploy_agent::pacing::Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(50),
            },
            bandwidth_limit: None,
            allow_file_urls: false,
            store: None,
        };
        let client = settings.client().unwrap();
        Env {
            _dir: dir,
            root,
            cache,
            server,
            client,
            settings,
            slots: 0,
        }
    }

    fn spec(&self, build: &Build, paths: &[&str], format: Format) -> BuildSpec {
        BuildSpec {
            build: "b1".into(),
            urls: paths.iter().map(|p| self.server.url(p)).collect(),
            sha256: build.sha256.clone(),
            size: build.archive.len() as u64,
            format,
            index: None,
        }
    }

    /// A fresh empty slot directory.
    fn slot(&mut self) -> PathBuf {
        self.slots += 1;
        let slot = self.root.join(format!("slot{}", self.slots));
        std::fs::create_dir(&slot).unwrap();
        slot
    }

    async fn fetch(&mut self, spec: &BuildSpec) -> (PathBuf, deploy_agent::Result<UnpackOutcome>) {
        let slot = self.slot();
        let result = self.fetch_into(spec, &slot, CancellationToken::new()).await;
        (slot, result)
    }

    async fn fetch_into(
        &self,
        spec: &BuildSpec,
        slot: &Path,
        cancel: CancellationToken,
    ) -> deploy_agent::Result<UnpackOutcome> {
        fetch_and_unpack(
            &self.client,
            spec,
            &self.cache,
            self.cache.lookup(&spec.sha256),
            slot,
            &self.settings,
            &UnpackLimits::default(),
            Arc::new(Progress::default()),
            cancel,
        )
        .await
    }

    fn partial_exists(&self, sha: &str) -> bool {
        self.cache.dir().join(format!("{sha}.partial")).exists()
    }
}

fn assert_unpacked(slot: &Path, build: &Build) {
    for (name, data) in &build.files {
        let got = std::fs::read(slot.join(name)).unwrap();
        assert!(got == *data, "{name} differs");
    }
}

const FORMAT: Format = Format::TarGz;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_ranged_download_verifies_and_unpacks() {
    let mut env = Env::new().await;
    let build = build(1, 200, 3 << 20, FORMAT);
    env.server.add("/b.tar.gz", build.archive.clone());
    // Slow each response down so the ranges visibly overlap at the server.
    env.server.set_fault(FaultRule::always(Fault::Trickle {
        bytes_per_sec: 8 << 20,
    }));
    let spec = env.spec(&build, &["/b.tar.gz"], FORMAT);
    let (slot, result) = env.fetch(&spec).await;
    let outcome = result.unwrap();
    assert!(!outcome.from_cache);
    assert_eq!(build.sha256, *outcome.sha256);
    assert_eq!(outcome.stats.files, 200);
    assert_unpacked(&slot, &build);
    let stats = env.server.stats();
    assert!(
        stats.partial_responses >= 4,
        "ranged download expected, server saw {stats:?}"
    );
    assert!(
        stats.peak_concurrent >= 2,
        "parallel ranges expected: {stats:?}"
    );
    assert_eq!(
        stats.bytes_sent,
        build.archive.len() as u64,
        "each byte once"
    );
    assert!(env.cache.lookup(&build.sha256).is_some());
    assert!(!env.partial_exists(&build.sha256));
}

#[tokio::test]
async fn every_format_round_trips() {
    for format in [Format::Tar, Format::TarZst] {
        let mut env = Env::new().await;
        let build = build(2, 50, 1 << 20, format);
        env.server.add("/b", build.archive.clone());
        let (slot, result) = env.fetch(&env.spec(&build, &["/b"], format)).await;
        result.unwrap();
        assert_unpacked(&slot, &build);
    }
}

#[tokio::test]
async fn server_ignoring_range_falls_back_to_one_stream() {
    let mut env = Env::new().await;
    let build = build(3, 100, 2 << 20, FORMAT);
    env.server.add("/b.tar.gz", build.archive.clone());
    env.server.set_fault(FaultRule::always(Fault::IgnoreRange));
    let (slot, result) = env.fetch(&env.spec(&build, &["/b.tar.gz"], FORMAT)).await;
    result.unwrap();
    assert_unpacked(&slot, &build);
    let stats = env.server.stats();
    assert_eq!(stats.partial_responses, 0);
    assert_eq!(stats.requests, 1, "one full stream: {stats:?}");

    // A full-body stream that breaks halfway starts over (no ranges to resume with).
    env.server.reset_stats();
    env.server
        .set_fault(FaultRule::times(Fault::Truncate { after: 1_000_000 }, 1));
    let mut spec = env.spec(&build, &["/b.tar.gz"], FORMAT);
    spec.urls.push(env.server.url("/b.tar.gz")); // same file, not in the cache path
    let _ = std::fs::remove_file(env.cache.lookup(&build.sha256).unwrap());
    let (slot, result) = env.fetch(&spec).await;
    result.unwrap();
    assert_unpacked(&slot, &build);
    assert_eq!(env.server.stats().requests, 2);
}

#[tokio::test]
async fn persistent_truncation_fails_naming_the_bytes_and_keeps_the_partial() {
    let mut env = Env::new().await;
    let build = build(4, 100, 2 << 20, FORMAT);
    env.server.add("/b.tar.gz", build.archive.clone());
    env.server
        .set_fault(FaultRule::always(Fault::Truncate { after: 1000 }));
    let (_slot, result) = env.fetch(&env.spec(&build, &["/b.tar.gz"], FORMAT)).await;
    match result {
        Err(Error::Download { url, reason, .. }) => {
            assert!(url.ends_with("/b.tar.gz"));
            assert!(reason.contains("expected"), "{reason}");
        }
        other => panic!("expected a download error, got {other:?}"),
    }
    assert!(env.cache.lookup(&build.sha256).is_none());
    // A network failure keeps what arrived, for resume.
    assert!(env.partial_exists(&build.sha256));
}

#[tokio::test]
async fn flipped_byte_fails_the_digest_and_deletes_the_partial() {
    for format in [Format::Tar, Format::TarGz] {
        let mut env = Env::new().await;
        let build = build(5, 100, 2 << 20, format);
        env.server.add("/b", build.archive.clone());
        env.server.set_fault(FaultRule::always(Fault::FlipByte {
            offset: build.archive.len() as u64 / 3,
        }));
        let (_slot, result) = env.fetch(&env.spec(&build, &["/b"], format)).await;
        match result {
            Err(Error::ChecksumFailed {
                url,
                expected,
                calculated,
            }) => {
                assert!(url.ends_with("/b"));
                assert_eq!(build.sha256, *expected);
                assert_ne!(build.sha256, *calculated);
                assert_eq!(calculated.len(), 64);
            }
            other => panic!("expected ChecksumFailed, got {other:?}"),
        }
        assert!(
            !env.partial_exists(&build.sha256),
            "no resume from bad data"
        );
        assert!(env.cache.lookup(&build.sha256).is_none());
    }
}

#[tokio::test]
async fn wrong_length_is_a_size_mismatch() {
    let mut env = Env::new().await;
    let build = build(6, 50, 1 << 20, FORMAT);
    env.server.add("/b", build.archive.clone());
    env.server
        .set_fault(FaultRule::always(Fault::WrongLength { extra: 10 }));
    let (_slot, result) = env.fetch(&env.spec(&build, &["/b"], FORMAT)).await;
    match result {
        Err(Error::SizeMismatch {
            url,
            expected,
            actual,
        }) => {
            assert!(url.ends_with("/b"));
            assert_eq!(expected, build.archive.len() as u64);
            assert_eq!(actual, expected + 10);
        }
        other => panic!("expected SizeMismatch, got {other:?}"),
    }
    assert!(!env.partial_exists(&build.sha256));
}

#[tokio::test]
async fn not_found_fails_and_the_next_mirror_is_used() {
    let mut env = Env::new().await;
    let build = build(7, 50, 1 << 20, FORMAT);
    env.server.add("/good", build.archive.clone());
    let (_slot, result) = env.fetch(&env.spec(&build, &["/missing"], FORMAT)).await;
    match result {
        Err(Error::Download { url, reason, .. }) => {
            assert!(url.ends_with("/missing"));
            assert!(reason.contains("404"), "{reason}");
        }
        other => panic!("expected a 404 download error, got {other:?}"),
    }
    let (slot, result) = env
        .fetch(&env.spec(&build, &["/missing", "/good"], FORMAT))
        .await;
    result.unwrap();
    assert_unpacked(&slot, &build);
}

#[tokio::test]
async fn unavailable_then_recovering_succeeds() {
    let mut env = Env::new().await;
    let build = build(8, 50, 1 << 20, FORMAT);
    env.server.add("/b", build.archive.clone());
    env.server
        .set_fault(FaultRule::times(Fault::Unavailable, 3).on_path("/b"));
    let (slot, result) = env.fetch(&env.spec(&build, &["/b"], FORMAT)).await;
    result.unwrap();
    assert_unpacked(&slot, &build);
    assert!(env.server.stats().requests >= 4);
}

#[tokio::test]
async fn stall_mid_body_times_out_and_the_retry_succeeds() {
    let mut env = Env::new().await;
    let build = build(9, 50, 1 << 20, FORMAT);
    env.server.add("/b", build.archive.clone());
    // A stall far longer than the deadline below: only the read timeout
    // (500 ms) cutting it short and a retry can finish the fetch in time.
    env.server.set_fault(FaultRule::times(
        Fault::Stall {
            after: 50_000,
            duration: 4 * DEADLINE,
        },
        1,
    ));
    let spec = env.spec(&build, &["/b"], FORMAT);
    let (slot, result) = tokio::time::timeout(DEADLINE, env.fetch(&spec))
        .await
        .expect("the read timeout did not cut the stall short");
    result.unwrap();
    assert_unpacked(&slot, &build);
    assert!(env.server.stats().requests >= 2, "no retry after the stall");
}

#[tokio::test]
async fn network_failure_resumes_without_refetching() {
    let mut env = Env::new().await;
    let build = build(10, 100, 3 << 20, FORMAT);
    env.server.add("/b", build.archive.clone());
    // Every range request of the first round dies after 200 kB.
    env.server
        .set_fault(FaultRule::times(Fault::Truncate { after: 200_000 }, 4));
    let (slot, result) = env.fetch(&env.spec(&build, &["/b"], FORMAT)).await;
    result.unwrap();
    assert_unpacked(&slot, &build);
    let stats = env.server.stats();
    assert!(stats.requests > 4, "retries happened: {stats:?}");
    assert!(
        stats.bytes_sent <= build.archive.len() as u64 + 4 * 64 * 1024,
        "only missing bytes re-downloaded: sent {} for {}",
        stats.bytes_sent,
        build.archive.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_partial() {
    let mut env = Env::new().await;
    let build = build(11, 100, 6 << 20, Format::Tar);
    let size = build.archive.len() as u64;
    env.server.add("/b", build.archive.clone());
    // Slow enough that the first attempt is dropped halfway.
    env.server.set_fault(FaultRule::always(Fault::Trickle {
        bytes_per_sec: 500_000,
    }));
    let spec = env.spec(&build, &["/b"], Format::Tar);
    let slot = env.slot();
    let first = tokio::time::timeout(
        Duration::from_millis(1500),
        env.fetch_into(&spec, &slot, CancellationToken::new()),
    )
    .await;
    assert!(first.is_err(), "the first attempt should still be running");
    let sent_first = env.server.stats().bytes_sent;
    assert!(sent_first > 0 && sent_first < size);
    assert!(env.partial_exists(&build.sha256));

    // And a cancelled attempt returns Cancelled quickly and keeps the partial.
    let cancel = CancellationToken::new();
    let slot2 = env.slot();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        trigger.cancel();
    });
    // The trickle needs seconds more for the rest of the artifact, so an
    // attempt that ignored the cancel would end Ok, not Cancelled.
    match env.fetch_into(&spec, &slot2, cancel).await {
        Err(Error::Cancelled { .. }) => {}
        other => panic!("expected Cancelled, got {other:?}"),
    }
    assert!(env.partial_exists(&build.sha256));

    let sent_cancel = env.server.stats().bytes_sent;
    env.server.clear_faults();
    env.server.reset_stats();
    let slot3 = env.slot();
    env.fetch_into(&spec, &slot3, CancellationToken::new())
        .await
        .unwrap();
    assert_unpacked(&slot3, &build);
    let sent_again = env.server.stats().bytes_sent;
    eprintln!(
        "size {size}, first attempt {sent_first}, after cancel {sent_cancel}, resumed {sent_again}"
    );
    assert!(
        sent_again + (sent_cancel - sent_first) <= size,
        "a cancelled attempt keeps what it received"
    );
    assert!(
        sent_again + sent_first / 2 < size,
        "resumed: {sent_again} bytes sent after {sent_first} of {size}"
    );
}

#[tokio::test]
async fn cache_hit_needs_no_request_and_keeps_two() {
    let mut env = Env::new().await;
    let builds: Vec<_> = (0..3).map(|i| build(20 + i, 30, 300_000, FORMAT)).collect();
    for (i, b) in builds.iter().enumerate() {
        env.server.add(&format!("/b{i}"), b.archive.clone());
    }
    let spec0 = env.spec(&builds[0], &["/b0"], FORMAT);
    env.fetch(&spec0).await.1.unwrap();
    env.server.reset_stats();
    let (slot, result) = env.fetch(&spec0).await;
    let outcome = result.unwrap();
    assert!(outcome.from_cache);
    assert_unpacked(&slot, &builds[0]);
    assert_eq!(env.server.stats().requests, 0);

    for (i, b) in builds.iter().enumerate().skip(1) {
        tokio::time::sleep(Duration::from_millis(20)).await; // distinct mtimes
        let path = format!("/b{i}");
        let spec = env.spec(b, &[path.as_str()], FORMAT);
        env.fetch(&spec).await.1.unwrap();
    }
    assert!(
        env.cache.lookup(&builds[0].sha256).is_none(),
        "oldest pruned"
    );
    assert!(env.cache.lookup(&builds[1].sha256).is_some());
    assert!(env.cache.lookup(&builds[2].sha256).is_some());
    let files = std::fs::read_dir(env.cache.dir()).unwrap().count();
    assert_eq!(files, 2, "no partials or sidecars left behind");
}

#[tokio::test]
async fn corrupted_cache_entry_is_detected_and_deleted() {
    let mut env = Env::new().await;
    let build = build(30, 30, 300_000, FORMAT);
    env.server.add("/b", build.archive.clone());
    let spec = env.spec(&build, &["/b"], FORMAT);
    env.fetch(&spec).await.1.unwrap();
    let cached = env.cache.lookup(&build.sha256).unwrap();
    let mut bytes = std::fs::read(&cached).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&cached, bytes).unwrap();
    match env.fetch(&spec).await.1 {
        Err(Error::ChecksumFailed { .. }) => {}
        other => panic!("expected ChecksumFailed, got {other:?}"),
    }
    assert!(env.cache.lookup(&build.sha256).is_none());
}

#[test]
fn free_space_check_names_needed_and_free() {
    let dir = tempfile::tempdir().unwrap();
    match free_space_check(dir.path(), dir.path(), u64::MAX / 4, 1) {
        Err(Error::NotEnoughSpace { needed, free, .. }) => {
            assert_eq!(needed, u64::MAX / 4 + 1);
            assert!(free < needed);
        }
        other => panic!("expected NotEnoughSpace, got {other:?}"),
    }
    free_space_check(dir.path(), dir.path(), 1, 1).unwrap();
}

#[tokio::test]
async fn small_tmpfs_refuses_before_downloading() {
    if !precondition(needs_root("to mount a small tmpfs")) {
        return;
    }
    let env = Env::new().await;
    let build = build(31, 20, 200_000, FORMAT);
    env.server.add("/b", build.archive.clone());
    let small = env.root.join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    if !mounted.success() {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let slot = small.join("slot");
    std::fs::create_dir(&slot).unwrap();
    let cache = ArtifactCache::new(small.join("cache"), 2).unwrap();
    let mut spec = env.spec(&build, &["/b"], FORMAT);
    spec.size = 6 << 20; // with a 5x unpack estimate, far more than 8 MiB
                         // The deploy's one free-space check, before it claims the slot and
                         // before any request.
    let result = make_room(
        &cache,
        &small,
        &slot,
        &spec,
        &UnpackLimits::default(),
        false,
    );
    let unmounted = std::process::Command::new("umount").arg(&small).status();
    match result {
        Err(Error::NotEnoughSpace { needed, free, .. }) => assert!(needed > free),
        other => panic!("expected NotEnoughSpace, got {other:?}"),
    }
    assert_eq!(env.server.stats().requests, 0);
    assert!(unmounted.unwrap().success());
}

#[tokio::test]
async fn bandwidth_cap_is_roughly_respected() {
    let mut env = Env::new().await;
    let build = build(32, 20, 1 << 20, Format::Tar);
    env.server.add("/b", build.archive.clone());
    env.settings.bandwidth_limit = Some(4 << 20);
    let started = Instant::now();
    let (_slot, result) = env.fetch(&env.spec(&build, &["/b"], Format::Tar)).await;
    result.unwrap();
    let secs = started.elapsed().as_secs_f64();
    let expected = build.archive.len() as f64 / (4 << 20) as f64;
    assert!(
        secs >= expected * 0.6,
        "{} bytes at 4 MiB/s took {secs:.3}s",
        build.archive.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpack_overlaps_the_download() {
    let mut env = Env::new().await;
    let build = build(33, 200, 4 << 20, Format::Tar);
    env.server.add("/b", build.archive.clone());
    env.server.set_fault(FaultRule::always(Fault::Trickle {
        bytes_per_sec: 2 << 20,
    }));
    let spec = env.spec(&build, &["/b"], Format::Tar);
    let slot = env.slot();
    let progress = Arc::new(Progress::default());
    let watcher = {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let s = progress.snapshot();
                if s.entries > 0 && s.bytes_total > 0 {
                    return s.bytes_downloaded < s.bytes_total;
                }
            }
        })
    };
    fetch_and_unpack(
        &env.client,
        &spec,
        &env.cache,
        env.cache.lookup(&spec.sha256),
        &slot,
        &env.settings,
        &UnpackLimits::default(),
        progress,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(
        watcher.await.unwrap(),
        "entries were written before the download finished"
    );
}

#[tokio::test]
async fn file_urls_only_when_allowed() {
    let mut env = Env::new().await;
    let build = build(34, 20, 200_000, FORMAT);
    let path = env.root.join("b.tar.gz");
    std::fs::write(&path, &build.archive).unwrap();
    let mut spec = env.spec(&build, &[], FORMAT);
    spec.urls = vec![format!("file://{}", path.display())];
    match env.fetch(&spec).await.1 {
        Err(Error::InvalidArtifact { .. }) => {}
        other => panic!("expected InvalidArtifact, got {other:?}"),
    }
    env.settings.allow_file_urls = true;
    let (slot, result) = env.fetch(&spec).await;
    result.unwrap();
    assert_unpacked(&slot, &build);
}

#[tokio::test]
async fn unsafe_archive_is_refused_even_when_the_digest_matches() {
    let mut env = Env::new().await;
    let archive = tar_of(|b| file(b, "../x", b"x"));
    let build = Build {
        sha256: Sha256Sum::from_bytes(Sha256::digest(&archive).into()),
        archive,
        files: Vec::new(),
    };
    env.server.add("/b", build.archive.clone());
    let (_slot, result) = env.fetch(&env.spec(&build, &["/b"], Format::Tar)).await;
    assert!(
        matches!(result, Err(Error::UnsafeArchive { .. })),
        "{result:?}"
    );
    assert!(!env.root.join("x").exists());
}

#[tokio::test]
async fn progress_reaches_the_totals() {
    let mut env = Env::new().await;
    let build = build(35, 40, 500_000, FORMAT);
    env.server.add("/b", build.archive.clone());
    let spec = env.spec(&build, &["/b"], FORMAT);
    let slot = env.slot();
    let progress = Arc::new(Progress::default());
    let outcome = fetch_and_unpack(
        &env.client,
        &spec,
        &env.cache,
        env.cache.lookup(&spec.sha256),
        &slot,
        &env.settings,
        &UnpackLimits::default(),
        Arc::clone(&progress),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let s = progress.snapshot();
    assert_eq!(s.bytes_total, build.archive.len() as u64);
    assert_eq!(s.bytes_downloaded, s.bytes_total);
    assert_eq!(s.bytes_unpacked_input, s.bytes_total);
    assert_eq!(s.bytes_written, outcome.stats.bytes_written);
    assert!(s.entries >= 40);
}

#[tokio::test]
async fn artifact_server_speaks_http_ranges() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk.bin"), vec![7u8; 1000]).unwrap();
    let server = ArtifactServer::start_with_dir(dir.path()).await.unwrap();
    server.add("/mem.bin", (0..=255u8).collect::<Vec<u8>>());
    let client = reqwest::Client::new();

    let head = client.head(server.url("/mem.bin")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["accept-ranges"], "bytes");
    assert_eq!(head.headers()["content-length"], "256");

    let part = client
        .get(server.url("/mem.bin"))
        .header("Range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 10-19/256");
    assert_eq!(
        part.bytes().await.unwrap().to_vec(),
        (10..20u8).collect::<Vec<_>>()
    );

    let bad = client
        .get(server.url("/mem.bin"))
        .header("Range", "bytes=300-")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 416);
    assert_eq!(bad.headers()["content-range"], "bytes */256");

    let disk = client.get(server.url("/disk.bin")).send().await.unwrap();
    assert_eq!(disk.bytes().await.unwrap().len(), 1000);
    let escape = client
        .get(server.url("/../etc/passwd"))
        .send()
        .await
        .unwrap();
    assert_eq!(escape.status(), 404);

    server.set_fault(FaultRule::times(Fault::NotFound, 1).on_path("/mem.bin"));
    let first = client.get(server.url("/mem.bin")).send().await.unwrap();
    assert_eq!(first.status(), 404);
    let other = client.get(server.url("/disk.bin")).send().await.unwrap();
    assert_eq!(other.status(), 200, "the fault is for one path only");
    let again = client.get(server.url("/mem.bin")).send().await.unwrap();
    assert_eq!(again.status(), 200, "the fault was for one request only");
    let stats = server.stats();
    assert_eq!(stats.requests, 8);
    assert_eq!(stats.partial_responses, 1);
}

/// Throughput figure, not a gate: `cargo test --release -p deploy-agent-tests
/// --test fetch -- --ignored --nocapture end_to_end_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn end_to_end_throughput() {
    let mut env = Env::new().await;
    let files = 3000;
    let tar = php_tree(5, files, |i| format!("vendor/p{}/src/F{i}.php", i % 40));
    let archive = compress(&tar, Format::TarGz);
    let build = Build {
        sha256: Sha256Sum::from_bytes(Sha256::digest(&archive).into()),
        archive,
        files: Vec::new(),
    };
    env.server.add("/b", build.archive.clone());
    let spec = env.spec(&build, &["/b"], FORMAT);
    let started = Instant::now();
    let (_slot, result) = env.fetch(&spec).await;
    let outcome = result.unwrap();
    let total = started.elapsed().as_secs_f64();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("");
    eprintln!(
        "{} files, {:.1} MB archive, {:.1} MB unpacked: download {:?}, done {:?}, {:.0} files/s ({hwm}, includes the in-memory server and archive)",
        outcome.stats.files,
        build.archive.len() as f64 / 1e6,
        outcome.stats.bytes_written as f64 / 1e6,
        outcome.download_time,
        outcome.unpack_time,
        outcome.stats.files as f64 / total
    );
}

/// Issue 13, item 2: pruning after one deploy must never delete what the
/// next deploy uses. Before the cache had one owner, a prune running next
/// to a deploy deleted its `<sha>.partial` (ENOENT, resume state lost) and
/// sometimes the complete artifact it had just looked up.
#[test]
fn prune_never_touches_a_pinned_artifact_or_partial() {
    let dir = deploy_agent_tests::fast_tempdir();
    let cache = deploy_agent::artifact::ArtifactCache::new(dir.path(), 1).unwrap();
    let sha = |c: char| c.to_string().repeat(64);
    // Three complete artifacts, oldest first; keep = 1.
    for (i, c) in ['a', 'b', 'c'].into_iter().enumerate() {
        std::fs::write(dir.path().join(sha(c)), b"x").unwrap();
        let t = std::time::SystemTime::now() - Duration::from_secs(100 - i as u64);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join(sha(c)))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    // The next deploy pins `a` (an old artifact it just looked up) and
    // `d` (its download in progress).
    let pin_a = cache.pin(&sha('a').parse().unwrap());
    let pin_d = cache.pin(&sha('d').parse().unwrap());
    std::fs::write(dir.path().join(format!("{}.partial", sha('d'))), b"part").unwrap();
    std::fs::write(dir.path().join(format!("{}.progress", sha('d'))), b"{}").unwrap();
    std::fs::write(dir.path().join(format!("{}.partial", sha('e'))), b"stale").unwrap();
    // A prune for the deploy that just finished (live build `c`) runs
    // many times while the next one works.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..50 {
                    cache.prune(Some(&sha('c'))).unwrap();
                }
            });
        }
    });
    let exists = |n: String| dir.path().join(n).exists();
    assert!(exists(sha('a')), "a pinned artifact was pruned");
    assert!(
        exists(format!("{}.partial", sha('d'))),
        "the next deploy's partial was pruned"
    );
    assert!(exists(format!("{}.progress", sha('d'))));
    assert!(exists(sha('c')), "the live build was pruned");
    assert!(!exists(sha('b')), "an unused old artifact was kept");
    assert!(
        !exists(format!("{}.partial", sha('e'))),
        "a stale partial was kept"
    );
    drop((pin_a, pin_d));
    cache.prune(Some(&sha('c'))).unwrap();
    assert!(!exists(sha('a')) && !exists(format!("{}.partial", sha('d'))));
}
