//! Fault matrix, SIGKILL: the real `deploy-agent run` binary is killed at
//! random points across 100 deploys (uncompressed tar builds) (some trickled so the kill
//! lands mid-download). After every kill `current` resolves to a complete
//! build whose ready-marker's sha256 is the one published for it (file
//! content checked against that build's archive), `DeployRoot::open`'s
//! recovery agrees, and after the restart the interrupted deploy completes,
//! reusing the bytes already downloaded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deploy_agent::manifest::Format;
use deploy_agent_tests::agent_bin;
use deploy_agent_tests::process::{spawn_run, wait_served, write_config};
use rand::{Rng, SeedableRng};
use testkit::buildgen::{self, Artifact, BuildProfile};
use testkit::testserver::artifact::{ArtifactServer, Fault, FaultRule};
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig};

const KEY: &str = "deploy/app/kill";
const DEPLOYS: usize = 100;

/// Every regular file of the archive at `archive` has the same bytes in
/// `slot`. Returns a description of the first difference.
fn slot_matches_archive(slot: &Path, archive: &Path) -> Result<(), String> {
    let f = std::fs::File::open(archive).unwrap();
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    let mut files = 0;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if !e.header().entry_type().is_file() {
            continue;
        }
        let rel = e.path().unwrap().into_owned();
        let mut want = Vec::new();
        e.read_to_end(&mut want).unwrap();
        let got = std::fs::read(slot.join(&rel))
            .map_err(|err| format!("{}: {err}", slot.join(&rel).display()))?;
        if got != want {
            return Err(format!(
                "{}: content differs from the archive",
                rel.display()
            ));
        }
        files += 1;
    }
    if files == 0 {
        return Err("archive has no files".into());
    }
    Ok(())
}

struct Published {
    artifact: Artifact,
    archive: PathBuf,
}

/// After a kill: `current` is a complete, verified build and recovery
/// agrees. Returns the build served.
fn check_after_kill(root: &Path, builds: &HashMap<String, Published>) -> Option<String> {
    let current = root.join("current");
    let served_link = std::fs::read_link(&current).ok();
    let build = std::fs::read_to_string(current.join("BUILD")).ok();
    // Open the root as the next agent would (it locks and recovers).
    let (dr, report) = swapper::DeployRoot::open(root).unwrap();
    let served = dr.served().unwrap();
    match (build, served) {
        (None, None) => {
            assert!(served_link.is_none(), "current dangles: {served_link:?}");
            None
        }
        (Some(b), Some(slot)) => {
            let m = dr
                .marker(slot)
                .unwrap_or_else(|| panic!("{slot} serves {b} without a marker: {report:?}"));
            assert_eq!(m.build.build_id, b, "marker and BUILD disagree");
            let p = builds
                .get(&b)
                .unwrap_or_else(|| panic!("unknown build {b}"));
            assert_eq!(
                m.build.sha256.as_deref(),
                Some(p.artifact.sha256.as_str()),
                "marker sha256 of {b}"
            );
            assert_eq!(dr.hot(), Some(slot), "recovery's hot slot agrees");
            if let Err(e) = slot_matches_archive(&dr.slot_path(slot), &p.archive) {
                panic!("{b} in {slot} is not complete: {e}");
            }
            Some(b)
        }
        (b, s) => panic!("current/BUILD {b:?} but served slot {s:?} ({report:?})"),
    }
}

