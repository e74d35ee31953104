//! The demo (`cargo run --release -p testkit --bin demo`): the whole job end to end on this machine, no setup.
//!
//! Starts the Consul-compatible and artifact servers on loopback in-process,
//! makes a deploy root in a temp dir (or `--dir`), generates two builds,
//! publishes build 1 through Consul and runs the real agent until it is
//! live, publishes build 2, then rolls back by setting the key back. With
//! `--keep` it then publishes build 2 at 2% and stays up for
//! `deploy-agent fleet serve`. With `--store s3` the builds live in the
//! S3-compatible test server instead (`s3://` URLs, a static key file,
//! signatures checked). A crash leaves only the temp dir behind.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::buildgen::{self, Artifact, BuildProfile};
use crate::testserver::artifact::ArtifactServer;
use crate::testserver::consul::{ConsulServer, ConsulServerConfig};
use crate::testserver::s3::{KeyRing, S3Server};
use deploy_agent::config::Config;
use deploy_agent::consul::ConsulSettings;
use deploy_agent::daemon::{Agent, RunOptions};
use deploy_agent::deploy::{DeployRecord, Outcome};
use deploy_agent::error::{Error, Result};
use deploy_agent::manifest::Format;

const KEY: &str = "deploy/demo/production";
/// With `--keep` the agent is a fleet member of this app and tier (whose
/// tier key is `KEY`), so `fleet serve --app demo` shows it.
const APP: &str = "demo";
const TIER: &str = "production";

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where to put the deploy root and artifacts; a temp dir when `None`.
    pub dir: Option<PathBuf>,
    pub profile: BuildProfile,
    pub format: Format,
}

/// Where the demo serves its builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DemoStore {
    /// The artifact HTTP server (`http://` URLs).
    #[default]
    Http,
    /// The S3-compatible server (`s3://` URLs, signed requests).
    S3,
}

const BUCKET: &str = "demo-builds";
const DEMO_KEY_ID: &str = "AKIADEMO000000000001";

/// The server the demo's builds are on.
enum Builds {
    Http(ArtifactServer),
    S3(S3Server),
}

impl Builds {
    /// Starts the server `store` names; for S3 also writes the agent's key
    /// file under `base` and points `config`'s `[store]` at the server.
    async fn start(
        store: DemoStore,
        base: &std::path::Path,
        config: &mut Config,
    ) -> Result<Builds> {
        let io = |e| Error::io("127.0.0.1:0", e);
        match store {
            DemoStore::Http => Ok(Builds::Http(ArtifactServer::start().await.map_err(io)?)),
            DemoStore::S3 => {
                let secret = format!("demo-secret-{:016x}", rand::random::<u64>());
                let keys = std::sync::Arc::new(KeyRing::default());
                keys.add(DEMO_KEY_ID, &secret);
                let dir = base.join("object-store");
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                let s3 = S3Server::start(&dir, keys).await.map_err(io)?;
                s3.create_bucket(BUCKET).map_err(|e| Error::io(&dir, e))?;
                let key_file = base.join("s3-credentials");
                write_private(&key_file, &format!(
                    "[default]\naws_access_key_id = {DEMO_KEY_ID}\naws_secret_access_key = {secret}\n"
                ))?;
                config.store.endpoint = Some(s3.endpoint());
                config.store.path_style = true;
                config.store.credentials_file = Some(key_file);
                Ok(Builds::S3(s3))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Builds::Http(a) => format!("artifact server              {}", a.url("/")),
            Builds::S3(s) => format!(
                "S3-compatible store          {} (bucket {BUCKET})",
                s.endpoint()
            ),
        }
    }

    fn add(&self, path: &str, bytes: Vec<u8>) -> Result<()> {
        match self {
            Builds::Http(a) => {
                a.add(path, bytes);
                Ok(())
            }
            Builds::S3(s) => s
                .put(BUCKET, path.trim_start_matches('/'), &bytes)
                .map_err(|e| Error::io(path, e)),
        }
    }

    fn url(&self, path: &str) -> String {
        match self {
            Builds::Http(a) => a.url(path),
            Builds::S3(_) => format!("s3://{BUCKET}/{}", path.trim_start_matches('/')),
        }
    }

    fn bytes_sent(&self) -> u64 {
        match self {
            Builds::Http(a) => a.stats().bytes_sent,
            Builds::S3(s) => s.stats().bytes_sent,
        }
    }
}

/// Writes a secret file with mode 0600 from the start.
fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
}

