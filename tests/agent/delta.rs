//! Delta deploys: a host running the base build downloads only the delta,
//! reuses the unchanged files of its hot slot (reflink or copy, never a
//! shared inode) and ends with a cold slot
//! bit-identical (paths, types, modes, mtimes, contents, link targets) to a
//! full unpack; a base edited in place, or a delta made for another base,
//! makes it download the full artifact instead; a SIGKILL in the middle of a
//! delta deploy recovers like one in a full deploy; a base in the cold
//! slot serves as well as one in the hot slot, and one found only in the
//! artifact cache saves the download.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use deploy_agent::manifest::DeltaSpec;
use deploy_agent_tests::agent::Harness;
use deploy_agent_tests::agent_bin;
use deploy_agent_tests::process::{spawn_run, wait_served, write_config};
use deploy_agent_tests::slots::{build, delta, full_unpack, live_slot, manifest, tree, Build};
use testkit::buildgen::BuildProfile;
use testkit::testserver::artifact::{Fault, FaultRule};

const LIMIT: Duration = Duration::from_secs(60);

/// `(b1 live, b2 served with a delta from b1)`.
async fn live_with_delta(profile: BuildProfile) -> (Harness, Build, Build, DeltaSpec, String) {
    deploy_agent_tests::agent::capture_logs();
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let dir = h.tmp.path().to_path_buf();
    let b1 = build(&dir, &h.artifacts, "b1", profile);
    let b2 = build(&dir, &h.artifacts, "b2", profile);
    h.publish(&manifest(&h.artifacts, &b1, None));
    h.wait_live("b1", LIMIT).await;
    let (d, delta_path) = delta(&dir, &h.artifacts, &b1, &b2);
    (h, b1, b2, d, delta_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_deploy_downloads_what_changed_and_matches_a_full_unpack() {
    let (h, _b1, b2, d, _) = live_with_delta(BuildProfile::DEMO).await;
    h.artifacts.reset_stats();
    h.publish(&manifest(&h.artifacts, &b2, Some(&d)));
    let rec = h.wait_live("b2", LIMIT).await;
    assert!(rec.from_delta, "{rec:?}");
    let sent = h.artifacts.stats().bytes_sent;
    assert_eq!(sent, d.size, "only the delta is downloaded");
    assert!(
        d.size * 20 < b2.artifact.size,
        "delta {} bytes for a {} byte artifact",
        d.size,
        b2.artifact.size
    );
    let live = live_slot(&h.root);
    let reference = full_unpack(h.tmp.path(), &b2);
    assert_eq!(
        tree(&live),
        tree(&reference),
        "the delta-built slot differs from a full unpack"
    );
    // No file is the base slot's inode (issue 20: a write to one slot
    // must never change the other); the unchanged files were reused by
    // reflink or copy, not written from the delta.
    let base = h.root.join(if live.ends_with("slot-a") {
        "slot-b"
    } else {
        "slot-a"
    });
    let shared_inodes = tree(&live)
        .keys()
        .filter(|p| {
            let m = std::fs::symlink_metadata(live.join(p)).unwrap();
            let b = std::fs::symlink_metadata(base.join(p));
            m.is_file() && b.is_ok_and(|b| b.ino() == m.ino())
        })
        .count();
    assert_eq!(
        shared_inodes, 0,
        "files sharing an inode with the base slot"
    );
    let logs = deploy_agent_tests::agent::captured_logs();
    assert!(logs.contains("delta applied"), "{logs}");
    // The history says which deploys came from a delta.
    let out = std::process::Command::new(agent_bin())
        .args(["history", "--json", "--socket"])
        .arg(h.tmp.path().join("agent.sock"))
        .output()
        .unwrap();
    let hist: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hist[0]["build"], "b2");
    assert_eq!(hist[0]["from_delta"], true, "{hist}");
    assert_eq!(hist[1]["from_delta"], false, "{hist}");
}

/// The base in the cold slot: b1 then b2 live (b1 now cold), and the next
/// build is published as a delta from b1, as after a rollback and a fix
/// made against the build before. The claim keeps b1's files aside, the
/// delta links from them, and they go to the trash afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_in_the_cold_slot_is_used_too() {
    let (h, b1, b2, _, _) = live_with_delta(BuildProfile::TINY).await;
    h.publish(&manifest(&h.artifacts, &b2, None));
    h.wait_live("b2", LIMIT).await;
    let dir = h.tmp.path().to_path_buf();
    let b3 = build(&dir, &h.artifacts, "b3", BuildProfile::TINY);
    let (d, _) = delta(&dir, &h.artifacts, &b1, &b3);
    h.artifacts.reset_stats();
    h.publish(&manifest(&h.artifacts, &b3, Some(&d)));
    let rec = h.wait_live("b3", LIMIT).await;
    assert!(rec.from_delta, "{rec:?}");
    assert_eq!(h.artifacts.stats().bytes_sent, d.size);
    let reference = full_unpack(h.tmp.path(), &b3);
    assert_eq!(tree(&live_slot(&h.root)), tree(&reference));
    // Nothing is left in .deploy/kept once the deploy is over.
    let kept: Vec<_> = std::fs::read_dir(h.root.join(".deploy/kept"))
        .unwrap()
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
}