/// The bytes a partial's sidecar (`<sha256>.progress`: a `v1 <size>
/// <chunk>` header, then the bytes present from each chunk's start) says
/// are in the partial; 0 without one.
fn persisted_progress(sidecar: &std::path::Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(sidecar) else {
        return 0;
    };
    text.lines()
        .skip(1)
        .filter_map(|l| l.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_across_100_deploys() {
    let bin = tokio::task::spawn_blocking(agent_bin).await.unwrap();
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let artifacts = ArtifactServer::start().await.unwrap();
    let tmp = deploy_agent_tests::fast_tempdir();
    let root = tmp.path().join("srv/app");
    // Faster than the shipped defaults, so 100 deploys and restarts fit in
    // one test: no splay, a larger watch bucket, a short read timeout and
    // cold-slot deadline.
    let config = write_config(
        tmp.path(),
        &root,
        &consul.url(),
        "wait = \"5s\"\nfirst-request-splay = \"0s\"\nrate-burst = 50\nrate-interval = \"20ms\"",
        &format!(
            "[source]\nkey = \"{KEY}\"\n[download]\nread-timeout = \"3s\"\nretries = 3\n\
             [drain]\ncold-deadline = \"2s\""
        ),
    );
    let log = tmp.path().join("agent.log");
    let seed: u64 = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("KILL_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut builds: HashMap<String, Published> = HashMap::new();
    let mut child = spawn_run(&bin, &config, &log);
    let (mut kills, mut mid_download, mut resumable, mut reused) = (0, 0, 0, 0);
    let started = Instant::now();
    for i in 0..DEPLOYS {
        let id = format!("k{i}");
        let archive = tmp.path().join(format!("{id}.tar"));
        let artifact = tokio::task::block_in_place(|| {
            buildgen::write_build(BuildProfile::TINY, i as u64, &id, Format::Tar, &archive).unwrap()
        });
        let url_path = format!("/b/{id}.tar");
        artifacts.add(&url_path, std::fs::read(&archive).unwrap());
        let trickled = i % 3 == 0;
        if trickled {
            // Slow enough that a kill lands mid-download.
            artifacts.set_fault(
                FaultRule::always(Fault::Trickle {
                    bytes_per_sec: artifact.size * 2,
                })
                .on_path(url_path.clone()),
            );
        }
        let manifest =
            buildgen::manifest_json(&id, &artifacts.url(&url_path), &artifact, Format::Tar);
        builds.insert(id.clone(), Published { artifact, archive });
        consul.put(KEY, manifest.as_bytes());
        let kill = rng.gen_bool(0.7);
        if kill {
            let delay = if trickled {
                rng.gen_range(50..450)
            } else {
                rng.gen_range(0..200)
            };
            tokio::time::sleep(Duration::from_millis(delay)).await;
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            kills += 1;
            let sha = &builds[&id].artifact.sha256;
            let partial = root.join(".deploy/cache").join(format!("{sha}.partial"));
            let had_partial = partial.exists();
            let persisted = persisted_progress(&partial.with_extension("progress"));
            let served = tokio::task::block_in_place(|| check_after_kill(&root, &builds));
            if i > 0 {
                assert!(served.is_some(), "after deploy #{i} something must serve");
            }
            let sent_before = artifacts.stats().bytes_sent;
            child = spawn_run(&bin, &config, &log);
            wait_served(&root, &id, Duration::from_secs(60), &log).await;
            if served.as_deref() != Some(id.as_str()) && had_partial {
                mid_download += 1;
                let resent = artifacts.stats().bytes_sent - sent_before;
                // Progress is persisted every few MB and when an attempt
                // stops, not per byte: whether a SIGKILL of these small
                // builds finds any is chance (a run failed "no restart
                // reused downloaded bytes" with none to reuse). A kill that
                // found progress recorded must not download it all again.
                if persisted > 0 {
                    resumable += 1;
                    if resent < builds[&id].artifact.size {
                        reused += 1;
                    }
                }
            }
        } else {
            wait_served(&root, &id, Duration::from_secs(60), &log).await;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let last = tokio::task::block_in_place(|| check_after_kill(&root, &builds));
    assert_eq!(last.as_deref(), Some(format!("k{}", DEPLOYS - 1).as_str()));
    println!(
        "{DEPLOYS} deploys, {kills} SIGKILLs, {mid_download} mid-download, {resumable} with progress recorded, {reused} resumed with fewer bytes than the artifact, in {:?}",
        started.elapsed()
    );
    assert!(kills >= 50, "{kills} kills");
    assert!(
        mid_download >= 5,
        "only {mid_download} kills landed mid-download"
    );
    assert!(
        resumable == 0 || reused >= 1,
        "{resumable} kills found progress recorded, no restart reused it (KILL_SEED={seed})"
    );

    // Nothing grows the disk across all of this: at most cache-keep
    // artifacts plus the last partial, and nothing in the trash beyond
    // what the last kill may have left before its deploy's cleanup.
    let cache: Vec<_> = std::fs::read_dir(root.join(".deploy/cache"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(cache.len() <= 4, "cache grew: {cache:?}");
}