/// Runs the demo, printing to `out`. Returns the three deploy records.
pub async fn run(opts: DemoOptions, out: &mut (dyn Write + Send)) -> Result<Vec<DeployRecord>> {
    run_inner(opts, DemoStore::Http, out, None).await
}

/// [`run`] with the builds served from `store`.
pub async fn run_on(
    store: DemoStore,
    opts: DemoOptions,
    out: &mut (dyn Write + Send),
) -> Result<Vec<DeployRecord>> {
    run_inner(opts, store, out, None).await
}

/// [`run`], then keeps the servers and the agent (a fleet member of app
/// `demo` reporting to Consul) up until `until` resolves, with build 2
/// published at 2% for the fleet page to promote; prints the `fleet serve`
/// command.
pub async fn run_and_keep(
    opts: DemoOptions,
    out: &mut (dyn Write + Send),
    until: impl std::future::Future<Output = ()> + Send,
) -> Result<Vec<DeployRecord>> {
    run_and_keep_on(DemoStore::Http, opts, out, until).await
}

/// [`run_and_keep`] with the builds served from `store`.
pub async fn run_and_keep_on(
    store: DemoStore,
    opts: DemoOptions,
    out: &mut (dyn Write + Send),
    until: impl std::future::Future<Output = ()> + Send,
) -> Result<Vec<DeployRecord>> {
    run_inner(opts, store, out, Some(Box::pin(until))).await
}

type Until<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

