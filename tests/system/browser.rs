//! The fleet page (`deploy-agent fleet serve`) in a real browser: headless
//! Debian Chromium driven over WebDriver (chromedriver) with fantoccini,
//! against the in-process Consul-compatible server and synthetic host
//! reports written with the agents' own `HostRecord`.
//!
//! The rollout: publish, promote twice (page buttons), a host fails (and
//! one goes silent), freeze, rollback, unfreeze (page buttons); after each
//! step it asserts on what the page shows and, for the buttons, on what
//! reached Consul, and saves a screenshot under `target/fleet-page/`. Then
//! a conflict (two pages; the second promote is refused), 5,000 hosts
//! (render time printed, not asserted) and the Consul requests one open
//! page costs (printed, and asserted not to grow with the number of pages).
//!
//! Without chromium and chromedriver the browser test says why and passes;
//! `.ci/run` installs both. The security test needs no browser.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deploy_agent::clock::now_secs;
use deploy_agent::consul::{ConsulClient, ConsulSettings};
use deploy_agent::deploy::Phase;
use deploy_agent::fleet::commander::release::Release;
use deploy_agent::fleet::commander::web::feed::FeedSettings;
use deploy_agent::fleet::commander::web::{FleetPage, ServeOptions};
use deploy_agent::fleet::host::hostreport::HostRecord;
use deploy_agent::manifest::{BuildSpec, Format, Manifest, UrlPolicy};
use deploy_agent_tests::precondition;
use deploy_agent_tests::{wait_until_async, wait_until_every_async, DEADLINE};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig};
use tokio_util::sync::CancellationToken;

const APP: &str = "web";
const TIER: &str = "production";
const HOSTS: usize = 40;

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

fn host(i: usize) -> String {
    format!("web-{i:04}")
}

/// The commander's view, with the production `wait` so the page's
/// blocking queries are what a real deployment costs.
fn release(consul: &ConsulServer) -> Release {
    let settings = ConsulSettings {
        address: consul.url(),
        first_request_splay: Duration::ZERO,
        ..ConsulSettings::default()
    };
    Release {
        client: ConsulClient::new(&settings).unwrap(),
        key: deploy_agent::fleet::tier_key(APP, TIER),
        freeze_key: deploy_agent::fleet::freeze_key(APP),
    }
}

async fn start_page(consul: &ConsulServer, read_only: bool) -> (FleetPage, CancellationToken) {
    let shutdown = CancellationToken::new();
    let opts = ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        read_only,
        allow_remote: false,
        origins: Vec::new(),
        user_header: None,
        max_clients: 16,
        feed: FeedSettings {
            app: APP.into(),
            tier: None,
            freeze_key: deploy_agent::fleet::freeze_key(APP),
            report_prefix: deploy_agent::fleet::report_prefix(APP),
            stale_after: Duration::from_secs(3),
            // The CLI's default.
            min_interval: Duration::from_secs(1),
        },
    };
    let page = FleetPage::start(release(consul), opts, shutdown.clone())
        .await
        .unwrap();
    (page, shutdown)
}

fn record(
    h: &str,
    build: Option<&str>,
    desired: Option<&str>,
    seen: u64,
    phase: Phase,
) -> HostRecord {
    HostRecord {
        desired: desired.map(str::to_string),
        seen_index: seen,
        phase,
        agent_version: "test".into(),
        ..HostRecord::fresh(h, Some(TIER.into()), build.map(str::to_string))
    }
}

fn write_report(consul: &ConsulServer, r: &HostRecord) {
    let key = format!("{}{}", deploy_agent::fleet::report_prefix(APP), r.host);
    consul.put(&key, serde_json::to_vec(r).unwrap());
}

/// What the published key says now.
fn published(consul: &ConsulServer) -> (Manifest, Value, u64) {
    let e = consul
        .get(&deploy_agent::fleet::tier_key(APP, TIER))
        .expect("published");
    let m = Manifest::parse(&e.value, UrlPolicy { allow_file: true }).unwrap();
    (m, serde_json::from_slice(&e.value).unwrap(), e.modify_index)
}

