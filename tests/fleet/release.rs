//! Release commands against the in-process Consul server (check-and-set:
//! two commanders, one loses with a clear error), and one real in-process
//! agent following a percentage rollout, a freeze and a rollback, with its
//! host report in Consul.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use deploy_agent::config::Config;
use deploy_agent::consul::ConsulClient;
use deploy_agent::deploy::{Outcome, Phase};
use deploy_agent::error::Error;
use deploy_agent::fleet::commander::release::Release;
use deploy_agent::fleet::host::hostreport::HostRecord;
use deploy_agent::manifest::{BuildSpec, Format, Manifest, UrlPolicy};
use deploy_agent_tests::agent::{fast_consul, Harness, KEY};
use deploy_agent_tests::{wait_until_async, DEADLINE};
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig};

/// Makes the harness's agent host `host` of `app`'s production tier (the
/// key the harness publishes to) with `splay` as its `splay-max`.
fn fleet_member(c: &mut Config, host: &str, splay: Duration) {
    c.fleet.app = Some("app".into());
    c.fleet.tier = Some("production".into());
    c.fleet.host_id = Some(host.into());
    c.fleet.splay_max = Some(splay);
}

fn spec(build: &str) -> BuildSpec {
    BuildSpec {
        build: build.into(),
        urls: vec![format!("http://artifacts.test/{build}.tar.gz")],
        sha256: "ab".repeat(32).parse().unwrap(),
        size: 1000,
        format: Format::TarGz,
        index: None,
    }
}

fn release(consul: &ConsulServer) -> Release {
    Release {
        client: ConsulClient::new(&fast_consul(&consul.url())).unwrap(),
        key: "deploy/web/production".into(),
        freeze_key: "deploy/web/freeze".into(),
    }
}

fn published(consul: &ConsulServer, key: &str) -> Manifest {
    let e = consul.get(key).expect("key is published");
    Manifest::parse(&e.value, UrlPolicy::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_commands_write_with_cas_and_the_second_commander_loses() {
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let a = release(&consul);
    let b = release(&consul);
    let key = a.key.clone();

    // Nothing published: promote and rollback say so.
    assert!(matches!(
        a.promote(50.0).await,
        Err(Error::ReleaseMissing { .. })
    ));
    assert!(matches!(
        a.rollback().await,
        Err(Error::ReleaseMissing { .. })
    ));

    a.publish(&spec("b1"), None).await.unwrap();
    let m = published(&consul, &key);
    assert_eq!(
        (m.spec.build.as_str(), m.percent, m.previous),
        ("b1", None, None)
    );

    a.publish(&spec("b2"), Some(2.0)).await.unwrap();
    let m = published(&consul, &key);
    assert_eq!(m.spec.build, "b2");
    assert_eq!(m.percent, Some(2.0));
    assert_eq!(m.previous.unwrap().build, "b1");

    a.promote(25.0).await.unwrap();
    assert_eq!(published(&consul, &key).percent, Some(25.0));
    assert!(matches!(
        a.promote(101.0).await,
        Err(Error::ReleaseInvalid { .. })
    ));

    // Two commanders read the same version; the first write wins, the
    // second is refused instead of silently overwriting it.
    let ca = a.read().await.unwrap().unwrap();
    let cb = b.read().await.unwrap().unwrap();
    a.write(&a.promoted(&ca, 50.0).unwrap(), ca.modify_index)
        .await
        .unwrap();
    let err = b
        .write(&b.promoted(&cb, 100.0).unwrap(), cb.modify_index)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReleaseConflict { .. }), "{err}");
    assert!(err.to_string().contains("another commander"), "{err}");
    assert_eq!(
        published(&consul, &key).percent,
        Some(50.0),
        "A's write stands"
    );

    // The same for a first publish (create with cas=0).
    let other = Release {
        key: "deploy/web/staging".into(),
        ..release(&consul)
    };
    other
        .write(&other.published(None, &spec("s1"), None).unwrap(), 0)
        .await
        .unwrap();
    let err = other
        .write(&other.published(None, &spec("s2"), None).unwrap(), 0)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReleaseConflict { .. }), "{err}");

    // Rollback: the previous build for everyone, the bad one kept as previous.
    a.rollback().await.unwrap();
    let m = published(&consul, &key);
    assert_eq!(m.spec.build, "b1");
    assert_eq!(m.percent, Some(100.0));
    assert_eq!(m.previous.unwrap().build, "b2");

    // Freeze is create-only; unfreeze deletes with cas.
    a.freeze("incident 42", "alice").await.unwrap();
    let err = b.freeze("again", "bob").await.unwrap_err();
    assert!(matches!(err, Error::ReleaseFrozen { .. }), "{err}");
    assert!(err.to_string().contains("incident 42"), "{err}");
    let shown = b.show().await.unwrap();
    assert!(shown.freeze.is_some());
    assert!(a.unfreeze().await.unwrap());
    assert!(!b.unfreeze().await.unwrap(), "nothing left to lift");
}

