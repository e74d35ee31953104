//! Every slot is exactly its build (issue 20): a write into one slot never
//! shows in the other (a delta reuses files by reflink or copy, never by a
//! shared inode); every slot has a record, and nothing flips to a slot that
//! no longer matches it: a rollback by the key rebuilds it first, an
//! operator rollback is refused naming the paths. Status, `verify` and
//! history name what changed. Also across a SIGKILL in the middle of a
//! rebuild, and on ext4, XFS (reflink) and btrfs loop mounts.
//!
//! The real agent (in-process harness, or the real binary for the SIGKILL
//! case), real files, the real CLI; shipped defaults (`[integrity]
//! check-interval` stays 5m: the checks these tests see are the ones after
//! a deploy or rollback, and `deploy-agent verify`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime};

use deploy_agent::manifest::DeltaSpec;
use deploy_agent_tests::agent::Harness;
use deploy_agent_tests::process::{spawn_run, status_json, wait_served, write_config};
use deploy_agent_tests::slots::{
    build, delta, full_unpack, inodes, live_slot, manifest, tree, Build, LoopFs,
};
use deploy_agent_tests::{
    agent_bin, precondition, wait_until_async, wait_until_every_async, DEADLINE,
};
use testkit::buildgen::BuildProfile;
use testkit::testserver::artifact::{Fault, FaultRule};