/// Every host (but `silent`) acts on the key as an agent would: the build
/// its rollout decision names, idle, the key's index acknowledged.
fn converge(consul: &ConsulServer, silent: &[usize]) {
    let (m, _, index) = published(consul);
    for i in 0..HOSTS {
        if silent.contains(&i) {
            continue;
        }
        let (d, _) = deploy_agent::fleet::effective(&m, &host(i));
        let b = d.build.as_deref();
        let mut r = record(&host(i), b, b, index, Phase::Done);
        r.bucket = Some(d.bucket);
        write_report(consul, &r);
    }
}

/// Every host reads the new key while frozen: it acknowledges it and
/// reports what it would deploy, without deploying.
fn acknowledge_frozen(consul: &ConsulServer) {
    let (m, _, index) = published(consul);
    for i in 0..HOSTS {
        let key = format!("{}{}", deploy_agent::fleet::report_prefix(APP), host(i));
        let mut r: HostRecord = serde_json::from_slice(&consul.get(&key).unwrap().value).unwrap();
        r.desired = deploy_agent::fleet::effective(&m, &host(i)).0.build;
        r.seen_index = index;
        r.frozen = true;
        if r.phase != Phase::Failed {
            r.phase = Phase::Idle;
        }
        r.updated_at = now_secs();
        write_report(consul, &r);
    }
}

// ---- the browser ----

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// chromium and chromedriver, or why the browser test cannot run.
fn browser_binaries() -> Result<(PathBuf, PathBuf), String> {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| which("chromium"))
        .ok_or("chromium is not installed (apt-get install chromium chromium-driver)")?;
    let driver = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| which("chromedriver"))
        .ok_or("chromedriver is not installed (apt-get install chromium-driver)")?;
    Ok((chromium, driver))
}

/// A chromedriver process on a free loopback port; killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start(bin: &Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        wait_until_async("chromedriver did not listen", DEADLINE, || async {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(drop)
                .map_err(|e| format!("port {port}: {e}"))
        })
        .await;
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, chromium: &Path, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage",
                format!("--user-data-dir={}", profile.display()),
                "--window-size=1400,1300",
            ]
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("WebDriver session")
}

/// Runs `script` (a function body returning a value) until `ok` holds.
/// Polls every 100 ms: each poll is a WebDriver round trip.
async fn wait_js(c: &Client, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_until_every_async(
        &format!("page never showed {what}"),
        DEADLINE,
        Duration::from_millis(100),
        || async {
            let v = c.execute(script, vec![]).await.unwrap_or(Value::Null);
            if ok(&v) {
                Ok(v)
            } else {
                Err(format!("{v}"))
            }
        },
    )
    .await
}

