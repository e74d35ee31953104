//! The publisher's file index (issue 20): `release index` writes every
//! file's sha256 beside the artifact, `release publish --index-url` commits
//! the manifest to it, and the agent takes its slot records' digests from
//! it instead of hashing the slot after the deploy. A missing or wrong
//! index costs that hashing, never the deploy. All with the real binary.

use std::path::{Path, PathBuf};
use std::process::Child;

use deploy_agent::integrity::{FileIndex, SlotRecord};
use deploy_agent::manifest::Sha256Sum;
use deploy_agent_tests::process::{spawn_run, wait_served, write_config};
use deploy_agent_tests::slots::{build, live_slot, Build};
use deploy_agent_tests::{agent_bin, wait_until_async, DEADLINE};
use testkit::buildgen::BuildProfile;
use testkit::testserver::artifact::{ArtifactServer, Fault, FaultRule};
use testkit::testserver::consul::ConsulServer;

/// A real agent process watching `deploy/app/production`, its servers
/// and its directories.
struct Host {
    tmp: tempfile::TempDir,
    root: PathBuf,
    log: PathBuf,
    consul: ConsulServer,
    artifacts: ArtifactServer,
    child: Child,
}

impl Host {
    async fn start() -> Host {
        let consul = ConsulServer::start(Default::default()).await.unwrap();
        let artifacts = ArtifactServer::start().await.unwrap();
        let tmp = deploy_agent_tests::fast_tempdir();
        let root = tmp.path().join("root");
        let config = write_config(
            tmp.path(),
            &root,
            &consul.url(),
            "first-request-splay = \"0s\"",
            "[source]\nkey = \"deploy/app/production\"\n",
        );
        let log = tmp.path().join("agent.log");
        let bin = tokio::task::spawn_blocking(agent_bin).await.unwrap();
        let child = spawn_run(&bin, &config, &log);
        Host {
            tmp,
            root,
            log,
            consul,
            artifacts,
            child,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `deploy-agent release ...`, which must succeed; returns stdout.
    fn release(&self, args: &[&str]) -> String {
        let out = deploy_agent_tests::host::release(&self.consul.url(), args);
        String::from_utf8(out.stdout).unwrap()
    }

    /// `release index`, then the index served at `/i/<build>`.
    fn index(&self, b: &Build) -> String {
        let artifact = b.path.display().to_string();
        let said = self.release(&["index", "--artifact", &artifact]);
        assert!(said.contains("files"), "{said}");
        let url_path = format!("/i/{}", b.id);
        let written = PathBuf::from(format!("{artifact}.index.json.zst"));
        self.artifacts
            .add(&url_path, std::fs::read(written).unwrap());
        self.artifacts.url(&url_path)
    }

    /// `release publish` of `b`, with `extra` arguments.
    fn publish(&self, b: &Build, extra: &[&str]) {
        let artifact = b.path.display().to_string();
        let url = self.artifacts.url(&b.url_path);
        let mut args = vec![
            "publish",
            "--build",
            &b.id,
            "--artifact",
            &artifact,
            "--url",
            &url,
        ];
        args.extend_from_slice(extra);
        self.release(&args);
    }

    /// The record of the live slot, as written before its marker.
    fn live_record(&self) -> SlotRecord {
        let live = live_slot(&self.root);
        let slot = live.file_name().unwrap().to_string_lossy().into_owned();
        let name = slot.strip_prefix("slot-").unwrap();
        SlotRecord::load(&self.root.join(format!(".deploy/slot-{name}.record")))
            .unwrap()
            .expect("the live slot has a record")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file of `record` has its digest, and it is the file's sha256 in
/// `slot`.
fn every_digest_is_the_files(record: &SlotRecord, slot: &Path) -> usize {
    let files: Vec<_> = record
        .entries
        .iter()
        .filter(|e| e.stat.kind == deploy_agent::integrity::Kind::File)
        .collect();
    for e in &files {
        assert!(e.known, "{} has no digest", e.path.display());
        let (sha, _) = deploy_agent::artifact::sha256::hash_file(&slot.join(&e.path)).unwrap();
        assert_eq!(e.sha256(), sha, "{}", e.path.display());
    }
    files.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_published_with_its_index_is_recorded_from_it_not_hashed() {
    let h = Host::start().await;
    let b1 = build(h.dir(), &h.artifacts, "b1", BuildProfile::TINY);
    let index_url = h.index(&b1);
    h.publish(&b1, &["--index-url", &index_url]);
    wait_served(&h.root, "b1", DEADLINE, &h.log).await;

    // The record the deploy wrote before the marker already has every
    // digest: nothing was left to hash.
    let record = h.live_record();
    let files = every_digest_is_the_files(&record, &live_slot(&h.root));
    assert!(files > 10, "{files} files");
    let log = h.log();
    assert!(
        log.contains("file digests from the publisher's index")
            && log.contains(&format!("filled={files}")),
        "{log}"
    );
    assert!(!log.contains("slot record digests filled in"), "{log}");
    // The index was read once into the record, not kept in the cache.
    let sha = Sha256Sum::parse(&b1.artifact.sha256).unwrap();
    let cached: Vec<_> = std::fs::read_dir(h.root.join(".deploy/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached, [sha.to_string()], "{cached:?}");

    // b2 from a delta, its index still downloading when the delta is
    // committed to the cache (whose prune deletes unpinned partials):
    // the index must survive that and give b2's record its digests too.
    let b2 = build(h.dir(), &h.artifacts, "b2", BuildProfile::TINY);
    let index_url = h.index(&b2);
    let index_size = std::fs::metadata(format!("{}.index.json.zst", b2.path.display()))
        .unwrap()
        .len();
    h.artifacts.set_fault(
        FaultRule::always(Fault::Trickle {
            bytes_per_sec: index_size / 2 + 1,
        })
        .on_path("/i/b2".to_string()),
    );
    let delta_url = h.artifacts.url("/d/b2.delta.tar.zst");
    let b1_artifact = b1.path.display().to_string();
    // Published to a tier this host does not watch, so the delta the
    // publish writes can be served before the host sees the manifest.
    h.publish(
        &b2,
        &[
            "--key",
            "deploy/app/staging",
            "--index-url",
            &index_url,
            "--delta-from",
            &b1_artifact,
            "--delta-url",
            &delta_url,
        ],
    );
    let delta_file = format!("{}.delta.tar.zst", b2.path.display());
    h.artifacts
        .add("/d/b2.delta.tar.zst", std::fs::read(delta_file).unwrap());
    let staged = h.consul.get("deploy/app/staging").unwrap().value;
    h.consul.put("deploy/app/production", staged);
    wait_served(&h.root, "b2", DEADLINE, &h.log).await;
    let log = h.log();
    assert!(log.contains("delta applied"), "{log}");
    assert!(!log.contains("cannot download the file index"), "{log}");
    assert_eq!(
        log.matches("file digests from the publisher's index")
            .count(),
        2,
        "{log}"
    );
    every_digest_is_the_files(&h.live_record(), &live_slot(&h.root));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_writes_the_index_itself_and_reuses_one_written_before() {
    let h = Host::start().await;
    let b1 = build(h.dir(), &h.artifacts, "b1", BuildProfile::TINY);
    // Written by `release index` first: publish must commit to that very
    // file (it may already be uploaded), not rewrite it.
    let index_url = h.index(&b1);
    let index_file = PathBuf::from(format!("{}.index.json.zst", b1.path.display()));
    let before = std::fs::metadata(&index_file).unwrap().modified().unwrap();
    h.publish(&b1, &["--index-url", &index_url]);
    assert_eq!(
        std::fs::metadata(&index_file).unwrap().modified().unwrap(),
        before
    );
    let shown: serde_json::Value = serde_json::from_str(&h.release(&["show", "--json"])).unwrap();
    let (sha, size) = deploy_agent::artifact::sha256::hash_file(&index_file).unwrap();
    let m = &shown["manifest"];
    assert_eq!(m["index"]["url"], index_url.as_str(), "{shown}");
    assert_eq!(m["index"]["sha256"], sha.as_str(), "{shown}");
    assert_eq!(m["index"]["size"], size, "{shown}");

    // Without `release index`, publish writes it; an index left from
    // another artifact is replaced, never committed to.
    let b2 = build(h.dir(), &h.artifacts, "b2", BuildProfile::TINY);
    let stale = PathBuf::from(format!("{}.index.json.zst", b2.path.display()));
    std::fs::copy(&index_file, &stale).unwrap();
    h.publish(&b2, &["--index-url", "http://127.0.0.1:1/i/b2"]);
    let b2_sha = Sha256Sum::parse(&b2.artifact.sha256).unwrap();
    let index = FileIndex::load(&stale, &b2_sha).expect("the index of b2");
    assert!(index.files.len() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_index_costs_hashing_never_the_deploy() {
    let h = Host::start().await;
    // b1: the index URL answers 404.
    let b1 = build(h.dir(), &h.artifacts, "b1", BuildProfile::TINY);
    h.release(&["index", "--artifact", &b1.path.display().to_string()]);
    h.publish(&b1, &["--index-url", &h.artifacts.url("/i/nowhere")]);
    wait_served(&h.root, "b1", DEADLINE, &h.log).await;
    assert!(
        h.log().contains("cannot download the file index"),
        "{}",
        h.log()
    );
    let filled = |h: &Host, n: usize| {
        let log = h.log();
        match log.matches("slot record digests filled in").count() >= n {
            true => Ok(()),
            false => Err(log),
        }
    };
    wait_until_async("b1's digests hashed after the deploy", DEADLINE, || async {
        filled(&h, 1)
    })
    .await;
    every_digest_is_the_files(&h.live_record(), &live_slot(&h.root));

    // b2: its manifest commits to b1's index (a publisher's mistake): the
    // agent refuses it by the artifact it names, and hashes instead.
    let b2 = build(h.dir(), &h.artifacts, "b2", BuildProfile::TINY);
    let b1_index = PathBuf::from(format!("{}.index.json.zst", b1.path.display()));
    h.artifacts.add("/i/b2", std::fs::read(&b1_index).unwrap());
    let b2_index = PathBuf::from(format!("{}.index.json.zst", b2.path.display()));
    std::fs::copy(&b1_index, &b2_index).unwrap();
    let (sha, size) = deploy_agent::artifact::sha256::hash_file(&b1_index).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&testkit::buildgen::manifest_json(
        &b2.id,
        &h.artifacts.url(&b2.url_path),
        &b2.artifact,
        deploy_agent_tests::slots::FORMAT,
    ))
    .unwrap();
    m["index"] =
        serde_json::json!({"url": h.artifacts.url("/i/b2"), "sha256": sha.as_str(), "size": size});
    h.consul
        .put("deploy/app/production", m.to_string().as_bytes());
    wait_served(&h.root, "b2", DEADLINE, &h.log).await;
    let log = h.log();
    assert!(
        log.contains("file index not used") && log.contains("describes artifact"),
        "{log}"
    );
    wait_until_async("b2's digests hashed after the deploy", DEADLINE, || async {
        filled(&h, 2)
    })
    .await;
    every_digest_is_the_files(&h.live_record(), &live_slot(&h.root));
}