/// `b`'s artifact with the first byte of every non-empty file flipped,
/// re-compressed: a valid archive that is no longer the build.
fn tampered_copy(b: &Build) -> Vec<u8> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&b.path).unwrap(),
    ));
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut out = tar::Builder::new(gz);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut header = entry.header().clone();
        let path = entry.path().unwrap().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        if header.entry_type().is_file() && !data.is_empty() {
            data[0] ^= 0xff;
        }
        if let Some(target) = entry.link_name().unwrap() {
            out.append_link(&mut header, &path, target).unwrap();
        } else {
            out.append_data(&mut header, &path, &data[..]).unwrap();
        }
    }
    out.into_inner().unwrap().finish().unwrap()
}

/// The base is in neither slot, only in the artifact cache (cache-keep 10,
/// b1..b3 deployed in turn, so the slots hold b3 and b2): the agent still
/// downloads only the delta and writes the shared files from the cached
/// base artifact, each checked against the index. A cached base that is not
/// the build any more makes it use the full artifact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_only_in_the_artifact_cache_is_used_too() {
    deploy_agent_tests::agent::capture_logs();
    let mut h = Harness::new(|c| c.download.cache_keep = 10).await;
    h.start_agent().await;
    let dir = h.tmp.path().to_path_buf();
    let b: Vec<Build> = ["c1", "c2", "c3", "c4", "c5"]
        .iter()
        .map(|id| build(&dir, &h.artifacts, id, BuildProfile::TINY))
        .collect();
    for x in &b[..3] {
        h.publish(&manifest(&h.artifacts, x, None));
        h.wait_live(&x.id, LIMIT).await;
    }
    let cached = |x: &Build| h.root.join(".deploy/cache").join(&x.artifact.sha256);
    assert!(cached(&b[0]).is_file() && cached(&b[1]).is_file());

    // c1's cached artifact no longer holds c1: the delta is refused.
    std::fs::write(cached(&b[0]), tampered_copy(&b[0])).unwrap();
    let (d, _) = delta(&dir, &h.artifacts, &b[0], &b[3]);
    h.publish(&manifest(&h.artifacts, &b[3], Some(&d)));
    let rec = h.wait_live("c4", LIMIT).await;
    assert!(!rec.from_delta, "a tampered cached base must not be used");
    let logs = deploy_agent_tests::agent::captured_logs();
    let refusal = logs.lines().find(|l| {
        l.contains("is not the base build's") && l.contains(&format!("{}/", b[0].artifact.sha256))
    });
    assert!(refusal.is_some(), "{logs}");
    assert_eq!(tree(&live_slot(&h.root)), tree(&full_unpack(&dir, &b[3])));

    // The slots hold c4 and c3; c2 is only in the cache.
    let (d, _) = delta(&dir, &h.artifacts, &b[1], &b[4]);
    h.artifacts.reset_stats();
    h.publish(&manifest(&h.artifacts, &b[4], Some(&d)));
    let rec = h.wait_live("c5", LIMIT).await;
    assert!(rec.from_delta, "{rec:?}");
    assert_eq!(h.artifacts.stats().bytes_sent, d.size);
    let logs = deploy_agent_tests::agent::captured_logs();
    assert!(
        logs.contains("shared files written from the cached base artifact"),
        "{logs}"
    );
    assert_eq!(tree(&live_slot(&h.root)), tree(&full_unpack(&dir, &b[4])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_file_edited_in_place_makes_the_agent_write_the_full_build() {
    let (h, _b1, b2, d, _) = live_with_delta(BuildProfile::TINY).await;
    // Someone edits a file the delta would reuse, in the live slot.
    let live = live_slot(&h.root);
    let victim = live.join("app/assets/a0000.bin");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    h.artifacts.reset_stats();
    h.publish(&manifest(&h.artifacts, &b2, Some(&d)));
    let rec = h.wait_live("b2", LIMIT).await;
    assert!(
        !rec.from_delta,
        "the delta must not be used on a changed base"
    );
    assert!(
        h.artifacts.stats().bytes_sent >= b2.artifact.size,
        "the full artifact is downloaded"
    );
    let logs = deploy_agent_tests::agent::captured_logs();
    assert!(logs.contains("is not the base build's"), "{logs}");
    let reference = full_unpack(h.tmp.path(), &b2);
    assert_eq!(tree(&live_slot(&h.root)), tree(&reference));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_made_for_another_base_is_refused_and_the_full_artifact_used() {
    let (h, b1, b2, _, _) = live_with_delta(BuildProfile::TINY).await;
    let dir = h.tmp.path().to_path_buf();
    let b0 = build(&dir, &h.artifacts, "b0", BuildProfile::TINY);
    // Made from b0, but the manifest claims it applies to b1 (which is live).
    let (mut wrong, _) = delta(&dir, &h.artifacts, &b0, &b2);
    wrong.base = b1.artifact.sha256.parse().unwrap();
    h.publish(&manifest(&h.artifacts, &b2, Some(&wrong)));
    let rec = h.wait_live("b2", LIMIT).await;
    assert!(!rec.from_delta);
    let logs = deploy_agent_tests::agent::captured_logs();
    assert!(logs.contains("delta artifact refused"), "{logs}");
    let reference = full_unpack(h.tmp.path(), &b2);
    assert_eq!(tree(&live_slot(&h.root)), tree(&reference));
}

/// The real binary, killed with SIGKILL in the middle of delta deploys
/// (the delta trickles, so the kill lands in its download or its apply):
/// after every restart the interrupted deploy completes, and the live slot
/// is exactly what a full unpack of the build gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_delta_deploys_recovers_like_a_full_deploy() {
    let bin = tokio::task::spawn_blocking(agent_bin).await.unwrap();
    let h = Harness::new(|_| {}).await;
    let dir = h.tmp.path().to_path_buf();
    let root = dir.join("root");
    let config = write_config(
        &dir,
        &root,
        &h.consul.url(),
        "wait = \"5s\"\nfirst-request-splay = \"0s\"\nrate-burst = 50\nrate-interval = \"20ms\"",
        "[source]\nkey = \"deploy/app/delta\"\n[download]\nread-timeout = \"3s\"\n",
    );
    let log = dir.join("agent.log");
    let publish = |m: String| h.consul.put("deploy/app/delta", m.as_bytes());
    let mut child = spawn_run(&bin, &config, &log);
    let mut prev = build(&dir, &h.artifacts, "k0", BuildProfile::DEMO);
    publish(manifest(&h.artifacts, &prev, None));
    wait_served(&root, "k0", LIMIT, &log).await;
    let mut by_delta = 0;
    for i in 1..=4u64 {
        let next = build(&dir, &h.artifacts, &format!("k{i}"), BuildProfile::DEMO);
        let (d, delta_path) = delta(&dir, &h.artifacts, &prev, &next);
        h.artifacts.set_fault(
            FaultRule::always(Fault::Trickle {
                bytes_per_sec: d.size * 3,
            })
            .on_path(delta_path),
        );
        publish(manifest(&h.artifacts, &next, Some(&d)));
        tokio::time::sleep(Duration::from_millis(100 + 80 * i)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Whatever was interrupted, a complete build serves.
        let served = std::fs::read_to_string(root.join("current/BUILD")).unwrap();
        assert!(served == prev.id || served == next.id, "serving {served:?}");
        h.artifacts.clear_faults();
        child = spawn_run(&bin, &config, &log);
        wait_served(&root, &next.id, LIMIT, &log).await;
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join(".deploy/deploy.json")).unwrap())
                .unwrap();
        if record["from_delta"] == true {
            by_delta += 1;
        }
        let reference = full_unpack(&dir, &next);
        assert_eq!(tree(&live_slot(&root)), tree(&reference), "k{i}");
        prev = next;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        by_delta >= 3,
        "only {by_delta} of 4 deploys used their delta"
    );
}

/// Rewrites `b`'s artifact as `tar -C <tree> -czf <artifact> .` writes it:
/// every path starts with `./`, the commonest way builds are packed.
fn packed_by_tar_cli(h: &Harness, b: &mut Build) {
    let tree = h.tmp.path().join(format!("{}-tree", b.id));
    std::fs::create_dir_all(&tree).unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("tar")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tar {args:?}: {out:?}");
    };
    run(&[
        "-xzf".as_ref(),
        b.path.as_os_str(),
        "-C".as_ref(),
        tree.as_os_str(),
    ]);
    run(&[
        "-C".as_ref(),
        tree.as_os_str(),
        "-czf".as_ref(),
        b.path.as_os_str(),
        ".".as_ref(),
    ]);
    let (sha256, size) = deploy_agent::artifact::sha256::hash_file(&b.path).unwrap();
    (b.artifact.sha256, b.artifact.size) = (sha256.to_string(), size);
    h.artifacts
        .add(&b.url_path, std::fs::read(&b.path).unwrap());
}