/// The freeze is the app's: `release freeze --app web` and `release
/// unfreeze --app web` need no tier (an on-call engineer types the least in
/// an incident), while the tier commands still ask for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_and_unfreeze_need_only_the_app() {
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let url = consul.url();
    let run = move |args: &[&str]| {
        std::process::Command::new(deploy_agent_tests::agent_bin())
            .arg("release")
            .args(args)
            .args(["--app", "web", "--consul", &url])
            .env_remove("DEPLOY_TIER")
            .env_remove("DEPLOY_APP")
            .env_remove("CONSUL_HTTP_ADDR")
            .output()
            .unwrap()
    };
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let out = tokio::task::block_in_place(|| run(&["freeze", "--reason", "incident"]));
    assert!(out.status.success(), "{}", text(&out));
    assert!(consul.get("deploy/web/freeze").is_some());
    let out = tokio::task::block_in_place(|| run(&["unfreeze"]));
    assert!(out.status.success(), "{}", text(&out));
    assert!(consul.get("deploy/web/freeze").is_none());
    let out = tokio::task::block_in_place(|| run(&["rollback"]));
    assert_eq!(out.status.code(), Some(deploy_agent::exit::USAGE as i32));
    assert!(
        text(&out).contains("give --app and --tier"),
        "{}",
        text(&out)
    );
}

fn report(h: &Harness, host: &str) -> Option<HostRecord> {
    let e = h.consul.get(&format!("deploy-hosts/app/{host}"))?;
    Some(serde_json::from_slice(&e.value).unwrap())
}