async fn run_inner(
    opts: DemoOptions,
    store: DemoStore,
    out: &mut (dyn Write + Send),
    keep: Option<Until<'_>>,
) -> Result<Vec<DeployRecord>> {
    let t0 = Instant::now();
    let tmp;
    let base = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("deploy-agent-demo-")
                .tempdir()
                .map_err(|e| Error::io(std::env::temp_dir(), e))?;
            tmp.path().to_path_buf()
        }
    };
    let p = |out: &mut (dyn Write + Send), s: String| {
        let _ = writeln!(out, "{s}");
    };
    p(out, format!("deploy-agent demo in {}", base.display()));

    let consul = ConsulServer::start(ConsulServerConfig::default())
        .await
        .map_err(|e| Error::io("127.0.0.1:0", e))?;
    let root = base.join("srv/app");
    let mut config = Config::for_consul_key(root.clone(), KEY, &consul.url());
    let artifacts = Builds::start(store, &base, &mut config).await?;
    p(
        out,
        format!("  consul-compatible KV server  {}", consul.url()),
    );
    p(out, format!("  {}", artifacts.describe()));

    let art_dir = base.join("artifacts");
    std::fs::create_dir_all(&art_dir).map_err(|e| Error::io(&art_dir, e))?;
    let ext = opts.format.as_str();
    let mut builds: Vec<(String, Artifact, String)> = Vec::new();
    for id in ["2026.11.26-1", "2026.11.26-2"] {
        let path = art_dir.join(format!("app-{id}.{ext}"));
        let started = Instant::now();
        let prof = opts.profile;
        let (pp, idc, fmt) = (path.clone(), id.to_string(), opts.format);
        // Consecutive releases: about 1% of the files differ.
        let a = tokio::task::spawn_blocking(move || {
            buildgen::write_build_changing(prof, 42, &idc, fmt, &pp, 0.005)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let url_path = format!("/builds/app-{id}.{ext}");
        artifacts.add(&url_path, bytes)?;
        p(
            out,
            format!(
                "  generated build {id}: {} entries, {:.1} MB unpacked, {:.1} MB {ext}, in {:.2}s",
                a.entries,
                a.unpacked_bytes as f64 / 1e6,
                a.size as f64 / 1e6,
                started.elapsed().as_secs_f64()
            ),
        );
        let manifest = buildgen::manifest_json(id, &artifacts.url(&url_path), &a, opts.format);
        builds.push((id.to_string(), a, manifest));
    }

    add_delta(&art_dir, &artifacts, &mut builds, opts.format, out).await?;

    config.status.socket = Some(base.join("agent.sock"));
    if keep.is_some() {
        // A fleet member, so the page has a host report to show.
        config.fleet.app = Some(APP.into());
        config.fleet.tier = Some(TIER.into());
        config.fleet.host_id = Some("demo-host-1".into());
        config.fleet.splay_max = Some(Duration::ZERO);
    }
    let settings = ConsulSettings {
        address: consul.url(),
        wait: Duration::from_secs(30),
        first_request_splay: Duration::ZERO,
        // The demo publishes every few seconds; production keeps the
        // docs/consul-watch-rules.md default of one request per 15 s after a burst of 2.
        rate: deploy_agent::pacing::RateLimit {
            burst: 2,
            refill_interval: Duration::from_millis(100),
        },
        ..ConsulSettings::default()
    };
    let shutdown = CancellationToken::new();
    let agent = Agent::start(
        config,
        RunOptions {
            consul: Some(settings),
            notify: false,
            ..RunOptions::default()
        },
        shutdown.clone(),
    )
    .await?;
    p(
        out,
        format!("  agent running on deploy root {}", root.display()),
    );
    p(
        out,
        format!(
            "  status socket: deploy-agent status --socket {}",
            base.join("agent.sock").display()
        ),
    );

    let mut records = Vec::new();
    let steps = [
        (0, "publish build 1"),
        (1, "publish build 2 (with a delta from build 1)"),
        (0, "roll back: set the key back to build 1"),
    ];
    for (i, (b, what)) in steps.iter().enumerate() {
        let (id, _, manifest) = &builds[*b];
        p(out, format!("\n[{}] {what}", i + 1));
        let before = artifacts.bytes_sent();
        let written = Instant::now();
        consul.put(KEY, manifest.as_bytes());
        let rec = wait_for(&agent, id, records.len() + 1, Duration::from_secs(300)).await?;
        let took = written.elapsed();
        let served = std::fs::read_to_string(root.join("current/BUILD")).unwrap_or_default();
        let link = std::fs::read_link(root.join("current"))
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        p(
            out,
            format!(
                "    key write -> live: {:.3}s  outcome: {}  current -> {link}  serving build {served}",
                took.as_secs_f64(),
                rec.outcome.unwrap_or(Outcome::Failed).as_str()
            ),
        );
        p(
            out,
            format!(
                "    downloaded {:.2} MB, {} entries{}",
                (artifacts.bytes_sent() - before) as f64 / 1e6,
                rec.progress.entries,
                if rec.from_cache {
                    " (artifact from cache)"
                } else if rec.from_delta {
                    " (from the delta; unchanged files reflinked or copied from the live slot)"
                } else {
                    ""
                }
            ),
        );
        let phases: Vec<String> = deploy_agent::deploy::Phase::PIPELINE
            .iter()
            .filter_map(|p| {
                rec.phase_ms
                    .get(p)
                    .map(|v| format!("{} {v} ms", p.as_str()))
            })
            .collect();
        p(out, format!("    phases: {}", phases.join(", ")));
        if served.trim() != id {
            return Err(Error::Internal(format!(
                "demo: expected build {id} to be served, found {served:?}"
            )));
        }
        records.push(rec);
    }
    p(
        out,
        format!(
            "\ndemo complete in {:.1}s: 2 deploys and 1 rollback, every flip atomic.",
            t0.elapsed().as_secs_f64()
        ),
    );
    if keep.is_none() {
        p(
            out,
            "(the demo with --keep keeps the servers up and prints the `deploy-agent fleet serve` command for a live page)".into(),
        );
    }
    if let Some(until) = keep {
        keep_up(&consul, &builds[1].2, out).await?;
        let _ = out.flush();
        until.await;
    }
    shutdown.cancel();
    let _ = agent.task.await;
    Ok(records)
}

/// `--keep`: publishes build 2 at 2% with the release commands' own
/// write and prints how to watch and drive the rollout from a browser.
async fn keep_up(
    consul: &ConsulServer,
    manifest: &str,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let m = deploy_agent::manifest::Manifest::parse(
        manifest.as_bytes(),
        deploy_agent::manifest::UrlPolicy { allow_file: true },
    )
    .map_err(|e| Error::Internal(format!("demo: build 2's manifest: {e}")))?;
    let release = deploy_agent::fleet::commander::release::Release {
        client: deploy_agent::consul::ConsulClient::new(&ConsulSettings {
            address: consul.url(),
            ..ConsulSettings::default()
        })?,
        key: deploy_agent::fleet::tier_key(APP, TIER),
        freeze_key: deploy_agent::fleet::freeze_key(APP),
    };
    release.publish(&m.spec, Some(2.0)).await?;
    let _ = writeln!(
        out,
        "\n[keep] published {} at 2% (release publish --percent 2); the servers and the agent stay up until Ctrl-C.\n\
         \x20 watch and drive the rollout in a browser:\n\
         \x20   deploy-agent fleet serve --consul {} --app {APP}\n\
         \x20   then open http://{}/",
        m.spec.build,
        consul.url(),
        deploy_agent::fleet::commander::web::DEFAULT_LISTEN
    );
    Ok(())
}

/// Writes and serves the delta from build 1 to build 2 and puts it in
/// build 2's manifest, as `release publish --delta-from` does.
async fn add_delta(
    art_dir: &std::path::Path,
    artifacts: &Builds,
    builds: &mut [(String, Artifact, String)],
    format: Format,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let ext = format.as_str();
    let base = art_dir.join(format!("app-{}.{ext}", builds[0].0));
    let target = art_dir.join(format!("app-{}.{ext}", builds[1].0));
    let delta = art_dir.join(format!("app-{}.delta.tar.zst", builds[1].0));
    let url = artifacts.url(&format!("/builds/app-{}.delta.tar.zst", builds[1].0));
    let (spec, info) = tokio::task::spawn_blocking({
        let (delta, url) = (delta.clone(), url.clone());
        move || {
            deploy_agent::fleet::commander::release::delta_spec(
                (&base, format),
                (&target, format),
                &delta,
                &url,
            )
        }
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    let bytes = std::fs::read(&delta).map_err(|e| Error::io(&delta, e))?;
    artifacts.add(&format!("/builds/app-{}.delta.tar.zst", builds[1].0), bytes)?;
    let mut m: serde_json::Value = serde_json::from_str(&builds[1].2)
        .map_err(|e| Error::Internal(format!("demo: build 2's manifest: {e}")))?;
    m["delta"] = serde_json::Value::Object(spec.to_json());
    builds[1].2 = m.to_string();
    let _ = writeln!(
        out,
        "  delta from build 1 to build 2: {:.2} MB, {} of {} entries shared",
        info.size as f64 / 1e6,
        info.shared,
        info.entries
    );
    Ok(())
}

async fn wait_for(agent: &Agent, build: &str, nth: usize, limit: Duration) -> Result<DeployRecord> {
    let start = Instant::now();
    loop {
        let s = agent.shared.snapshot();
        if s.history.len() >= nth {
            if let Some(rec) = s.history.iter().rev().find(|r| r.build == build) {
                match rec.outcome {
                    Some(Outcome::Success | Outcome::RolledBack) => return Ok(rec.clone()),
                    Some(Outcome::Failed) => {
                        return Err(Error::Internal(format!(
                            "demo: deploy of {build} failed: {}",
                            rec.error
                                .as_ref()
                                .map(|e| e.message.as_str())
                                .unwrap_or("?")
                        )))
                    }
                    _ => {}
                }
            }
        }
        if start.elapsed() > limit {
            return Err(Error::Internal(format!(
                "demo: build {build} not live after {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
