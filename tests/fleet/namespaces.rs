//! The fleet in containers: 20 real `deploy-agent run` processes, each in
//! its own network and mount namespace with its own deploy root, one
//! Consul-compatible server and one artifact server shared by all. The
//! deploy commander drives them with the real `deploy-agent release`
//! commands, and every expectation is checked on each host's disk
//! (`current/BUILD`) and in its Consul report.
//!
//! Scenarios, in one fleet to keep the run short: a staged rollout 2% ->
//! 10 -> 25 -> 50 -> 100 with convergence checked at each step, one host
//! cut off from Consul mid-rollout catching up when its link returns, the
//! artifact server down mid-rollout, a fleet rollback from the cold slots
//! (no downloads), one host's disk full (only it fails), and a freeze that
//! stops new flips fleet-wide.
//!
//! Needs root and iproute2 (`.ci/run` installs it); otherwise it says so
//! and passes without running.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::BTreeSet;
use std::time::Duration;

use deploy_agent::deploy::Phase;
use deploy_agent::manifest::{Manifest, UrlPolicy};
use deploy_agent_tests::fleet::{unsupported, Fleet, FleetOptions, APP, TIER};
use deploy_agent_tests::precondition;
use deploy_agent_tests::DEADLINE;
use testkit::buildgen::BuildProfile;

const HOSTS: usize = 20;
const DISK_FULL_HOST: usize = 7;

/// The build each host must run under the published manifest.
fn expected(f: &Fleet) -> Vec<String> {
    let e = f.consul.get(&format!("deploy/{APP}/{TIER}")).unwrap();
    let m = Manifest::parse(&e.value, UrlPolicy::default()).unwrap();
    f.hosts
        .iter()
        .map(|h| {
            deploy_agent::fleet::effective(&m, &h.id)
                .1
                .map(|m| m.spec.build)
                .unwrap_or_default()
        })
        .collect()
}