/// Found by hand (issue 20's scenario with `tar -C dir .` artifacts): the
/// delta recorded its reused files as `./app/x` while the slot holds
/// `app/x`, so the fresh slot looked changed in every shared file, and the
/// base record was never found, so every shared file was hashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_with_dot_slash_paths_give_an_intact_slot_proven_by_stat() {
    deploy_agent_tests::agent::capture_logs();
    let mut h = Harness::new(|_| {}).await;
    h.start_agent().await;
    let dir = h.tmp.path().to_path_buf();
    let mut b1 = build(&dir, &h.artifacts, "b1", BuildProfile::TINY);
    let mut b2 = build(&dir, &h.artifacts, "b2", BuildProfile::TINY);
    packed_by_tar_cli(&h, &mut b1);
    packed_by_tar_cli(&h, &mut b2);
    h.publish(&manifest(&h.artifacts, &b1, None));
    h.wait_live("b1", LIMIT).await;
    // b1's record complete (hashed after its deploy): from here a stat
    // proves each of its files.
    deploy_agent_tests::wait_until_async("b1's digests filled in", LIMIT, || async {
        let logs = deploy_agent_tests::agent::captured_logs();
        match logs.contains("slot record digests filled in") {
            true => Ok(()),
            false => Err(logs),
        }
    })
    .await;
    let (d, _) = delta(&dir, &h.artifacts, &b1, &b2);
    h.publish(&manifest(&h.artifacts, &b2, Some(&d)));
    let rec = h.wait_live("b2", LIMIT).await;
    assert!(rec.from_delta, "{rec:?}");
    assert_eq!(tree(&live_slot(&h.root)), tree(&full_unpack(&dir, &b2)));
    let logs = deploy_agent_tests::agent::captured_logs();
    let applied = logs
        .lines()
        .find(|l| l.contains("delta applied"))
        .unwrap_or_else(|| panic!("{logs}"));
    assert!(applied.contains(" hashed=0 "), "{applied}");
    let out = std::process::Command::new(agent_bin())
        .args(["verify", "--socket"])
        .arg(h.tmp.path().join("agent.sock"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("holds exactly build b2"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
