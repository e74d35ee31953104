//! Operator and commander intent survives what a host lives through
//! (issue "Control you can trust", items 1 and 2), on the real binary with
//! the shipped `[consul]` rate settings:
//! - an operator rollback is not undone by SIGKILL + restart, a SIGTERM
//!   restart, or a reload with a changed config; only `resume` lifts it;
//! - `release freeze` then `release rollback` a moment later flips nobody
//!   while the fleet is frozen, with host reports being written meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use deploy_agent_tests::fast_tempdir;
use deploy_agent_tests::host::{in_process_release, publish, release, tiny_spec, Host};
use deploy_agent_tests::{wait_until_async, wait_until_every_async, DEADLINE};
use nix::sys::signal::Signal;
use testkit::testserver::artifact::ArtifactServer;
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig};

/// Host h1, a real agent process with the shipped settings, serving b1
/// published through its Consul-compatible server and artifact server.
async fn host_h1_serving_b1() -> (tempfile::TempDir, ConsulServer, ArtifactServer, Host) {
    let tmp = fast_tempdir();
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let art = ArtifactServer::start().await.unwrap();
    let mut h = Host::new(tmp.path(), "h1", &consul.url(), "");
    h.start();
    publish(&consul, &art, tmp.path(), "b1");
    h.wait_served("b1");
    (tmp, consul, art, h)
}

/// A command sent while a reload rebuilds the agent's parts is run, never
/// lost: the old parts answer 503 with `retry-after` ("not run"), or close
/// before reading it, and the CLI sends it again. intent_random hit both
/// windows before: seed 10096442218051712131 (`503 the agent is shutting
/// down`) and seed 12692687678702776702 (`hold`: Broken pipe). Reloads go
/// on, with a burst of CLIs in flight each time, until one CLI says it
/// sent a command again, so the window was really hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_during_a_reload_are_run_not_lost() {
    // The temp dir and the artifact server live as long as the test.
    let (_tmp, consul, _art, h) = host_h1_serving_b1().await;
    let sock = h.sock();
    let mut reloads = 0u32;
    wait_until_async("a command caught in a reload", DEADLINE, || {
        reloads += 1;
        let timeout = 40 + reloads;
        h.write_config(
            "h1",
            &consul.url(),
            &format!("[hooks]\ntimeout = \"{timeout}s\""),
        );
        h.proc().signal(Signal::SIGHUP);
        let sock = sock.clone();
        async move {
            let outs = tokio::task::spawn_blocking(move || burst_of_verify(&sock))
                .await
                .unwrap();
            let mut resent = false;
            for out in &outs {
                let err = String::from_utf8_lossy(&out.stderr);
                // Run (0), or caught between the old socket and the new
                // one before any "not run" answer (3: an operator's retry).
                assert!(
                    matches!(out.status.code(), Some(0) | Some(3)),
                    "reload {reloads}: a command failed: {err}"
                );
                resent |= err.contains("sending it again");
            }
            match resent {
                true => Ok(()),
                false => Err(format!(
                    "{} commands, none caught in reload {reloads}",
                    outs.len()
                )),
            }
        }
    })
    .await;
    let hist = h.cli(&["status", "--json"]);
    assert!(hist.status.success());
}