/// Waits until every host in `which` serves what the manifest says and
/// reports it, idle; returns the hosts on `build`.
async fn converge(f: &Fleet, which: &[usize], build: &str, what: &str) -> BTreeSet<usize> {
    let want = expected(f);
    let index = f
        .consul
        .get(&format!("deploy/{APP}/{TIER}"))
        .unwrap()
        .modify_index;
    f.wait_hosts(which, what, DEADLINE, |i| {
        f.hosts[i].served() == want[i]
            && f.report(i).is_some_and(|r| {
                r.seen_index >= index
                    && r.build.as_deref() == Some(want[i].as_str())
                    && matches!(r.phase, Phase::Done | Phase::Idle)
            })
    })
    .await;
    which
        .iter()
        .copied()
        .filter(|i| want[*i] == build)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_rollout_rollback_outages_disk_full_and_freeze() {
    if !precondition(unsupported()) {
        return;
    }
    let mut f = Fleet::start(FleetOptions {
        hosts: HOSTS,
        splay_max: Duration::from_millis(500),
        small_disks: vec![(DISK_FULL_HOST, 24)],
        profile: BuildProfile::TINY,
    })
    .await;
    let all = f.all();
    let publish =
        |f: &Fleet, path: &std::path::Path, url: &str, build: &str, percent: Option<&str>| {
            let p = path.display().to_string();
            let mut args = vec![
                "release",
                "publish",
                "--build",
                build,
                "--artifact",
                &p,
                "--url",
                url,
            ];
            if let Some(pc) = percent {
                args.extend(["--percent", pc]);
            }
            f.cli_ok(&args);
        };

    // Baseline: b1 everywhere.
    let (p1, u1, _) = f.build("b1");
    let (p2, u2, _) = f.build("b2");
    publish(&f, &p1, &u1, "b1", None);
    converge(&f, &all, "b1", "b1 everywhere").await;

    // Staged rollout of b2; the sets only grow.
    publish(&f, &p2, &u2, "b2", Some("2"));
    let mut on_new = converge(&f, &all, "b2", "b2 at 2%").await;
    let cut = {
        // A host outside the 25% set but inside the 50% one, if any; else
        // any host outside 25% (it must still catch up at 100%).
        let e = f.consul.get(&format!("deploy/{APP}/{TIER}")).unwrap();
        let m = Manifest::parse(&e.value, UrlPolicy::default()).unwrap();
        let b =
            |i: usize| deploy_agent::fleet::bucket(deploy_agent::fleet::salt(&m), &f.hosts[i].id);
        let outside: Vec<usize> = all
            .iter()
            .copied()
            .filter(|i| b(*i) >= 25.0 && *i != DISK_FULL_HOST)
            .collect();
        outside
            .iter()
            .copied()
            .find(|i| b(*i) < 50.0)
            .unwrap_or(outside[0])
    };
    for pct in ["10", "25"] {
        f.cli_ok(&["release", "promote", "--percent", pct]);
        let now = converge(&f, &all, "b2", &format!("b2 at {pct}%")).await;
        assert!(on_new.is_subset(&now), "raising to {pct}% only adds hosts");
        on_new = now;
    }

    // Cut one host off from Consul, promote to 50%: everyone else follows.
    f.hosts[cut].cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.cli_ok(&["release", "promote", "--percent", "50"]);
    let others: Vec<usize> = all.iter().copied().filter(|i| *i != cut).collect();
    let now = converge(&f, &others, "b2", "b2 at 50% (one host cut off)").await;
    assert!(on_new.is_subset(&now));
    assert_eq!(
        f.hosts[cut].served(),
        "b1",
        "a host without Consul keeps its build"
    );
    let status = f.cli_ok(&["fleet", "status", "--json", "--stale-after", "0s"]);
    let v: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert!(
        v["stale"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == &serde_json::json!(f.hosts[cut].id)),
        "the cut-off host shows as stale: {v}"
    );
    f.hosts[cut].restore();
    on_new = converge(&f, &all, "b2", "b2 at 50% after the link returns").await;

    // The artifact server goes down while the rollout goes to 100%.
    f.artifacts_down();
    f.cli_ok(&["release", "promote", "--percent", "100"]);
    let pending: Vec<usize> = all
        .iter()
        .copied()
        .filter(|i| !on_new.contains(i))
        .collect();
    f.wait_hosts(
        &pending,
        "failed while the artifact server is down",
        DEADLINE,
        |i| f.report(i).is_some_and(|r| r.phase == Phase::Failed),
    )
    .await;
    assert!(
        pending.iter().all(|i| f.hosts[*i].served() == "b1"),
        "failed hosts keep b1"
    );
    f.artifacts_up().await;
    let now = converge(
        &f,
        &all,
        "b2",
        "b2 at 100% after the artifact server returns",
    )
    .await;
    assert_eq!(now.len(), HOSTS);

    // Fleet rollback: back to b1 from every cold slot, no download.
    let before = f.artifacts().stats().requests;
    let out = f.cli_ok(&["release", "rollback"]);
    assert!(out.contains("b1"), "{out}");
    converge(&f, &all, "b1", "rolled back to b1").await;
    assert_eq!(
        f.artifacts().stats().requests,
        before,
        "a rollback downloads nothing"
    );
    for i in &all {
        assert_eq!(
            f.report(*i).unwrap().outcome,
            Some(deploy_agent::deploy::Outcome::RolledBack)
        );
    }

    // One host's disk fills up: only it fails, and it says why.
    let filler = f.hosts[DISK_FULL_HOST].root.join("filler");
    let st = nix::sys::statvfs::statvfs(&f.hosts[DISK_FULL_HOST].root).unwrap();
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    std::fs::write(&filler, vec![1u8; free.saturating_sub(64 * 1024) as usize]).unwrap();
    let (p3, u3, _) = f.build("b3");
    publish(&f, &p3, &u3, "b3", None);
    let healthy: Vec<usize> = all
        .iter()
        .copied()
        .filter(|i| *i != DISK_FULL_HOST)
        .collect();
    converge(&f, &healthy, "b3", "b3 on every healthy host").await;
    f.wait_hosts(
        &[DISK_FULL_HOST],
        "the full host reports failed",
        DEADLINE,
        |i| {
            f.report(i)
                .is_some_and(|r| r.phase == Phase::Failed && r.error.is_some())
        },
    )
    .await;
    assert_eq!(f.hosts[DISK_FULL_HOST].served(), "b1");
    let status = f.cli_ok(&["fleet", "status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    let failed: Vec<&str> = v["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].as_str().unwrap())
        .collect();
    assert_eq!(failed, vec![f.hosts[DISK_FULL_HOST].id.as_str()], "{v}");
    let text = f.cli_ok(&["fleet", "status"]);
    assert!(text.contains("failed    1"), "{text}");
    std::fs::remove_file(&filler).unwrap();
    converge(&f, &all, "b3", "the full host recovers once space is freed").await;

    // A freeze stops new flips fleet-wide until it is lifted.
    f.cli_ok(&["release", "freeze", "--reason", "incident"]);
    f.wait_hosts(&all, "every host sees the freeze", DEADLINE, |i| {
        f.report(i).is_some_and(|r| r.frozen)
    })
    .await;
    let (p4, u4, _) = f.build("b4");
    publish(&f, &p4, &u4, "b4", None);
    f.wait_hosts(&all, "every host saw b4", DEADLINE, |i| {
        f.report(i)
            .is_some_and(|r| r.desired.as_deref() == Some("b4"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        all.iter().all(|i| f.hosts[*i].served() == "b3"),
        "frozen: nobody flipped"
    );
    let out = f.cli(&["release", "freeze"]);
    assert_eq!(
        out.status.code(),
        Some(deploy_agent::exit::FROZEN as i32),
        "a second freeze is refused"
    );
    f.cli_ok(&["release", "unfreeze"]);
    converge(&f, &all, "b4", "b4 everywhere after unfreeze").await;
}
