//! The reliability features end to end, with the real agent on a real
//! deploy root against loopback servers: the health gate (a real HTTP
//! server that turns unhealthy for one build, and a real command) with its
//! automatic rollback and quarantine, signed manifests (library and the
//! real `deploy-agent keygen` / `sign` binary), and rule 12 across a
//! restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use deploy_agent::config::HealthConfig;
use deploy_agent::deploy::{DeployRecord, Outcome, Phase};
use deploy_agent::status::{Command, CommandRequest, Peer};
use deploy_agent_tests::agent::{Harness, KEY};
use deploy_agent_tests::{wait_until_async, DEADLINE};

// ---- log capture: one global subscriber for this test binary ----

fn logs() -> &'static Mutex<Vec<u8>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(b.clone()))
            .try_init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(needles: &[&str]) -> Vec<String> {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

// ---- a tiny health endpoint: unhealthy while a "bad" build is served ----

struct HealthServer {
    url: String,
    root: Arc<Mutex<PathBuf>>,
    bad: Arc<Mutex<HashSet<String>>>,
    requests: Arc<AtomicU64>,
}

impl HealthServer {
    fn start() -> HealthServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        let root = Arc::new(Mutex::new(PathBuf::new()));
        let bad = Arc::new(Mutex::new(HashSet::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let (r, b, n) = (root.clone(), bad.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => req.extend_from_slice(&buf[..k]),
                    }
                }
                n.fetch_add(1, Ordering::Relaxed);
                // What the app would serve: the live build.
                let path = r.lock().unwrap().join("current/BUILD");
                let live = std::fs::read_to_string(path).unwrap_or_default();
                let code = if b.lock().unwrap().contains(&live) {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let _ = conn.write_all(
                    format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        HealthServer {
            url,
            root,
            bad,
            requests,
        }
    }

    fn fail(&self, build: &str) {
        self.bad.lock().unwrap().insert(build.into());
    }

    fn heal(&self, build: &str) {
        self.bad.lock().unwrap().remove(build);
    }
}

fn fast_health() -> HealthConfig {
    HealthConfig {
        timeout: Duration::from_millis(500),
        window: Duration::from_millis(1500),
        interval: Duration::from_millis(100),
        ..HealthConfig::default()
    }
}

/// Waits for a finished deploy of `build` with `outcome`.
async fn wait_outcome(h: &Harness, build: &str, outcome: Outcome) -> DeployRecord {
    let what = format!("no {outcome:?} deploy of {build}");
    wait_until_async(&what, DEADLINE, || async {
        let s = h.status();
        match s
            .history
            .iter()
            .find(|r| r.build == build && r.outcome == Some(outcome))
        {
            Some(r) => Ok(r.clone()),
            None => Err(format!("status: {s:#?}")),
        }
    })
    .await
}

fn with_deploy_id(manifest: &str, id: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(manifest).unwrap();
    v["deploy_id"] = id.into();
    v.to_string()
}

fn guard_file(root: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(root.join(".deploy/guard.json")).unwrap()).unwrap()
}

async fn redeploy(h: &Harness) -> Result<serde_json::Value, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    h.agent
        .as_ref()
        .unwrap()
        .commands
        .send(CommandRequest {
            command: Command::Redeploy,
            peer: Peer {
                pid: 1,
                uid: 0,
                gid: 0,
            },
            reply: tx,
        })
        .await
        .unwrap();
    rx.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_build_is_rolled_back_quarantined_and_a_new_build_deploys() {
    logs();
    let health = HealthServer::start();
    let url = health.url.clone();
    let mut h = Harness::new(|c| {
        c.health = HealthConfig {
            url: Some(url),
            ..fast_health()
        }
    })
    .await;
    *health.root.lock().unwrap() = h.root.clone();
    h.start_agent().await;

    let (ma, _) = h.build("h-a");
    h.publish(&ma);
    let ra = h.wait_live("h-a", DEADLINE).await;
    assert!(
        ra.phase_ms
            .contains_key(&deploy_agent::deploy::Phase::Verifying),
        "{ra:?}"
    );
    assert!(health.requests.load(Ordering::Relaxed) >= 1);

    // B turns the app unhealthy: the agent flips back to A by itself.
    health.fail("h-b");
    let (mb, _) = h.build("h-b");
    h.publish(&mb);
    let rb = wait_outcome(&h, "h-b", Outcome::HealthFailed).await;
    assert_eq!(h.served(), "h-a", "flipped back to A");
    assert_eq!(rb.phase, Phase::Failed);
    assert_eq!(rb.rolled_back_to.as_deref(), Some("h-a"));
    let msg = &rb.error.as_ref().unwrap().message;
    assert!(
        msg.contains("failed its health check") && msg.contains("answered 503, expected 200"),
        "{msg}"
    );
    let last = h.status().last_error.unwrap().message;
    assert!(last.contains("rolled back to h-a"), "{last}");
    let metrics = h.agent.as_ref().unwrap().metrics.render();
    assert!(
        metrics.contains("deploy_agent_health_rollbacks_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("deploy_agent_deploys_total{outcome=\"health-failed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("build=\"h-a\""), "{metrics}");
    assert_eq!(guard_file(&h.root)["quarantined"]["build"], "h-b");
    // What `deploy-agent history` / `status` serve (the view holds the
    // deploy root: dropped before the restart below).
    {
        let view = {
            let a = h.agent.as_ref().unwrap();
            deploy_agent::daemon::report::AgentView::new(
                a.shared.clone(),
                a.deployer.clone(),
                None,
                a.metrics.clone(),
            )
        };
        use deploy_agent::status::StatusSource as _;
        let top = &view.history()[0];
        assert_eq!(top.build, "h-b");
        assert_eq!(
            top.outcome,
            Some(deploy_agent::status::model::Outcome::HealthFailed)
        );
        let report = view.status();
        assert_eq!(report.hot.unwrap().build.as_deref(), Some("h-a"));
        assert!(report.last_error.unwrap().message.contains("health check"));
    }
    assert!(!log_lines_with(&["health check failed", "h-b"]).is_empty());
    let rolled = log_lines_with(&["unhealthy build rolled back", "h-a"]);
    assert!(!rolled.is_empty());
    // The figure for docs/reliability.md's health-gate section (printed, not asserted).
    eprintln!("rollback log line: {}", rolled[0]);

    // The same build published again (new deploy id, same artifact): no deploy.
    let deploys = h.status().history.len();
    h.publish(&with_deploy_id(&mb, "again"));
    let e = h.wait_error("quarantined", DEADLINE).await;
    assert!(e.contains("h-b") && e.contains("redeploy"), "{e}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.status().history.len(), deploys);
    assert_eq!(h.served(), "h-a");
    assert!(!log_lines_with(&["not deploying a quarantined build", "h-b"]).is_empty());

    // A restart does not retry it either.
    h.stop_agent().await;
    h.start_agent().await;
    h.wait_error("quarantined", DEADLINE).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = h.status();
    assert!(s.history.is_empty(), "no deploy after restart: {s:#?}");
    assert_eq!(s.desired.as_ref().unwrap().build, "h-b");
    assert_eq!(h.served(), "h-a");

    // A different build deploys, and lifts the quarantine.
    let (mc, _) = h.build("h-c");
    h.publish(&mc);
    h.wait_live("h-c", DEADLINE).await;
    assert!(guard_file(&h.root)["quarantined"].is_null());
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeploy_retries_a_quarantined_build() {
    logs();
    let health = HealthServer::start();
    let url = health.url.clone();
    let mut h = Harness::new(|c| {
        c.health = HealthConfig {
            url: Some(url),
            ..fast_health()
        }
    })
    .await;
    *health.root.lock().unwrap() = h.root.clone();
    h.start_agent().await;
    let (ma, _) = h.build("r-a");
    h.publish(&ma);
    h.wait_live("r-a", DEADLINE).await;
    health.fail("r-b");
    let (mb, _) = h.build("r-b");
    h.publish(&mb);
    wait_outcome(&h, "r-b", Outcome::HealthFailed).await;
    assert_eq!(h.served(), "r-a");

    // The app is fixed; the operator asks for the build again.
    health.heal("r-b");
    redeploy(&h).await.unwrap();
    h.wait_live("r-b", DEADLINE).await;
    assert!(guard_file(&h.root)["quarantined"].is_null());
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_check_rolls_back_and_reports_when_there_is_nothing_to_roll_back_to() {
    logs();
    let tmp = deploy_agent_tests::fast_tempdir();
    let fails = tmp.path().join("failing-builds");
    std::fs::write(&fails, "c-0\nc-b\n").unwrap();
    let script = format!(
        "b=$(cat \"$DEPLOY_ROOT/current/BUILD\"); test \"$b\" = \"$DEPLOY_BUILD\" && ! grep -qx \"$b\" {}",
        fails.display()
    );
    let mut h = Harness::new(|c| {
        c.health = HealthConfig {
            command: Some(vec!["sh".into(), "-c".into(), script]),
            ..fast_health()
        }
    })
    .await;
    h.start_agent().await;

    // The very first build fails: nothing to flip back to, said plainly.
    let (m0, _) = h.build("c-0");
    h.publish(&m0);
    let r0 = wait_outcome(&h, "c-0", Outcome::HealthFailed).await;
    let msg = &r0.error.as_ref().unwrap().message;
    assert!(msg.contains("cannot be rolled back"), "{msg}");
    assert!(r0.rolled_back_to.is_none());
    assert_eq!(h.served(), "c-0");
    assert_eq!(guard_file(&h.root)["quarantined"]["build"], "c-0");
    let metrics = h.agent.as_ref().unwrap().metrics.render();
    assert!(metrics.contains("build=\"c-0\""), "{metrics}");
    assert!(
        metrics.contains("deploy_agent_health_rollbacks_total 0"),
        "{metrics}"
    );

    let (ma, _) = h.build("c-a");
    h.publish(&ma);
    h.wait_live("c-a", DEADLINE).await;
    let (mb, _) = h.build("c-b");
    h.publish(&mb);
    let rb = wait_outcome(&h, "c-b", Outcome::HealthFailed).await;
    assert_eq!(rb.rolled_back_to.as_deref(), Some("c-a"));
    assert_eq!(h.served(), "c-a");
    let msg = &rb.error.as_ref().unwrap().message;
    assert!(
        msg.contains("health-check") && msg.contains("exited with status 1"),
        "{msg}"
    );
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_modify_index_after_restart_is_reread_in_default_mode() {
    let mut h = Harness::new(|_| {}).await;
    // Push the index up so the restored one is clearly lower.
    for i in 0..20 {
        h.consul.put("other/key", format!("{i}"));
    }
    h.start_agent().await;
    let (ma, _) = h.build("i-a");
    h.publish(&ma);
    h.wait_live("i-a", DEADLINE).await;
    let applied = guard_file(&h.root)["applied_modify_index"]
        .as_u64()
        .unwrap();
    assert!(applied > 20, "applied index {applied} persisted");
    h.stop_agent().await;

    // A snapshot restore: the key comes back with a lower ModifyIndex.
    h.consul.reset_index(1);
    let (mb, _) = h.build("i-b");
    h.publish(&mb);
    assert!(h.consul.get(KEY).unwrap().modify_index < applied);
    let since = Instant::now();
    h.start_agent().await;
    h.wait_live("i-b", DEADLINE).await;
    let reqs: Vec<_> = h
        .consul
        .requests_for(KEY)
        .into_iter()
        .filter(|r| r.at >= since.into())
        .collect();
    assert!(reqs[0].query.contains("stale"), "{reqs:?}");
    assert!(
        reqs.iter().any(|r| !r.query.contains("stale")),
        "no default-mode re-read before acting: {reqs:?}"
    );
    assert!(h.agent.as_ref().unwrap().watch_stats.snapshot().rereads >= 1);
    h.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_configured_only_correctly_signed_manifests_deploy() {
    use base64::Engine as _;
    let key = deploy_agent::sign::generate();
    let other = deploy_agent::sign::generate();
    let public = base64::engine::general_purpose::STANDARD.encode(key.verifying_key().as_bytes());
    let mut h = Harness::new(|c| c.signing.public_keys = vec![public]).await;
    h.start_agent().await;
    let (m, _) = h.build("s-a");

    h.publish(&m);
    let e = h.wait_error("signatures", DEADLINE).await;
    assert!(
        e.contains("missing") && e.contains("deploy-agent sign"),
        "{e}"
    );

    h.publish(&deploy_agent::sign::sign(m.as_bytes(), &other).unwrap());
    h.wait_error("unknown key", DEADLINE).await;

    let signed = deploy_agent::sign::sign(m.as_bytes(), &key).unwrap();
    let mut tampered: serde_json::Value = serde_json::from_str(&signed).unwrap();
    tampered["url"] = "http://127.0.0.1:1/evil.tar.gz".into();
    h.publish(&tampered.to_string());
    h.wait_error("does not match", DEADLINE).await;
    assert_eq!(h.served(), "", "nothing rejected was deployed");
    assert!(h.status().history.is_empty());

    h.publish(&signed);
    h.wait_live("s-a", DEADLINE).await;
    h.stop_agent().await;
}

#[test]
fn keygen_and_sign_round_trip_through_the_binary() {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = deploy_agent_tests::agent_bin();
    let tmp = deploy_agent_tests::fast_tempdir();
    let key = tmp.path().join("release.key");
    let out = std::process::Command::new(&bin)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("public-keys = ["), "{stdout}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let public = std::fs::read_to_string(tmp.path().join("release.key.pub")).unwrap();

    // An existing key is never overwritten.
    let again = std::process::Command::new(&bin)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!again.status.success());

    let manifest = tmp.path().join("m.json");
    let sha = "ab".repeat(32);
    std::fs::write(
        &manifest,
        format!(r#"{{"build":"k-1","url":"https://a/k-1.tar","sha256":"{sha}","size":5,"format":"tar"}}"#),
    )
    .unwrap();
    let signed = std::process::Command::new(&bin)
        .args(["sign", "--key"])
        .arg(&key)
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(signed.status.success(), "{signed:?}");
    let trust = deploy_agent::sign::TrustedKeys::parse(&[public.trim().to_string()]).unwrap();
    deploy_agent::sign::verify(&signed.stdout, &trust).unwrap();
    let parsed = deploy_agent::manifest::Manifest::parse(&signed.stdout, Default::default());
    assert_eq!(parsed.unwrap().spec.build, "k-1");

    // A manifest that is not valid is refused, not signed.
    std::fs::write(&manifest, r#"{"build":"k-1"}"#).unwrap();
    let bad = std::process::Command::new(&bin)
        .args(["sign", "--key"])
        .arg(&key)
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("url"),
        "{bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_left_unjudged_by_a_crash_is_judged_again_at_start() {
    logs();
    let health = HealthServer::start();
    let url = health.url.clone();
    let mut h = Harness::new(|c| {
        c.health = HealthConfig {
            url: Some(url),
            ..fast_health()
        }
    })
    .await;
    *health.root.lock().unwrap() = h.root.clone();
    h.start_agent().await;
    let (ma, _) = h.build("u-a");
    h.publish(&ma);
    h.wait_live("u-a", DEADLINE).await;
    let (mb, _) = h.build("u-b");
    h.publish(&mb);
    h.wait_live("u-b", DEADLINE).await;
    h.stop_agent().await;

    // What a crash during the gate leaves on disk: B live, record in
    // `verifying`. B's app is broken now.
    let state = h.root.join(".deploy/deploy.json");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(rec["build"], "u-b");
    rec["phase"] = "verifying".into();
    rec["outcome"] = serde_json::Value::Null;
    rec["finished_at"] = serde_json::Value::Null;
    std::fs::write(&state, serde_json::to_vec(&rec).unwrap()).unwrap();
    health.fail("u-b");

    h.start_agent().await;
    let r = wait_outcome(&h, "u-b", Outcome::HealthFailed).await;
    assert_eq!(r.rolled_back_to.as_deref(), Some("u-a"));
    assert_eq!(h.served(), "u-a");
    assert_eq!(guard_file(&h.root)["quarantined"]["build"], "u-b");
    h.stop_agent().await;
}