/// Four threads each sending `verify` for 1.5 s.
fn burst_of_verify(sock: &std::path::Path) -> Vec<std::process::Output> {
    let until = Instant::now() + Duration::from_millis(1500);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(move || {
                    let mut outs = Vec::new();
                    while Instant::now() < until {
                        outs.push(
                            std::process::Command::new(deploy_agent_tests::agent_bin())
                                .args(["verify", "--socket"])
                                .arg(sock)
                                .env("NO_COLOR", "1")
                                .output()
                                .unwrap(),
                        );
                    }
                    outs
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_rollback_survives_sigkill_restart_and_reload() {
    let (tmp, consul, art, mut h) = host_h1_serving_b1().await;
    publish(&consul, &art, tmp.path(), "b2");
    h.wait_served("b2");

    let out = h.cli(&["rollback"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(h.served(), "b1");
    let held = |h: &Host| {
        let v = h.status();
        assert_eq!(v["state"]["state"], "held", "{v:#}");
        assert_eq!(v["state"]["pinned"], "b1", "{v:#}");
        assert_eq!(v["hold"]["held"], true);
    };
    held(&h);

    // SIGKILL (a crash, a watchdog kill) and start again.
    h.proc().signal(Signal::SIGKILL);
    h.proc.as_mut().unwrap().wait_exit(DEADLINE);
    h.start();
    held(&h);
    // Once the new process has read the key (after its first-request
    // splay, up to 5 s with the shipped settings) and decided on it, it
    // must still hold b1. A fixed sleep shorter than the splay proved
    // nothing: the agent might not have read the key yet.
    h.proc().wait_log("desired state received", DEADLINE);
    held(&h);
    assert_eq!(h.served(), "b1", "a restart undid the operator rollback");

    // A clean restart (systemctl restart).
    h.proc().signal(Signal::SIGTERM);
    h.proc.as_mut().unwrap().wait_exit(DEADLINE);
    h.start();
    held(&h);

    // A reload with a changed config rebuilds the agent's parts.
    h.write_config("h1", &consul.url(), "[hooks]\ntimeout = \"42s\"");
    h.proc().signal(Signal::SIGHUP);
    h.proc().wait_log("config changed", DEADLINE);
    // The rebuilt watch reads the key again and the loop decides on it.
    h.proc()
        .wait_log_after("config changed", "desired state received", DEADLINE);
    held(&h);
    assert_eq!(h.served(), "b1", "a reload undid the operator rollback");

    // History survived the restarts and records the operator's action.
    let out = h.cli(&["history", "--json"]);
    let hist: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = hist
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"rollback"), "{hist:#}");
    assert!(
        kinds.iter().filter(|k| **k == "deploy").count() >= 2,
        "{hist:#}"
    );

    // Only an explicit command lifts it.
    let out = h.cli(&["resume"]);
    assert!(out.status.success());
    h.wait_served("b2");
    assert_eq!(h.status()["state"]["state"], "idle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_then_release_rollback_flips_nobody_until_unfreeze() {
    let tmp = fast_tempdir();
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let art = ArtifactServer::start().await.unwrap();
    let mut hosts: Vec<Host> = ["h1", "h2"]
        .iter()
        .map(|id| Host::new(tmp.path(), id, &consul.url(), ""))
        .collect();
    for h in &mut hosts {
        h.start();
    }
    publish(&consul, &art, tmp.path(), "b1");
    for h in &hosts {
        h.wait_served("b1");
    }
    // Past the watches' first-request splay (up to 5 s after start), so
    // their first reads do not count as wake-ups.
    std::thread::sleep(Duration::from_secs(6));
    // The agents' requests only (their watch reads are `?stale`, their
    // checks `?consistent`); the release commands read the key too.
    let freeze_reads = |c: &ConsulServer| {
        c.requests_for("deploy/app/freeze")
            .iter()
            .filter(|r| r.query.contains("stale") || r.query.contains("consistent"))
            .count()
    };
    let report_writes = |c: &ConsulServer| {
        (0..2)
            .map(|i| {
                c.requests_for(&format!("deploy-hosts/app/h{}", i + 1))
                    .iter()
                    .filter(|r| r.method == "PUT")
                    .count()
            })
            .sum::<usize>()
    };
    let (reads0, writes0) = (freeze_reads(&consul), report_writes(&consul));
    let window = Instant::now();
    publish(&consul, &art, tmp.path(), "b2");
    for h in &hosts {
        h.wait_served("b2");
    }
    // Let the hosts' reports and watches settle into their blocking reads.
    std::thread::sleep(Duration::from_secs(2));
    let window = window.elapsed();
    // Per host and deploy: the consistent read before acting and the one
    // before the flip, plus the freeze watch's re-asks. A missing key's
    // blocking query answers with the KV table's index, so while other keys
    // are written (the tier key, reports) it returns at once; the watch
    // paces those wake-ups by WAKE_GAP and they cost it no token. Before,
    // each wake-up spent a token, and the watch slept 15 s when its key
    // was finally written.
    let (reads, writes) = (
        freeze_reads(&consul) - reads0,
        report_writes(&consul) - writes0,
    );
    let gap = deploy_agent::source::consul::WAKE_GAP;
    let bound = 2 * (3 + (window.as_millis() / gap.as_millis()) as usize);
    println!(
        "one deploy on 2 hosts: {writes} report writes, {reads} freeze-key requests by the agents in {:.1} s (bound {bound})",
        window.as_secs_f64()
    );
    // At most four per host: the deploy's phases, and since slot integrity
    // the check of the new live slot against its record, which the report
    // carries (it may land with another write or on its own).
    assert!(
        writes <= 8,
        "{writes} report writes for one deploy on 2 hosts"
    );
    assert!(
        reads <= bound,
        "{reads} freeze-key requests: the wake-ups are not paced"
    );

    // docs/fleet.md's incident steps, a moment apart.
    let frozen_at = Instant::now();
    release(&consul.url(), &["freeze", "--reason", "incident"]);
    std::thread::sleep(Duration::from_millis(300));
    release(&consul.url(), &["rollback"]);
    // Watch both hosts for a while: neither may flip.
    let mut acked = vec![None; hosts.len()];
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(8) {
        for (i, h) in hosts.iter().enumerate() {
            assert_eq!(h.served(), "b2", "host {i} flipped while frozen");
            if acked[i].is_none() {
                let v = h.status();
                if v["fleet"]["frozen"] == true {
                    acked[i] = Some(frozen_at.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (i, a) in acked.iter().enumerate() {
        let a = a.unwrap_or_else(|| panic!("host {i} never showed the freeze"));
        println!(
            "host {i} showed the freeze at its first check after `release rollback` ({} ms after the freeze began)",
            a.as_millis()
        );
    }
    for h in &hosts {
        let v = h.status();
        assert_eq!(v["state"]["state"], "frozen", "{v:#}");
    }

    release(&consul.url(), &["unfreeze"]);
    for h in &hosts {
        h.wait_served("b1");
    }

    // The figure for docs/fleet.md: from `release freeze` returning to every
    // host showing it, with the shipped rates, while the hosts write their
    // reports (each writes one for the freeze itself).
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    release(&consul.url(), &["freeze"]);
    let returned = t0.elapsed();
    let mut pending: Vec<usize> = (0..hosts.len()).collect();
    // Polled every 5 ms: the time to every host's ack is the figure.
    wait_until_every_async(
        "every host to show the freeze",
        DEADLINE,
        Duration::from_millis(5),
        || {
            pending.retain(|&i| hosts[i].status()["fleet"]["frozen"] != true);
            std::future::ready(if pending.is_empty() {
                Ok(())
            } else {
                Err(format!("hosts {pending:?} never saw the freeze"))
            })
        },
    )
    .await;
    println!(
        "freeze-ack: `release freeze` took {} ms; every host showed it {} ms after it returned",
        returned.as_millis(),
        (t0.elapsed() - returned).as_millis()
    );
}

/// A hold cancels the running deploy at its next safe point; a `resume`
/// that arrives before the deploy got there must still deploy the desired
/// build. The main loop used to keep the cancelled deploy as "the one
/// running for this manifest", so its end left the agent idle, serving the
/// old build with nothing in status (intent_random seed
/// 14289203681835957410). The same holds for a freeze lifted while a
/// deploy it cancelled is still finishing its pre-flip hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_or_unfreeze_before_a_cancelled_deploy_ends_still_deploys() {
    let tmp = fast_tempdir();
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let art = ArtifactServer::start().await.unwrap();
    // The pre-flip hook is not cancelled (a half-run hook is worse than a
    // finished one), so a cancelled deploy takes 2 s to end.
    let hook = "[hooks]\npre-flip = [\"/bin/sleep\", \"2\"]";
    let mut h = Host::new(tmp.path(), "h1", &consul.url(), hook);
    h.start();
    publish(&consul, &art, tmp.path(), "b1");
    h.wait_served("b1");
    async fn in_hook(h: &Host) {
        wait_until_async("never reached the pre-flip hook", DEADLINE, || async {
            match h.status()["phase"].clone() {
                phase if phase == "draining" => Ok(()),
                phase => Err(format!("phase {phase}")),
            }
        })
        .await;
    }

    publish(&consul, &art, tmp.path(), "b2");
    in_hook(&h).await;
    assert!(h.cli(&["hold", "--reason", "look"]).status.success());
    assert!(h.cli(&["resume"]).status.success());
    h.wait_served("b2");

    publish(&consul, &art, tmp.path(), "b3");
    in_hook(&h).await;
    release(&consul.url(), &["freeze", "--reason", "look"]);
    wait_until_async("the freeze was never seen", DEADLINE, || async {
        match h.status()["fleet"].clone() {
            fleet if fleet["frozen"] == true => Ok(()),
            fleet => Err(format!("fleet {fleet}")),
        }
    })
    .await;
    release(&consul.url(), &["unfreeze"]);
    h.wait_served("b3");
    let v = h.status();
    assert_eq!(v["state"]["state"], "idle", "{v:#}");
}

/// The freeze has two readers on a host: its watch, and the consistent
/// read before acting on a tier change. When only that read saw the
/// freeze (the watch was pacing a wake-up that changed nothing), the watch
/// went on believing "missing" and read the unfreeze as no change: the
/// host stayed frozen for good (intent_random seed 10224047685890240801).
/// In-process writes make the whole sequence fit in the watch's 500 ms
/// pacing gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfreeze_reaches_a_host_whose_watch_never_saw_the_freeze() {
    let tmp = fast_tempdir();
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let art = ArtifactServer::start().await.unwrap();
    let release = in_process_release(&consul);
    let specs: Vec<_> = ["b1", "b2"]
        .iter()
        .map(|b| tiny_spec(&art, tmp.path(), b))
        .collect();
    let mut h = Host::new(tmp.path(), "h1", &consul.url(), "");
    h.start();
    release.publish(&specs[0], None).await.unwrap();
    h.wait_served("b1");
    // Past the first-request splay: the freeze watch has read "missing".
    tokio::time::sleep(Duration::from_secs(6)).await;

    // Writes in the freeze key's radix subtree wake its watch with no
    // change. The first ends a query held for seconds; the second wakes
    // the next one at once, and a quick wake-up that changed nothing
    // makes the watch wait WAKE_GAP (500 ms) before asking again.
    consul.put("deploy/app/poke", "x");
    tokio::time::sleep(Duration::from_millis(50)).await;
    consul.put("deploy/app/poke", "y");
    tokio::time::sleep(Duration::from_millis(20)).await;
    release.freeze("incident", "test").await.unwrap();
    release.publish(&specs[1], None).await.unwrap();
    h.proc()
        .wait_log("fleet freeze changed (confirmed before acting)", DEADLINE);
    release.unfreeze().await.unwrap();
    h.wait_served("b2");
    let v = h.status();
    assert_eq!(v["fleet"]["frozen"], false, "{v:#}");
    assert_eq!(v["state"]["state"], "idle", "{v:#}");
}