/// The CLI against the harness's agent.
async fn cli(h: &Harness, args: &[&str]) -> Output {
    let sock = h.tmp.path().join("agent.sock");
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(agent_bin())
            .args(&args)
            .arg("--socket")
            .arg(sock)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Waits until `status --json` satisfies `ok`; returns that report.
async fn wait_status(
    h: &Harness,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let sock = h.tmp.path().join("agent.sock");
    let ok = &ok;
    wait_until_every_async(
        &format!("status never showed {what}"),
        DEADLINE,
        // Each poll runs the CLI.
        Duration::from_millis(50),
        || {
            let s = sock.clone();
            async move {
                let v = tokio::task::spawn_blocking(move || status_json(&s))
                    .await
                    .unwrap();
                match v {
                    Some(v) if ok(&v) => Ok(v),
                    Some(v) => Err(format!("{v}")),
                    None => Err("no status".to_string()),
                }
            }
        },
    )
    .await
}

/// Paths a slot's last check lists as `kind` (modified, added, missing).
fn listed(slot: &serde_json::Value, kind: &str) -> Vec<String> {
    slot["integrity"]["drift"][kind]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A regular file `b1` and `b2` share unchanged (what a delta reuses).
fn shared_file(b1_slot: &Path, b2_slot: &Path) -> PathBuf {
    let (t1, t2) = (tree(b1_slot), tree(b2_slot));
    t2.iter()
        .find(|(p, what)| what.starts_with("file") && t1.get(*p) == Some(what))
        .map(|(p, _)| p.clone())
        .expect("b1 and b2 share a file")
}

/// Appends to a file in place, as `echo '// HOTFIX' >> f` does.
fn hot_patch(file: &Path) {
    let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
    f.write_all(b"// HOTFIX\n").unwrap();
}

fn other_slot(root: &Path, slot: &Path) -> PathBuf {
    root.join(if slot.ends_with("slot-a") {
        "slot-b"
    } else {
        "slot-a"
    })
}

/// `b1` live from a full deploy, then `b2` live from its delta from `b1`.
async fn b2_from_a_delta(
    profile: BuildProfile,
    tune: impl FnOnce(&Path) -> PathBuf,
) -> (Harness, Build, Build, DeltaSpec) {
    let mut h = Harness::new(|_| {}).await;
    // The deploy root may live on a filesystem of the test's choosing.
    h.root = tune(h.tmp.path());
    h.config.deploy_root = h.root.clone();
    h.start_agent().await;
    let dir = h.tmp.path().to_path_buf();
    let b1 = build(&dir, &h.artifacts, "b1", profile);
    let b2 = build(&dir, &h.artifacts, "b2", profile);
    h.publish(&manifest(&h.artifacts, &b1, None));
    h.wait_live("b1", DEADLINE).await;
    let (d, _) = delta(&dir, &h.artifacts, &b1, &b2);
    h.publish(&manifest(&h.artifacts, &b2, Some(&d)));
    let rec = h.wait_live("b2", DEADLINE).await;
    assert!(rec.from_delta, "b2 must come from the delta: {rec:?}");
    (h, b1, b2, d)
}

/// The scenario: b2 live from a delta, a file it shares with b1
/// hot-patched in the live slot; `verify` and `status` name it; the
/// operator's rollback serves b1 byte for byte (the patch never reached
/// b1's slot); status then names the patched file in the cold slot and
/// history says the patch stopped being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_patch_of_the_live_slot_never_reaches_the_rollback() {
    let (h, b1, _b2, _) = b2_from_a_delta(BuildProfile::TINY, |t| t.join("srv/app")).await;
    let live = live_slot(&h.root);
    let victim = shared_file(&other_slot(&h.root, &live), &live);
    assert_ne!(
        inodes(&live).get(&victim),
        inodes(&other_slot(&h.root, &live)).get(&victim),
        "the two slots must not share the file's inode"
    );
    hot_patch(&live.join(&victim));
    let name = victim.to_string_lossy().into_owned();

    let out = cli(&h, &["verify"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "verify must fail: {err}");
    assert!(err.contains(&format!("modified {name}")), "{err}");
    let v = wait_status(&h, "the hot-patched file", |v| {
        listed(&v["hot"], "modified") == [name.clone()]
    })
    .await;
    assert_eq!(v["hot"]["integrity"]["state"], "drifted", "{v}");
    let text = String::from_utf8(cli(&h, &["status"]).await.stdout).unwrap();
    assert!(
        text.contains("CHANGED SINCE DEPLOY") && text.contains(&name),
        "{text}"
    );

    let out = cli(&h, &["rollback"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(h.served(), "b1");
    let reference = full_unpack(h.tmp.path(), &b1);
    assert_eq!(
        tree(&live_slot(&h.root)),
        tree(&reference),
        "b1 must be served byte for byte"
    );

    let v = wait_status(&h, "the patch in the cold slot", |v| {
        listed(&v["cold"], "modified") == [name.clone()]
    })
    .await;
    assert_eq!(v["hot"]["integrity"]["state"], "intact", "{v}");
    // Proven by stat alone: the record was written after every file.
    assert_eq!(v["hot"]["integrity"]["hashed"], 0, "{v}");
    assert!(v["hot"]["integrity"]["checked"].as_u64() > Some(10), "{v}");
    // After the deploy the record's digests are filled in (off the
    // deploy's path): then `verify --full` hashes every file of b1.
    // Every 100 ms: each poll runs the CLI.
    wait_until_every_async(
        "digests never filled in",
        DEADLINE,
        Duration::from_millis(100),
        || async {
            let out = cli(&h, &["verify", "--full"]).await;
            let said = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{said} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let hashed = said
                .split(" hashed")
                .next()
                .and_then(|s| s.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok());
            if hashed.is_some_and(|n| n > 10) {
                Ok(())
            } else {
                Err(said)
            }
        },
    )
    .await;
    let hist = cli(&h, &["history", "--json"]).await;
    let hist: serde_json::Value = serde_json::from_slice(&hist.stdout).unwrap();
    let note = hist[0]["integrity"].as_str().unwrap_or_default();
    assert_eq!(hist[0]["kind"], "rollback", "{hist}");
    assert!(
        note.contains(&name),
        "history must name the patch left behind: {hist}"
    );
}

/// b1 then b2 live from full deploys (b1 in the cold slot).
async fn b1_cold_b2_live() -> (Harness, Build, Build) {
    let (h, b1, b2) = b1_live(|_| {}).await;
    h.publish(&manifest(&h.artifacts, &b2, None));
    h.wait_live("b2", DEADLINE).await;
    (h, b1, b2)
}

/// An agent configured by `tune` with b1 live from a full deploy, and b2
/// built and served but not published.
async fn b1_live(tune: impl FnOnce(&mut deploy_agent::config::Config)) -> (Harness, Build, Build) {
    let mut h = Harness::new(tune).await;
    h.start_agent().await;
    let dir = h.tmp.path().to_path_buf();
    let b1 = build(&dir, &h.artifacts, "b1", BuildProfile::TINY);
    let b2 = build(&dir, &h.artifacts, "b2", BuildProfile::TINY);
    h.publish(&manifest(&h.artifacts, &b1, None));
    h.wait_live("b1", DEADLINE).await;
    (h, b1, b2)
}

/// The first regular file of a slot (by path).
fn some_file(slot: &Path) -> PathBuf {
    tree(slot)
        .into_iter()
        .find(|(_, what)| what.starts_with("file"))
        .map(|(p, _)| p)
        .unwrap()
}

/// Sets a file's mtime back to `t` (an edit that tries to look untouched).
fn set_mtime(file: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(file)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Publishing b1 again (a rollback by the key) while its cold slot was
/// changed: every kind of change is caught, the slot is rebuilt from the
/// cached artifact before the flip, b1 serves byte for byte, and history
/// says what was repaired.
async fn rollback_by_key_repairs(change: impl FnOnce(&Path) -> (String, &'static str)) {
    deploy_agent_tests::agent::capture_logs();
    let (h, b1, _b2) = b1_cold_b2_live().await;
    let cold = other_slot(&h.root, &live_slot(&h.root));
    let (path, kind) = change(&cold);
    h.publish(&manifest(&h.artifacts, &b1, None));
    let rec = h.wait_live("b1", DEADLINE).await;
    let repaired = serde_json::to_value(&rec.repaired).unwrap();
    let listed: Vec<String> =
        serde_json::from_value(repaired["drift"][kind].clone()).unwrap_or_default();
    assert_eq!(
        listed,
        std::slice::from_ref(&path),
        "the repair must name the {kind} path: {rec:?}"
    );
    let reference = full_unpack(h.tmp.path(), &b1);
    assert_eq!(
        tree(&live_slot(&h.root)),
        tree(&reference),
        "b1 must be served byte for byte"
    );
    let hist = cli(&h, &["history", "--json"]).await;
    let hist: serde_json::Value = serde_json::from_slice(&hist.stdout).unwrap();
    let note = hist[0]["integrity"].as_str().unwrap_or_default();
    assert!(
        note.contains("repaired 1 changed path") && note.contains(&path),
        "{hist}"
    );
    let logs = deploy_agent_tests::agent::captured_logs();
    assert!(logs.contains("not its build any more"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_write_to_the_cold_slot_is_repaired_before_a_rollback() {
    rollback_by_key_repairs(|cold| {
        let f = some_file(cold);
        hot_patch(&cold.join(&f));
        (f.to_string_lossy().into_owned(), "modified")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_deleted_from_the_cold_slot_is_repaired_before_a_rollback() {
    rollback_by_key_repairs(|cold| {
        let f = some_file(cold);
        std::fs::remove_file(cold.join(&f)).unwrap();
        (f.to_string_lossy().into_owned(), "missing")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_added_to_the_cold_slot_is_repaired_before_a_rollback() {
    rollback_by_key_repairs(|cold| {
        std::fs::write(cold.join("app/backdoor.php"), b"<?php system($_GET['c']);").unwrap();
        ("app/backdoor.php".into(), "added")
    })
    .await;
}

/// The same size and mtime, another content, a new inode and ctime (an
/// editor's save-to-temp-and-rename): the stat differs only where a
/// write cannot hide, so the file is hashed and caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_with_the_same_size_and_mtime_is_repaired() {
    rollback_by_key_repairs(|cold| {
        let f = some_file(cold);
        let full = cold.join(&f);
        let meta = std::fs::metadata(&full).unwrap();
        let mut bytes = std::fs::read(&full).unwrap();
        bytes[0] ^= 0x20;
        let tmp = full.with_extension("swp");
        std::fs::write(&tmp, &bytes).unwrap();
        std::fs::set_permissions(&tmp, meta.permissions()).unwrap();
        set_mtime(&tmp, meta.modified().unwrap());
        std::fs::rename(&tmp, &full).unwrap();
        let after = std::fs::metadata(&full).unwrap();
        assert_eq!((after.len(), after.mtime()), (meta.len(), meta.mtime()));
        assert_ne!(after.ino(), meta.ino());
        (f.to_string_lossy().into_owned(), "modified")
    })
    .await;
}

/// The operator's rollback cannot rebuild a slot (it names no artifact):
/// it is refused, naming the paths, and the live build keeps serving;
/// also a file deleted from the live slot is named by `verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_rollback_to_a_changed_slot_is_refused() {
    let (h, _b1, _b2) = b1_cold_b2_live().await;
    let live = live_slot(&h.root);
    let cold = other_slot(&h.root, &live);
    let f = some_file(&cold);
    std::fs::write(cold.join("app/added.txt"), b"x").unwrap();
    hot_patch(&cold.join(&f));
    let out = cli(&h, &["rollback"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("no longer holds exactly build b1"), "{err}");
    assert!(
        err.contains(&f.to_string_lossy().into_owned()) && err.contains("app/added.txt"),
        "{err}"
    );
    assert_eq!(h.served(), "b2");
    let v = wait_status(&h, "the changed cold slot", |v| {
        listed(&v["cold"], "added") == ["app/added.txt"]
    })
    .await;
    assert_eq!(
        listed(&v["cold"], "modified"),
        [f.to_string_lossy().into_owned()],
        "{v}"
    );

    // A file deleted from the live slot.
    let gone = some_file(&live);
    std::fs::remove_file(live.join(&gone)).unwrap();
    let out = cli(&h, &["verify", "--full"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains(&format!("missing {}", gone.display())),
        "{err}"
    );
    let name = gone.to_string_lossy().into_owned();
    wait_status(&h, "the file missing from the live slot", |v| {
        listed(&v["hot"], "missing") == [name.clone()]
    })
    .await;
}

/// On a deploy root of filesystem `fs`: b2 from its delta reuses b1's files
/// the way `how` says (status shows it), no file shares an inode across the
/// slots, and a hot-patch of the live slot is not served after a rollback.
async fn on_filesystem(fs: &str, size_mb: u64, how: &str) {
    let name = format!("slot_integrity::on_{fs}");
    let mut mounted = None;
    let mut why = None;
    let (h, b1, _b2, _) = b2_from_a_delta(BuildProfile::TINY, |t| {
        match LoopFs::mount(t, fs, size_mb, &t.join("fs")) {
            Ok(m) => mounted = Some(m),
            Err(e) => why = Some(e),
        }
        t.join("fs/app")
    })
    .await;
    if let Some(why) = why {
        // The agent ran on the test's own filesystem instead: nothing to
        // conclude about `fs`.
        precondition(Some(format!("{name}: {why}")));
        return;
    }
    assert!(mounted.is_some());
    let v = wait_status(&h, "the live slot checked", |v| {
        v["hot"]["integrity"]["state"] == "intact"
    })
    .await;
    assert_eq!(v["hot"]["integrity"]["mechanism"], how, "{name}: {v}");
    // The record was stamped after the last file's ctime tick, even where
    // a tick is a whole second: no entry is racy, nothing is hashed.
    assert_eq!(v["hot"]["integrity"]["hashed"], 0, "{name}: {v}");
    let live = live_slot(&h.root);
    let cold = other_slot(&h.root, &live);
    let (a, b) = (inodes(&live), inodes(&cold));
    assert!(
        a.iter().all(|(p, i)| b.get(p) != Some(i)),
        "{name}: shared inodes"
    );
    let victim = shared_file(&cold, &live);
    hot_patch(&live.join(&victim));
    let out = cli(&h, &["rollback"]).await;
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = full_unpack(h.tmp.path(), &b1);
    assert_eq!(
        tree(&live_slot(&h.root)),
        tree(&reference),
        "{name}: b1 byte for byte"
    );
    drop(h);
    drop(mounted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_ext4_with_a_journal_unchanged_files_are_copied() {
    on_filesystem("ext4", 64, "copy").await;
}

/// Whole-second timestamps (ext4 with 128-byte inodes): the record's
/// stamp waits for the next second, so a check right after the deploy
/// still proves every file by stat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_ext4_with_whole_second_timestamps_nothing_is_racy() {
    on_filesystem("ext4-coarse", 64, "copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_xfs_unchanged_files_are_reflinked() {
    on_filesystem("xfs", 320, "reflink").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_btrfs_unchanged_files_are_reflinked() {
    on_filesystem("btrfs", 256, "reflink").await;
}

/// The real binary, SIGKILLed in the middle of rebuilding a changed cold
/// slot (its artifact trickles, so the kill lands in the download or the
/// unpack): the old build keeps serving, and after the restart the
/// rebuild completes and the build serves exactly as its artifact says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_a_repair_heals_after_a_restart() {
    let bin = tokio::task::spawn_blocking(agent_bin).await.unwrap();
    let h = Harness::new(|_| {}).await;
    let dir = h.tmp.path().to_path_buf();
    let root = dir.join("root");
    let key = "deploy/app/repair";
    let config = write_config(
        &dir,
        &root,
        &h.consul.url(),
        "wait = \"5s\"\nfirst-request-splay = \"0s\"\nrate-burst = 50\nrate-interval = \"20ms\"",
        &format!("[source]\nkey = \"{key}\"\n[download]\nread-timeout = \"3s\"\n"),
    );
    let log = dir.join("agent.log");
    let publish = |b: &Build| {
        h.consul
            .put(key, manifest(&h.artifacts, b, None).as_bytes())
    };
    let mut child = spawn_run(&bin, &config, &log);
    let k0 = build(&dir, &h.artifacts, "k0", BuildProfile::TINY);
    let k1 = build(&dir, &h.artifacts, "k1", BuildProfile::TINY);
    publish(&k0);
    wait_served(&root, "k0", DEADLINE, &log).await;
    publish(&k1);
    wait_served(&root, "k1", DEADLINE, &log).await;
    let cold = other_slot(&root, &live_slot(&root));
    hot_patch(&cold.join(some_file(&cold)));
    // The rebuild must download (slowly), so there is a middle to kill in.
    std::fs::remove_file(root.join(".deploy/cache").join(&k0.artifact.sha256)).unwrap();
    h.artifacts.set_fault(
        FaultRule::always(Fault::Trickle {
            bytes_per_sec: k0.artifact.size * 2,
        })
        .on_path(k0.url_path.clone()),
    );
    publish(&k0);
    // Every 5 ms: the kill must land while the repair runs.
    wait_until_every_async(
        "the repair never started",
        DEADLINE,
        Duration::from_millis(5),
        || async {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("repairing the slot with a full deploy")
            {
                Ok(())
            } else {
                Err("not in the agent's log".to_string())
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("current/BUILD")).unwrap(),
        "k1",
        "nothing may flip to the changed slot"
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join(".deploy/deploy.json")).unwrap()).unwrap();
    assert_eq!(record["build"], "k0", "{record}");
    assert!(
        record["outcome"].is_null(),
        "the kill must land mid-repair: {record}"
    );
    h.artifacts.clear_faults();
    let mut child = spawn_run(&bin, &config, &log);
    wait_served(&root, "k0", DEADLINE, &log).await;
    let reference = full_unpack(&dir, &k0);
    assert_eq!(
        tree(&live_slot(&root)),
        tree(&reference),
        "k0 byte for byte"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The fleet sees it too: the host report names the changed paths of the
/// live slot once a check finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_report_names_what_changed_in_the_live_slot() {
    // A report prefix and host id of the test's own (no app, so no splay
    // or freeze key: the defaults a member of no fleet runs with).
    let (h, _, _) = b1_live(|c| {
        c.fleet.report_prefix = Some("deploy-hosts/app/".into());
        c.fleet.host_id = Some("h1".into());
    })
    .await;
    let live = live_slot(&h.root);
    let f = some_file(&live);
    hot_patch(&live.join(&f));
    assert_eq!(cli(&h, &["verify"]).await.status.code(), Some(5));
    let want = format!("modified {}", f.display());
    let report = || -> serde_json::Value {
        h.consul
            .get("deploy-hosts/app/h1")
            .map(|e| serde_json::from_slice(&e.value).unwrap())
            .unwrap_or_default()
    };
    wait_until_async("host report", DEADLINE, || async {
        match report() {
            r if r["changed"] == serde_json::json!([want]) => Ok(()),
            r => Err(format!("{r}")),
        }
    })
    .await;
}

/// The health gate's flip back goes only to a slot that is still its
/// build: with the previous slot changed, the unhealthy build keeps
/// serving (quarantined) and the error names the changed path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_gate_does_not_flip_back_to_a_changed_slot() {
    // A health gate (not in the shipped config) that fails build b2 only.
    let script = "test \"$(cat \"$DEPLOY_ROOT/current/BUILD\")\" != b2";
    let (h, _b1, b2) = b1_live(|c| {
        c.health = deploy_agent::config::HealthConfig {
            command: Some(vec!["sh".into(), "-c".into(), script.into()]),
            timeout: Duration::from_millis(500),
            window: Duration::from_millis(1500),
            interval: Duration::from_millis(100),
            ..Default::default()
        }
    })
    .await;
    let f = some_file(&live_slot(&h.root));
    // b1's slot becomes the cold one; change it before b2's verdict.
    hot_patch(&live_slot(&h.root).join(&f));
    h.publish(&manifest(&h.artifacts, &b2, None));
    let rec = wait_until_async("b2 never got its verdict", DEADLINE, || async {
        let s = h.status();
        match s
            .history
            .iter()
            .rev()
            .find(|r| r.build == "b2" && r.outcome.is_some())
        {
            Some(r) => Ok(r.clone()),
            None => Err(format!("{s:#?}")),
        }
    })
    .await;
    let msg = rec
        .error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    assert!(msg.contains("cannot be rolled back"), "{msg}");
    assert!(msg.contains(&f.to_string_lossy().into_owned()), "{msg}");
    assert_eq!(h.served(), "b2");
    assert!(rec.rolled_back_to.is_none(), "{rec:?}");
}

/// A deploy that flips away from a hot-patched live build says in history
/// which changes stopped being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_that_leaves_a_hot_patch_behind_says_so() {
    let (h, _b1, b2) = b1_live(|_| {}).await;
    let f = some_file(&live_slot(&h.root));
    hot_patch(&live_slot(&h.root).join(&f));
    assert_eq!(cli(&h, &["verify"]).await.status.code(), Some(5));
    h.publish(&manifest(&h.artifacts, &b2, None));
    h.wait_live("b2", DEADLINE).await;
    let hist = cli(&h, &["history", "--json"]).await;
    let hist: serde_json::Value = serde_json::from_slice(&hist.stdout).unwrap();
    assert_eq!(hist[0]["build"], "b2", "{hist}");
    let note = hist[0]["integrity"].as_str().unwrap_or_default();
    assert!(
        note.contains("no longer serving the changes made to b1")
            && note.contains(&f.to_string_lossy().into_owned()),
        "{hist}"
    );
    let text = String::from_utf8(cli(&h, &["history"]).await.stdout).unwrap();
    assert!(text.contains("no longer serving the changes"), "{text}");
}

/// A cold slot removed from under the agent cannot be read, let alone
/// proven: a rollback by the key rebuilds it instead of failing on every
/// retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_cold_slot_is_rebuilt_before_a_rollback() {
    let (h, b1, _b2) = b1_cold_b2_live().await;
    let cold = other_slot(&h.root, &live_slot(&h.root));
    std::fs::remove_dir_all(&cold).unwrap();
    h.publish(&manifest(&h.artifacts, &b1, None));
    let rec = h.wait_live("b1", DEADLINE).await;
    let repaired = serde_json::to_value(&rec.repaired).unwrap();
    assert_eq!(repaired["state"], "unprovable", "{rec:?}");
    assert!(
        repaired["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot read it"),
        "{rec:?}"
    );
    let reference = full_unpack(h.tmp.path(), &b1);
    assert_eq!(tree(&live_slot(&h.root)), tree(&reference));
}