async fn wait_report(
    h: &Harness,
    host: &str,
    what: &str,
    ok: impl Fn(&HostRecord) -> bool,
) -> HostRecord {
    wait_until_async(&format!("no host report with {what}"), DEADLINE, || async {
        match report(h, host) {
            Some(r) if ok(&r) => Ok(r),
            r => Err(format!("{r:?}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_follows_percent_freeze_and_rollback_and_reports_each_change() {
    const HOST: &str = "web-0042";
    let mut h = Harness::new(|c| fleet_member(c, HOST, Duration::ZERO)).await;
    h.start_agent().await;
    let r = Release {
        client: ConsulClient::new(&fast_consul(&h.consul.url())).unwrap(),
        key: KEY.into(),
        freeze_key: "deploy/app/freeze".into(),
    };
    let spec_of = |m: &str| {
        Manifest::parse(m.as_bytes(), UrlPolicy::default())
            .unwrap()
            .spec
    };
    let (m1, _) = h.build("b1");
    let (m2, _) = h.build("b2");
    let (m3, _) = h.build("b3");

    r.publish(&spec_of(&m1), None).await.unwrap();
    h.wait_live("b1", DEADLINE).await;
    let rep = wait_report(&h, HOST, "b1 done", |r| {
        r.build.as_deref() == Some("b1") && r.phase == Phase::Done
    })
    .await;
    assert_eq!(rep.tier.as_deref(), Some("production"));
    assert_eq!(rep.outcome, Some(Outcome::Success));
    assert!(!rep.agent_version.is_empty());

    // b2 at a percentage just below this host's bucket: it stays on b1.
    let bucket = deploy_agent::fleet::bucket("b2", HOST);
    let below = (bucket - 0.001).max(0.0);
    let reqs = h.artifacts.stats().requests;
    r.publish(&spec_of(&m2), Some(below)).await.unwrap();
    let rep = wait_report(&h, HOST, "the b2 decision", |r| r.bucket == Some(bucket)).await;
    assert_eq!(rep.desired.as_deref(), Some("b1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.served(), "b1");
    assert_eq!(
        h.artifacts.stats().requests,
        reqs,
        "outside the percentage: no download"
    );
    let st = h.agent.as_ref().unwrap().shared.member().unwrap().info();
    assert_eq!(st.choice.as_deref(), Some("previous"));
    assert_eq!(st.bucket, Some(bucket));

    // Raising it past the bucket brings the host in, for at most 3 report
    // writes (seen, started, outcome): phase progress is coalesced.
    let report_writes = |h: &Harness| {
        h.consul
            .requests_for(&format!("deploy-hosts/app/{HOST}"))
            .iter()
            .filter(|r| r.method == "PUT")
            .count()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = report_writes(&h);
    r.promote((bucket + 0.001).min(100.0)).await.unwrap();
    h.wait_live("b2", DEADLINE).await;
    wait_report(&h, HOST, "b2 done", |r| {
        r.build.as_deref() == Some("b2") && r.phase == Phase::Done
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cost = report_writes(&h) - before;
    assert!(
        (1..=3).contains(&cost),
        "a deploy cost {cost} report writes"
    );
    assert_eq!(
        h.agent
            .as_ref()
            .unwrap()
            .shared
            .member()
            .unwrap()
            .info()
            .choice
            .as_deref(),
        Some("new")
    );

    // A freeze stops the next deploy until it is lifted.
    r.freeze("incident", "test").await.unwrap();
    wait_until_async("freeze not seen", DEADLINE, || async {
        let member = h.agent.as_ref().unwrap().shared.member().unwrap();
        if member.frozen() {
            Ok(())
        } else {
            Err(format!("{:?}", member.info()))
        }
    })
    .await;
    wait_report(&h, HOST, "frozen", |r| r.frozen).await;
    r.publish(&spec_of(&m3), None).await.unwrap();
    wait_report(&h, HOST, "b3 seen", |r| r.desired.as_deref() == Some("b3")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.served(), "b2", "frozen: no flip");
    r.unfreeze().await.unwrap();
    h.wait_live("b3", DEADLINE).await;

    // Rollback: back to b2 straight from the cold slot, no download.
    let reqs = h.artifacts.stats().requests;
    r.rollback().await.unwrap();
    let rec = h.wait_live("b2", DEADLINE).await;
    assert_eq!(rec.outcome, Some(Outcome::RolledBack));
    assert_eq!(
        h.artifacts.stats().requests,
        reqs,
        "rollback downloads nothing"
    );
    assert!(!rec
        .phase_ms
        .contains_key(&deploy_agent::deploy::Phase::Downloading));
    let rep = wait_report(&h, HOST, "b2 rolled back", |r| {
        r.build.as_deref() == Some("b2") && r.outcome == Some(Outcome::RolledBack)
    })
    .await;
    assert!(!rep.frozen);

    // One write per state change, never periodic: nothing while idle.
    let writes = |h: &Harness| {
        h.consul
            .requests_for(&format!("deploy-hosts/app/{HOST}"))
            .iter()
            .filter(|r| r.method == "PUT")
            .count()
    };
    let before = writes(&h);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(writes(&h), before, "no writes while nothing changes");
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_in_the_cache_or_the_cold_slot_skips_the_splay() {
    let mut h = Harness::new(|c| {
        fleet_member(c, "web-1", Duration::ZERO);
        c.download.cache_keep = 3;
    })
    .await;
    h.start_agent().await;
    let (m1, _) = h.build("b1");
    let (m2, _) = h.build("b2");
    let (m3, _) = h.build("b3");
    for (m, b) in [(&m1, "b1"), (&m2, "b2"), (&m3, "b3")] {
        h.publish(m);
        h.wait_live(b, DEADLINE).await;
    }
    // Slots: b3 hot, b2 cold; the cache holds all three. A day of splay
    // from now on: anything that waits for it cannot finish in time.
    h.stop_agent().await;
    h.config.fleet.splay_max = Some(Duration::from_secs(24 * 3600));
    h.start_agent().await;
    let reqs = h.artifacts.stats().requests;
    h.publish(&m2);
    let r = h.wait_live("b2", DEADLINE).await;
    assert_eq!(r.outcome, Some(Outcome::RolledBack), "from the cold slot");
    h.publish(&m1);
    let r = h.wait_live("b1", DEADLINE).await;
    assert!(r.from_cache, "from the cache: {r:?}");
    assert_eq!(h.artifacts.stats().requests, reqs, "nothing downloaded");
    h.stop_agent().await;
}

/// A fleet member's download waits out its splay in phase `splay`, which
/// status explains and history counts apart from the wait for the cold
/// slot (it used to be counted as `waiting-for-cold-slot`, with no holder
/// named, which reads like a stuck drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_splay_is_its_own_phase_in_status_and_history() {
    let mut h = Harness::new(|c| fleet_member(c, "web-1", Duration::from_secs(24 * 3600))).await;
    h.start_agent().await;
    let (m1, _) = h.build("b1");
    h.publish(&m1);
    let rec = wait_until_async("no splay phase", DEADLINE, || async {
        match h.status().deploy {
            Some(d) if d.phase == Phase::Splay => Ok(d),
            d => Err(format!("{d:#?}")),
        }
    })
    .await;
    assert_eq!(rec.build, "b1");
    // When the phase began, for status's "phase splay for 3s".
    assert!(
        rec.phase_since >= rec.started_at && rec.phase_since > 0,
        "{rec:?}"
    );
    assert_eq!(
        h.artifacts.stats().requests,
        0,
        "nothing fetched during the splay"
    );
    let mut report = deploy_agent::status::model::StatusReport::new(1);
    report.phase = rec.phase;
    let text = deploy_agent::status::render::render_status(&report, false, 0);
    assert!(
        text.contains("phase     splay (a random wait before the download"),
        "{text}"
    );

    // A short splay: the deploy goes through it and history counts it.
    h.stop_agent().await;
    h.config.fleet.splay_max = Some(Duration::from_millis(300));
    h.start_agent().await;
    let r = h.wait_live("b1", DEADLINE).await;
    let splay = r.phase_ms.get(&Phase::Splay).copied();
    assert!(
        splay.is_some_and(|ms| ms <= 1_000),
        "splay in history: {:?}",
        r.phase_ms
    );
    assert!(
        r.phase_ms.contains_key(&Phase::WaitingForColdSlot),
        "{:?}",
        r.phase_ms
    );
    h.stop_agent().await;
}