async fn text(c: &Client, css: &str) -> String {
    let script = format!(
        "const e = document.querySelector({}); return e ? e.textContent : null;",
        json!(css)
    );
    c.execute(&script, vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn wait_text(c: &Client, css: &str, needle: &str) -> String {
    let script = format!(
        "const e = document.querySelector({}); return e ? e.textContent : null;",
        json!(css)
    );
    let v = wait_js(c, &format!("{needle:?} in {css}"), &script, |v| {
        v.as_str().is_some_and(|s| s.contains(needle))
    })
    .await;
    v.as_str().unwrap_or_default().to_string()
}

fn artifact_dir() -> PathBuf {
    // target/tmp -> target/fleet-page
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("fleet-page");
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let p = artifact_dir().join(format!("{name}.png"));
    std::fs::write(&p, png).unwrap();
    println!("screenshot {}", p.display());
}

/// Clicks a control of the production card, checks the confirmation names
/// tier, build and percentage, and confirms. Returns the dialog's text.
async fn control(c: &Client, button: &str, reason: Option<&str>, names: &[&str]) -> String {
    let css = format!("#tier-{TIER} button.{button}");
    c.find(Locator::Css(&css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        c,
        "the confirmation",
        "return document.getElementById('confirm').open;",
        |v| v == &json!(true),
    )
    .await;
    let said = format!("{} {}", text(c, "#c-text").await, text(c, "#c-cli").await);
    for n in names {
        assert!(
            said.contains(n),
            "confirmation {said:?} does not name {n:?}"
        );
    }
    if let Some(r) = reason {
        c.find(Locator::Css("#c-reason"))
            .await
            .unwrap()
            .send_keys(r)
            .await
            .unwrap();
    }
    let actions = c
        .execute("return window.fleetStats.actions;", vec![])
        .await
        .unwrap();
    c.find(Locator::Css("#c-ok"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        c,
        "the control's answer",
        "return window.fleetStats.actions;",
        |v| v.as_u64() > actions.as_u64(),
    )
    .await;
    said
}

async fn wait_consul(what: &str, ok: impl Fn() -> bool) {
    wait_until_async(&format!("Consul never got {what}"), DEADLINE, || async {
        if ok() {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_in_a_real_browser() {
    let (chromium, driver_bin) = match browser_binaries() {
        Ok(b) => b,
        Err(why) => {
            precondition(Some(why));
            return;
        }
    };
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let r = release(&consul);
    let freeze_key = deploy_agent::fleet::freeze_key(APP);

    // Build b1 everywhere, then b2 published at 2% (the CLI's functions).
    r.publish(&spec("b1"), None).await.unwrap();
    converge(&consul, &[]);
    r.publish(&spec("b2"), Some(2.0)).await.unwrap();
    converge(&consul, &[]);

    let (page, shutdown) = start_page(&consul, false).await;
    let driver = Driver::start(&driver_bin).await;
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, &chromium, profile.path()).await;
    let card = format!("#tier-{TIER}");
    let t0 = Instant::now();
    c.goto(&page.url()).await.unwrap();

    // 1. publish: the page shows the tier as the release command wrote it.
    wait_text(&c, &format!("{card} .build"), "b2").await;
    println!(
        "first snapshot rendered {:?} after navigation",
        t0.elapsed()
    );
    assert_eq!(text(&c, &format!("{card} .percent")).await, "2%");
    assert_eq!(text(&c, &format!("{card} .previous")).await, "b1");
    assert_eq!(
        text(&c, &format!("{card} .freeze-state")).await,
        "not frozen"
    );
    assert!(text(&c, &format!("{card} .produced"))
        .await
        .contains("publish --build b2"));
    wait_text(&c, "#host-count", &HOSTS.to_string()).await;
    assert!(text(&c, &format!("{card} .per-build")).await.contains("b1"));
    screenshot(&c, "01-publish-2pct").await;

    // 2. promote from the page: 2 -> 10.
    let said = control(
        &c,
        "promote",
        None,
        &[TIER, "b2", "10%", "promote --percent 10"],
    )
    .await;
    println!("promote confirmation: {said}");
    wait_consul("the promote to 10%", || {
        published(&consul).0.percent == Some(10.0)
    })
    .await;
    wait_text(&c, "#banner", "promoted b2 to 10%").await;
    converge(&consul, &[]);
    wait_text(&c, &format!("{card} .percent"), "10%").await;
    let step = wait_text(&c, &format!("{card} .step-text[data-step='10']"), "(100%)").await;
    println!("step 10%: {step}");
    screenshot(&c, "02-promote-10pct").await;

    // 3. promote again: 10 -> 25; one host (the silent one) never acts on it.
    let silent = 39;
    control(&c, "promote", None, &[TIER, "b2", "25%"]).await;
    wait_consul("the promote to 25%", || {
        published(&consul).0.percent == Some(25.0)
    })
    .await;
    converge(&consul, &[silent]);
    wait_text(&c, &format!("{card} .percent"), "25%").await;
    screenshot(&c, "03-promote-25pct").await;

    // 4. a host of the 25% fails; the silent one turns stale.
    let (m, _, index) = published(&consul);
    let failing = (0..HOSTS)
        .find(|i| {
            *i != silent
                && deploy_agent::fleet::effective(&m, &host(*i))
                    .0
                    .build
                    .as_deref()
                    == Some("b2")
        })
        .expect("a host in the 25%");
    let mut bad = record(&host(failing), Some("b1"), Some("b2"), index, Phase::Failed);
    bad.error =
        Some("not enough free space on /srv/web: need 734003200 bytes, 1048576 free".into());
    write_report(&consul, &bad);
    let failed = wait_text(&c, "#failed", &host(failing)).await;
    assert!(failed.contains("not enough free space"), "{failed}");
    assert_eq!(text(&c, "#failed-count").await, "1");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Any write triggers a recompute; the 10 s tick would too.
    converge(&consul, &[silent, failing]);
    let stale = wait_text(&c, "#stale", &host(silent)).await;
    assert!(stale.contains("silent for"), "{stale}");
    screenshot(&c, "04-host-fails").await;

    // 5. freeze from the page.
    control(
        &c,
        "freeze",
        Some("errors on checkout"),
        &[TIER, "b2", "25%"],
    )
    .await;
    wait_consul("the freeze", || consul.get(&freeze_key).is_some()).await;
    let f: Value = serde_json::from_slice(&consul.get(&freeze_key).unwrap().value).unwrap();
    assert_eq!(f["reason"], "errors on checkout");
    assert!(f["by"].as_str().unwrap().contains("fleet page"), "{f}");
    wait_text(&c, &format!("{card} .freeze-state"), "errors on checkout").await;
    assert!(text(&c, "#freeze").await.contains("FROZEN"));
    screenshot(&c, "05-freeze").await;

    // 6. rollback from the page.
    control(&c, "rollback", None, &[TIER, "b2", "b1", "25%", "100%"]).await;
    wait_consul("the rollback", || published(&consul).0.spec.build == "b1").await;
    let (m, raw, _) = published(&consul);
    assert_eq!(m.percent, Some(100.0));
    assert_eq!(raw["rolled_back_from"], "b2");
    acknowledge_frozen(&consul);
    wait_text(&c, &format!("{card} .build"), "b1").await;
    wait_text(&c, &format!("{card} .produced"), "rollback").await;
    screenshot(&c, "06-rollback").await;

    // 7. unfreeze from the page; the hosts flip back.
    control(&c, "unfreeze", None, &[TIER, "b1", "100%"]).await;
    wait_consul("the unfreeze", || consul.get(&freeze_key).is_none()).await;
    wait_text(&c, &format!("{card} .freeze-state"), "not frozen").await;
    converge(&consul, &[]);
    wait_text(&c, &format!("{card} .hosts"), &format!("{HOSTS} converged")).await;
    assert_eq!(text(&c, "#failed-count").await, "0");
    screenshot(&c, "07-unfreeze").await;

    // 8. conflict: two pages; the second promote is refused.
    r.publish(&spec("b3"), Some(2.0)).await.unwrap();
    wait_text(&c, &format!("{card} .build"), "b3").await;
    let first = c.window().await.unwrap();
    let second = c.new_window(false).await.unwrap().handle;
    c.switch_to_window(second.clone()).await.unwrap();
    c.goto(&page.url()).await.unwrap();
    wait_text(&c, &format!("{card} .build"), "b3").await;
    // The second commander opens the promote confirmation...
    c.find(Locator::Css(&format!("{card} button.promote")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &c,
        "the confirmation",
        "return document.getElementById('confirm').open;",
        |v| v == &json!(true),
    )
    .await;
    // ...while the first one promotes.
    c.switch_to_window(first.clone()).await.unwrap();
    control(&c, "promote", None, &[TIER, "b3", "10%"]).await;
    wait_consul("the first promote", || {
        published(&consul).0.percent == Some(10.0)
    })
    .await;
    c.switch_to_window(second.clone()).await.unwrap();
    c.find(Locator::Css("#c-ok"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let refused = wait_text(&c, "#banner", "Refused").await;
    assert!(refused.contains("no longer at ModifyIndex"), "{refused}");
    assert_eq!(
        published(&consul).0.percent,
        Some(10.0),
        "the first promote stands"
    );
    screenshot(&c, "08-conflict-refused").await;

    // 9. Consul requests per minute of open pages: the same with two pages
    // as with one, since every browser reads the one shared watch.
    let window = Duration::from_secs(10);
    let per_min = |n: usize| n as f64 * 60.0 / window.as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await; // the last read settles
    let before = consul.request_count();
    tokio::time::sleep(window).await;
    let idle = consul.request_count() - before;
    let busy = |pages: usize| {
        let consul = &consul;
        async move {
            let before = consul.request_count();
            let start = Instant::now();
            let mut writes = 0;
            while start.elapsed() < window {
                let rec = record(
                    &host(writes % HOSTS),
                    Some("b3"),
                    Some("b3"),
                    1,
                    Phase::Downloading,
                );
                write_report(consul, &rec);
                writes += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let n = consul.request_count() - before;
            println!(
                "consul requests, {pages} page(s) open, a report write every 100 ms: {n} in {window:?} ({:.0}/min)",
                per_min(n)
            );
            n
        }
    };
    let busy_two = busy(2).await;
    c.close_window().await.unwrap();
    c.switch_to_window(first).await.unwrap();
    let busy_one = busy(1).await;
    println!(
        "consul requests, idle (2 pages open): {idle} in {window:?} ({:.0}/min)",
        per_min(idle)
    );
    assert!(idle <= 1, "an idle page must cost no polling: {idle}");
    assert!(
        busy_two <= 12 && busy_one <= 12,
        "at most one read per second"
    );
    assert!(busy_two.abs_diff(busy_one) <= 2, "pages share one watch");

    // 10. 5,000 hosts: time to render, and a search through them.
    let big = 5000;
    let (_, _, index) = published(&consul);
    let started = Instant::now();
    for i in 0..big {
        let mut rec = record(
            &format!("big-{i:05}"),
            Some("b3"),
            Some("b3"),
            index,
            Phase::Idle,
        );
        if i % 97 == 0 {
            rec.phase = Phase::Failed;
            rec.error = Some(format!("health check failed on big-{i:05}"));
        }
        write_report(&consul, &rec);
    }
    let written = Instant::now();
    let writing = started.elapsed();
    let total = (big + HOSTS).to_string();
    wait_text(&c, "#host-count", &total).await;
    let seen = written.elapsed();
    let s = c
        .execute("return window.fleetStats;", vec![])
        .await
        .unwrap();
    let search = c
        .execute(
            "const q = document.getElementById('q'); q.value = 'big-04231'; \
             const t = performance.now(); applyFilter(); const ms = performance.now() - t; \
             const n = document.getElementById('host-count').textContent; \
             q.value = ''; applyFilter(); return [ms, n];",
            vec![],
        )
        .await
        .unwrap();
    println!(
        "5,000 hosts (written in {writing:?}, snapshot {:.0} KB): parse + render {:.1} ms, to \
         paint {:.1} ms, on screen {seen:?} after the last report write (includes the 1 s read \
         interval); search in {:.1} ms ({})",
        s["bytes"].as_f64().unwrap_or(-1.0) / 1024.0,
        s["lastRenderMs"].as_f64().unwrap_or(-1.0),
        s["lastPaintMs"].as_f64().unwrap_or(-1.0),
        search[0].as_f64().unwrap_or(-1.0),
        search[1]
    );
    assert!(search[1].as_str().unwrap().starts_with("1 of"), "{search}");
    let rows = c
        .execute(
            "return document.querySelectorAll('#rows .row').length;",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        rows.as_u64().unwrap() < 200,
        "the table renders only what is visible: {rows}"
    );
    screenshot(&c, "09-5000-hosts").await;

    c.close().await.unwrap();
    shutdown.cancel();
    page.stopped().await;
}

/// The page's guards, without a browser: Host, Origin, CSRF, read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controls_need_same_origin_csrf_and_a_writable_page() {
    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    let r = release(&consul);
    r.publish(&spec("b1"), None).await.unwrap();
    r.publish(&spec("b2"), Some(2.0)).await.unwrap();
    let (_, _, index) = published(&consul);
    let (page, shutdown) = start_page(&consul, false).await;
    let http = reqwest::Client::new();
    let url = page.url();
    let origin = format!("http://{}", page.addr());

    let html = http.get(&url).send().await.unwrap().text().await.unwrap();
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    let mut weight = html.len();
    for a in ["app.js", "app.css"] {
        weight += http
            .get(format!("{url}{a}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len();
    }
    println!(
        "page weight: {:.1} KB (html + js + css, uncompressed)",
        weight as f64 / 1024.0
    );

    let body = json!({"tier": TIER, "action": "promote", "expected_index": index,
                      "build": "b2", "percent": 10.0});
    let post = |origin: Option<&str>, token: &str, host: Option<&str>| {
        let mut b = http
            .post(format!("{url}api/action"))
            .header("content-type", "application/json")
            .header("x-csrf-token", token)
            .body(body.to_string());
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.send()
    };
    assert_eq!(
        post(None, &csrf, None).await.unwrap().status(),
        403,
        "no Origin"
    );
    assert_eq!(
        post(Some("http://evil.example"), &csrf, None)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        post(Some(&origin), "wrong", None).await.unwrap().status(),
        403
    );
    assert_eq!(
        post(Some(&origin), &csrf, Some("evil.example"))
            .await
            .unwrap()
            .status(),
        421,
        "DNS rebinding: unknown Host"
    );
    assert_eq!(
        published(&consul).0.percent,
        Some(2.0),
        "nothing written yet"
    );
    let ok = post(Some(&origin), &csrf, None).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(published(&consul).0.percent, Some(10.0));
    // The same request again: the key moved, so it is a conflict.
    let again = post(Some(&origin), &csrf, None).await.unwrap();
    assert_eq!(again.status(), 409);
    shutdown.cancel();
    page.stopped().await;

    // Read-only: refused even with everything right.
    let (ro, shutdown) = start_page(&consul, true).await;
    let html = http
        .get(ro.url())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    let (_, _, index) = published(&consul);
    let resp = http
        .post(format!("{}api/action", ro.url()))
        .header("content-type", "application/json")
        .header("x-csrf-token", csrf)
        .header("origin", format!("http://{}", ro.addr()))
        .body(
            json!({"tier": TIER, "action": "promote", "expected_index": index,
                   "build": "b2", "percent": 25.0})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await.unwrap().contains("read-only"));
    assert_eq!(published(&consul).0.percent, Some(10.0));
    shutdown.cancel();
    ro.stopped().await;

    // Not on loopback without --allow-remote.
    let err = FleetPage::start(
        release(&consul),
        ServeOptions {
            listen: "0.0.0.0:0".parse().unwrap(),
            read_only: false,
            allow_remote: false,
            origins: Vec::new(),
            user_header: None,
            max_clients: 4,
            feed: FeedSettings {
                app: APP.into(),
                tier: None,
                freeze_key: deploy_agent::fleet::freeze_key(APP),
                report_prefix: deploy_agent::fleet::report_prefix(APP),
                stale_after: Duration::from_secs(120),
                min_interval: Duration::from_secs(1),
            },
        },
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--allow-remote"), "{err}");
}

/// What the demo prints, readable while it runs.
#[derive(Clone, Default)]
struct SharedOut(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedOut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `deploy demo --keep` prints a `fleet serve` command; the real binary
/// run with it shows the demo's host and its 2% rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_serve_works_against_the_kept_demo() {
    use testkit::buildgen::BuildProfile;
    use testkit::demo::{run_and_keep, DemoOptions};

    let tmp = deploy_agent_tests::fast_tempdir();
    let out = SharedOut::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut demo_out = out.clone();
    let dir = tmp.path().to_path_buf();
    let demo = tokio::spawn(async move {
        run_and_keep(
            DemoOptions {
                dir: Some(dir),
                profile: BuildProfile::TINY,
                format: Format::TarGz,
            },
            &mut demo_out,
            async {
                let _ = stopped.await;
            },
        )
        .await
    });
    let command = wait_until_every_async(
        "the demo's `fleet serve` command",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || async {
            let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
            if let Some(line) = text
                .lines()
                .find(|l| l.contains("deploy-agent fleet serve"))
            {
                return Ok(line.trim().to_string());
            }
            assert!(!demo.is_finished(), "the demo ended: {text}");
            Err(text)
        },
    )
    .await;
    // deploy-agent fleet serve --consul URL --app demo
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut serve = Command::new(deploy_agent_tests::agent_bin())
        .args(&args)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/api/snapshot");
    // Every 200 ms: each poll is an HTTP request.
    let snap = wait_until_every_async(
        "fleet serve never showed the demo",
        DEADLINE,
        Duration::from_millis(200),
        || async {
            let r = http.get(&url).send().await.map_err(|e| e.to_string())?;
            let body = r.bytes().await.unwrap_or_default();
            let v = serde_json::from_slice::<Value>(&body).map_err(|e| e.to_string())?;
            let host_seen = v["hosts"]
                .as_array()
                .is_some_and(|h| h.iter().any(|r| r[0] == "demo-host-1"));
            if v["tiers"][0]["percent"] == json!(2.0) && host_seen {
                Ok(v)
            } else {
                Err(format!("{v}"))
            }
        },
    )
    .await;
    let _ = serve.kill();
    let _ = serve.wait();
    assert_eq!(snap["app"], "demo");
    assert_eq!(snap["tiers"][0]["tier"], "production");
    assert_eq!(snap["tiers"][0]["build"], "2026.11.26-2");
    assert_eq!(snap["tiers"][0]["previous"], "2026.11.26-1");
    stop.send(()).unwrap();
    demo.await.unwrap().unwrap();
}
