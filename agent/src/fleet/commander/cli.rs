//! The commander's command line: `deploy-agent release ...`,
//! `deploy-agent fleet status` and `deploy-agent fleet serve`. Thin: parses flags, calls
//! [`crate::fleet::commander::release`] and [`crate::fleet::commander::view`], prints, and maps
//! errors to the binary's one exit-code table ([`crate::exit`]:
//! 0 ok, 1 failure, 2 usage, 6 check-and-set lost, 7 already frozen, 8 the
//! address is not a Consul). Holds no state.

use crate::say;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::consul::{ConsulClient, ConsulSettings};
use crate::error::{Error, Result};
use crate::fleet::commander::release::{self, Release};
use crate::manifest::Format;

/// Exit codes: the names these commands use for the binary's one table.
pub mod exit {
    use crate::exit as table;
    pub const OK: u8 = table::OK;
    pub const FAILED: u8 = table::FAILURE;
    pub const USAGE: u8 = table::USAGE;
    pub const CONFLICT: u8 = table::CONFLICT;
    pub const FROZEN: u8 = table::FROZEN;
    pub const NOT_CONSUL: u8 = table::NOT_CONSUL;
}

/// Which keys a command works on.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The application (`deploy/<app>/...`).
    #[arg(long, env = "DEPLOY_APP", global = true)]
    pub app: Option<String>,
    /// The tier (`deploy/<app>/<tier>`).
    #[arg(long, env = "DEPLOY_TIER", global = true)]
    pub tier: Option<String>,
    /// The tier key, instead of `deploy/<app>/<tier>`.
    #[arg(long, global = true)]
    pub key: Option<String>,
    /// The freeze key, instead of `deploy/<app>/freeze`.
    #[arg(long, global = true)]
    pub freeze_key: Option<String>,
    /// Consul address (else CONSUL_HTTP_ADDR, else http://127.0.0.1:8500).
    #[arg(long, global = true)]
    pub consul: Option<String>,
}

/// `deploy-agent release ...`
#[derive(Debug, Clone, Args)]
pub struct ReleaseCommand {
    #[command(flatten)]
    pub target: Target,
    #[command(subcommand)]
    pub action: ReleaseAction,
}

// Parsed once per command and matched at once: the size of the largest
// variant (publish's options) costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Subcommand)]
pub enum ReleaseAction {
    /// Publish a build to the tier (the current build becomes `previous`).
    Publish {
        #[arg(long)]
        build: String,
        /// A local artifact: its sha256 and size are computed here.
        #[arg(long)]
        artifact: Option<PathBuf>,
        /// Where hosts download it (with --upload: the uploaded object).
        #[arg(long, required_unless_present = "upload", conflicts_with = "upload")]
        url: Option<String>,
        /// Upload --artifact (and the --delta-from delta) to this
        /// `s3://bucket/prefix/` with the credentials of this machine's
        /// standard chain, check what the store holds, and only then
        /// publish the manifest with the `s3://` URLs.
        #[arg(long, requires = "artifact")]
        upload: Option<String>,
        /// With --upload: path-style requests (most self-hosted stores);
        /// the endpoint and region come from AWS_ENDPOINT_URL_S3 and AWS_REGION.
        #[arg(long, requires = "upload")]
        path_style: bool,
        #[arg(long)]
        sha256: Option<crate::manifest::Sha256Sum>,
        #[arg(long)]
        size: Option<u64>,
        /// tar, tar.gz or tar.zst.
        #[arg(long, default_value = "tar.gz")]
        format: String,
        /// Start at this percentage (0-100) instead of everyone at once.
        #[arg(long)]
        percent: Option<f64>,
        /// Also publish a delta from this local artifact (the build hosts
        /// run now) to --artifact: hosts running it download only what
        /// changed. Written next to --artifact as `<artifact>.delta.tar.zst`.
        #[arg(long, requires = "artifact")]
        delta_from: Option<PathBuf>,
        /// Where hosts download the delta (needed without --upload).
        #[arg(long, requires = "delta_from", conflicts_with = "upload")]
        delta_url: Option<String>,
        /// The base artifact's format (default: --format).
        #[arg(long)]
        delta_from_format: Option<String>,
        /// Where hosts download the build's file index (every file's
        /// sha256, written next to --artifact as
        /// `<artifact>.index.json.zst`), so they need not hash the slot
        /// they build. With --upload it is uploaded beside the artifact.
        #[arg(long, requires = "artifact", conflicts_with = "upload")]
        index_url: Option<String>,
    },
    /// Write the build's file index (every file's sha256) next to the
    /// artifact as `<artifact>.index.json.zst`, to upload beside it before
    /// `publish --index-url`; needs no Consul.
    Index {
        #[arg(long)]
        artifact: PathBuf,
        /// tar, tar.gz or tar.zst.
        #[arg(long, default_value = "tar.gz")]
        format: String,
    },
    /// Raise (or lower) the rollout percentage.
    Promote {
        #[arg(long)]
        percent: f64,
    },
    /// Point the tier back at the previous build (hosts flip from their
    /// cold slot without downloading).
    Rollback,
    /// Stop new flips on every host of the app.
    Freeze {
        #[arg(long, default_value = "frozen by the deploy commander")]
        reason: String,
    },
    /// Lift the freeze.
    Unfreeze,
    /// Print the tier key and the freeze state.
    Show {
        #[arg(long)]
        json: bool,
    },
}

/// `deploy-agent fleet ...`
#[derive(Debug, Clone, Args)]
pub struct FleetCommand {
    #[command(flatten)]
    pub target: Target,
    #[command(subcommand)]
    pub action: FleetAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum FleetAction {
    /// Hosts per build and phase, converged percentage, failed and stale hosts.
    Status {
        #[arg(long)]
        json: bool,
        /// Redraw every `--interval` until interrupted.
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value = "2s", value_parser = parse_dur)]
        interval: Duration,
        /// A host that has not acknowledged the current release this long
        /// after it was written is stale.
        #[arg(long, default_value = "2m", value_parser = parse_dur)]
        stale_after: Duration,
        /// Report prefix, instead of `deploy-hosts/<app>/`.
        #[arg(long)]
        report_prefix: Option<String>,
    },
    /// A live page of the app's rollout with its controls (promote,
    /// rollback, freeze, unfreeze), on loopback by default.
    Serve(ServeArgs),
}

/// `deploy-agent fleet serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Where the page listens; anything but loopback needs --allow-remote.
    #[arg(long, default_value = crate::fleet::commander::web::DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// Show the page without any control.
    #[arg(long)]
    pub read_only: bool,
    /// Listen on a non-loopback address (only behind an authenticating
    /// proxy: the page has no login of its own).
    #[arg(long)]
    pub allow_remote: bool,
    /// A URL the page is reached through (the SSO proxy's, e.g.
    /// https://deploy.example.com); repeatable.
    #[arg(long = "origin")]
    pub origins: Vec<String>,
    /// A request header the proxy sets to the signed-in user (e.g.
    /// X-Forwarded-User); recorded in freezes and logs.
    #[arg(long)]
    pub user_header: Option<String>,
    /// A host that has not acknowledged the current release this long
    /// after it was written is stale.
    #[arg(long, default_value = "2m", value_parser = parse_dur)]
    pub stale_after: Duration,
    /// Report prefix, instead of the app's default.
    #[arg(long)]
    pub report_prefix: Option<String>,
    /// Consul blocking-query wait.
    #[arg(long, default_value = "5m", value_parser = parse_dur)]
    pub wait: Duration,
    /// Least time between two Consul reads of one prefix.
    #[arg(long, default_value = "1s", value_parser = parse_dur)]
    pub min_interval: Duration,
    /// Connections served at once (one per open page).
    #[arg(long, default_value_t = 64)]
    pub max_clients: usize,
}

fn parse_dur(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration (5s, 2m): {e}"))
}

impl Target {
    /// The commander's view of the keys, connected to Consul. The freeze
    /// is the app's, not a tier's: with `app_only` (freeze, unfreeze) no
    /// tier is needed, so an on-call engineer can stop every flip with
    /// `release freeze --app web` alone; the tier key is then the app's
    /// control subtree, which those commands never write.
    pub fn release(&self, app_only: bool) -> Result<Release> {
        // No key yet: name the one the flags would make ("release : give
        // ..." read like a bug).
        let usage = |reason: &str| Error::ReleaseInvalid {
            key: "deploy/<app>/<tier>".into(),
            reason: reason.into(),
        };
        let key = match (&self.key, &self.app, &self.tier) {
            (Some(k), _, _) => k.clone(),
            (None, Some(a), Some(t)) => crate::fleet::tier_key(a, t),
            (None, Some(a), None) if app_only => crate::fleet::tier_key(a, ""),
            _ => return Err(usage("give --app and --tier (or --key)")),
        };
        let freeze_key = match (&self.freeze_key, &self.app) {
            (Some(k), _) => k.clone(),
            (None, Some(a)) => crate::fleet::freeze_key(a),
            (None, None) => return Err(usage("give --app (or --freeze-key)")),
        };
        Ok(Release {
            client: self.client(ConsulSettings::default())?,
            key,
            freeze_key,
        })
    }

    /// A Consul client from `base`, the `CONSUL_*` environment (the token
    /// among them) and `--consul`.
    pub fn client(&self, base: ConsulSettings) -> Result<ConsulClient> {
        let mut settings = base.from_env()?;
        if let Some(a) = &self.consul {
            settings.address = if a.contains("://") {
                a.clone()
            } else {
                format!("http://{a}")
            };
        }
        ConsulClient::new(&settings)
    }
}

/// The exit code for an error (docs/operating.md, Exit codes).
pub fn code(e: &Error) -> u8 {
    match e {
        Error::NotConsul { .. } => exit::NOT_CONSUL,
        Error::ReleaseConflict { .. } | Error::ReleaseNoChange { .. } => exit::CONFLICT,
        Error::ReleaseFrozen { .. } => exit::FROZEN,
        Error::ReleaseInvalid { .. } | Error::ReleaseMissing { .. } => exit::USAGE,
        _ => exit::FAILED,
    }
}

fn block(fut: impl std::future::Future<Output = Result<()>>) -> u8 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return exit::FAILED;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: {e}");
            code(&e)
        }
    }
}

fn invalid(r: &Release, reason: &str) -> Error {
    Error::ReleaseInvalid {
        key: r.key.clone(),
        reason: reason.into(),
    }
}

/// Where `write_delta` writes the delta of `target`.
fn delta_path(target: &std::path::Path) -> PathBuf {
    PathBuf::from(format!("{}.delta.tar.zst", target.display()))
}

/// `publish --upload`: the store (endpoint and region from the `AWS_*`
/// environment, keys from this machine's chain) and the prefix objects go
/// under, named after their local files.
struct Uploader {
    store: crate::store::Store,
    http: reqwest::Client,
    prefix: String,
}

impl Uploader {
    fn new(r: &Release, prefix: &str, path_style: bool) -> Result<Uploader> {
        let prefix = if prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        crate::store::ObjectUrl::parse(&format!("{prefix}x"))
            .map_err(|e| invalid(r, &format!("--upload {prefix}: {e}")))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Internal(format!("cannot build the HTTP client: {e}")))?;
        let cfg = crate::config::StoreConfig {
            path_style,
            ..Default::default()
        };
        let store = crate::store::Store::from_config(&cfg, http.clone())?;
        say!(
            "uploading to {prefix} at {} with credentials from {}",
            store.settings().endpoint,
            store.settings().source
        );
        Ok(Uploader {
            store,
            http,
            prefix,
        })
    }

    fn url_of(&self, file: &std::path::Path) -> String {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{}{name}", self.prefix)
    }

    async fn upload(&self, file: &std::path::Path, url: &str) -> Result<()> {
        let object = crate::store::ObjectUrl::parse(url).map_err(|reason| Error::StoreSetting {
            setting: "--upload".into(),
            reason: format!("{url}: {reason}"),
        })?;
        crate::store::upload::upload_file(&self.store, &self.http, file, &object).await?;
        say!("uploaded {} to {url} (size verified)", file.display());
        Ok(())
    }
}

/// Writes the delta from `base` to `target` as `<target>.delta.tar.zst`
/// and describes it for the manifest.
async fn write_delta(
    base: (PathBuf, Format),
    target: (PathBuf, Format),
    url: String,
) -> Result<crate::manifest::DeltaSpec> {
    let out = delta_path(&target.0);
    let (d, info) = tokio::task::spawn_blocking(move || {
        release::delta_spec((&base.0, base.1), (&target.0, target.1), &out, &url)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    say!(
        "delta: {} bytes, {} of {} entries reused from the base",
        info.size,
        info.shared,
        info.entries
    );
    Ok(d)
}

/// `release index`: writes the file index next to `artifact`.
async fn write_index(artifact: PathBuf, format: &str) -> Result<()> {
    let format = parse_format("", format)?;
    let out = release::index_path(&artifact);
    let written = out.clone();
    let (files, (sha256, size)) = tokio::task::spawn_blocking(move || {
        let index = crate::integrity::FileIndex::of_artifact(&artifact, format)?;
        let sum = index.write(&written)?;
        Ok::<_, Error>((index.files.len(), sum))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    say!(
        "{}: {files} files, {size} bytes, sha256 {sha256}; upload it beside the artifact, then `release publish --index-url URL`",
        out.display(),
    );
    Ok(())
}

/// Runs `deploy-agent release ...`; returns the exit code.
pub fn run_release(cmd: ReleaseCommand) -> u8 {
    block(async move {
        // Every read of the Consul client refuses an answer that is not
        // Consul's (`Error::NotConsul`, exit 8).
        let app_only = matches!(
            cmd.action,
            ReleaseAction::Freeze { .. } | ReleaseAction::Unfreeze
        );
        if let ReleaseAction::Index { artifact, format } = &cmd.action {
            return write_index(artifact.clone(), format).await;
        }
        let r = cmd.target.release(app_only)?;
        match cmd.action {
            ReleaseAction::Publish {
                build,
                artifact,
                url,
                upload,
                path_style,
                sha256,
                size,
                format,
                percent,
                delta_from,
                delta_url,
                delta_from_format,
                index_url,
            } => {
                let format = parse_format(&r.key, &format)?;
                let base_format = match delta_from_format {
                    Some(f) => parse_format(&r.key, &f)?,
                    None => format,
                };
                let uploader = match &upload {
                    Some(prefix) => Some(Uploader::new(&r, prefix, path_style)?),
                    None => None,
                };
                let url = match (url, &uploader, &artifact) {
                    (Some(u), _, _) => u,
                    (None, Some(up), Some(a)) => up.url_of(a),
                    _ => return Err(invalid(&r, "give --url, or --artifact with --upload")),
                };
                let delta_file = artifact.as_ref().map(|a| delta_path(a));
                let delta_url = match (delta_url, &uploader, &delta_file) {
                    (Some(u), _, _) => Some(u),
                    (None, Some(up), Some(d)) if delta_from.is_some() => Some(up.url_of(d)),
                    _ => None,
                };
                let delta = match (delta_from, delta_url, artifact.clone()) {
                    (Some(base), Some(url), Some(target)) => {
                        Some(write_delta((base, base_format), (target, format), url).await?)
                    }
                    (Some(_), None, _) => {
                        return Err(invalid(&r, "--delta-from needs --delta-url or --upload"))
                    }
                    _ => None,
                };
                let index_url = match (index_url, &uploader, &artifact) {
                    (Some(u), _, _) => Some(u),
                    (None, Some(up), Some(a)) => Some(up.url_of(&release::index_path(a))),
                    _ => None,
                };
                let spec = publish_spec(
                    &r,
                    build,
                    (artifact.clone(), index_url),
                    url,
                    sha256,
                    size,
                    format,
                )
                .await?;
                if let Some(index) = &spec.index {
                    say!(
                        "file index: {} bytes, for hosts at {}",
                        index.size,
                        index.urls[0]
                    );
                }
                if let (Some(up), Some(path)) = (&uploader, &artifact) {
                    // Objects first, verified; the manifest only after them.
                    up.upload(path, &spec.urls[0]).await?;
                    if let (Some(d), Some(file)) = (&delta, &delta_file) {
                        up.upload(file, &d.urls[0]).await?;
                    }
                    if let Some(index) = &spec.index {
                        up.upload(&release::index_path(path), &index.urls[0])
                            .await?;
                    }
                }
                let i = r.publish_with_delta(&spec, percent, delta.as_ref()).await?;
                say!(
                    "published {} ({} bytes, sha256 {}) to {} at {}% (index {i})",
                    spec.build,
                    spec.size,
                    spec.sha256,
                    r.key,
                    percent.unwrap_or(100.0)
                );
            }
            ReleaseAction::Promote { percent } => {
                let i = r.promote(percent).await?;
                say!("{} promoted to {percent}% (index {i})", r.key);
            }
            ReleaseAction::Rollback => {
                let i = r.rollback().await?;
                let now = r.read().await?.map(|c| c.manifest.spec.build);
                say!(
                    "{} rolled back to {} (index {i}); hosts flip from their cold slot",
                    r.key,
                    now.unwrap_or_default()
                );
            }
            ReleaseAction::Freeze { reason } => {
                r.freeze(&reason, &invoking_user()).await?;
                say!(
                    "{} set: no host starts a new deploy until `release unfreeze`",
                    r.freeze_key
                );
            }
            ReleaseAction::Unfreeze => {
                if r.unfreeze().await? {
                    say!("{} removed: hosts resume", r.freeze_key);
                } else {
                    say!("{} was not set", r.freeze_key);
                }
            }
            ReleaseAction::Show { json } => print_shown(&r.show().await?, json),
            // Answered above, before any Consul client is made.
            ReleaseAction::Index { .. } => {}
        }
        Ok(())
    })
}

/// `--format`, with its short names.
fn parse_format(key: &str, format: &str) -> Result<Format> {
    match format {
        "tar" => Ok(Format::Tar),
        "tar.gz" | "tgz" => Ok(Format::TarGz),
        "tar.zst" | "tzst" => Ok(Format::TarZst),
        other => Err(Error::ReleaseInvalid {
            key: key.to_string(),
            reason: format!("--format {other:?}: use tar, tar.gz or tar.zst"),
        }),
    }
}

/// The build `publish` writes: hashed from a local `--artifact` (off the
/// async threads: it reads the whole file), or as given by `--sha256` and
/// `--size`.
async fn publish_spec(
    r: &Release,
    build: String,
    (artifact, index_url): (Option<PathBuf>, Option<String>),
    url: String,
    sha256: Option<crate::manifest::Sha256Sum>,
    size: Option<u64>,
    format: Format,
) -> Result<crate::manifest::BuildSpec> {
    match (artifact, sha256, size) {
        (Some(path), None, None) => tokio::task::spawn_blocking(move || {
            release::spec_from_artifact(&build, &path, &url, format, index_url.as_deref())
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?,
        (None, Some(sha256), Some(size)) => release::check_spec(crate::manifest::BuildSpec {
            build,
            urls: vec![url],
            sha256,
            size,
            format,
            index: None,
        }),
        _ => Err(Error::ReleaseInvalid {
            key: r.key.clone(),
            reason: "give --artifact FILE, or both --sha256 and --size".into(),
        }),
    }
}

/// Who a freeze record names: the user behind sudo, else the login user,
/// else the uid.
fn invoking_user() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid {}", nix::unistd::getuid()))
}

/// Prints what `release show` read, as JSON or as a few lines.
fn print_shown(s: &release::Shown, json: bool) {
    if json {
        say!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
        return;
    }
    say!(
        "key     {} (index {})",
        s.key,
        s.modify_index.map_or("-".into(), |i| i.to_string())
    );
    match &s.manifest {
        Some(m) => say!("{}", serde_json::to_string_pretty(m).unwrap_or_default()),
        None => say!("(nothing published)"),
    }
    match &s.freeze {
        Some(f) => say!("FROZEN  {f}"),
        None => say!("freeze  not set"),
    }
}

/// Runs `deploy-agent fleet ...`; returns the exit code.
pub fn run_fleet(cmd: FleetCommand) -> u8 {
    if let FleetAction::Serve(args) = cmd.action {
        return block(serve(cmd.target, args));
    }
    block(async move {
        // Every read of the Consul client refuses an answer that is not
        // Consul's (`Error::NotConsul`, exit 8).
        let r = cmd.target.release(false)?;
        let FleetAction::Status {
            json,
            watch,
            interval,
            stale_after,
            report_prefix,
        } = cmd.action
        else {
            return Ok(());
        };
        let prefix = match (report_prefix, &cmd.target.app) {
            (Some(p), _) => p,
            (None, Some(a)) => crate::fleet::report_prefix(a),
            (None, None) => {
                return Err(Error::ReleaseInvalid {
                    key: r.key.clone(),
                    reason: "give --app (or --report-prefix)".into(),
                })
            }
        };
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
        loop {
            let s = crate::fleet::commander::view::collect(
                &r.client,
                &r,
                &prefix,
                cmd.target.tier.as_deref(),
                stale_after,
            )
            .await?;
            if json {
                say!("{}", serde_json::to_string(&s).unwrap_or_default());
            } else if watch && terminal {
                // Clear the screen and home the cursor: only on a terminal,
                // a pipe or a file gets one summary after another.
                crate::exit::write_stdout(format_args!(
                    "\x1b[2J\x1b[H{}",
                    crate::fleet::commander::view::render(&s)
                ));
            } else if watch {
                say!("{}", crate::fleet::commander::view::render(&s));
            } else {
                crate::exit::write_stdout(format_args!(
                    "{}",
                    crate::fleet::commander::view::render(&s)
                ));
            }
            if !watch {
                return Ok(());
            }
            tokio::time::sleep(interval).await;
        }
    })
}

/// `deploy-agent fleet serve`: runs the page until SIGINT or SIGTERM.
async fn serve(target: Target, args: ServeArgs) -> Result<()> {
    let usage = |reason: &str| Error::ReleaseInvalid {
        key: String::new(),
        reason: reason.into(),
    };
    let app = target
        .app
        .clone()
        .ok_or_else(|| usage("give --app (the page shows one app)"))?;
    if target.key.is_some() {
        return Err(usage(
            "fleet serve finds the tier keys under --app; use --tier to show one, not --key",
        ));
    }
    let freeze_key = target
        .freeze_key
        .clone()
        .unwrap_or_else(|| crate::fleet::freeze_key(&app));
    let report_prefix = args
        .report_prefix
        .clone()
        .unwrap_or_else(|| crate::fleet::report_prefix(&app));
    let client = target.client(ConsulSettings {
        wait: args.wait,
        ..ConsulSettings::default()
    })?;
    // The page writes tier keys named per control; `key` only names the
    // tier shown (or the app's control subtree) in logs.
    let release = Release {
        client,
        key: target.tier.as_deref().map_or_else(
            || crate::fleet::tier_key(&app, ""),
            |t| crate::fleet::tier_key(&app, t),
        ),
        freeze_key: freeze_key.clone(),
    };
    let opts = crate::fleet::commander::web::ServeOptions {
        listen: args.listen,
        read_only: args.read_only,
        allow_remote: args.allow_remote,
        origins: args.origins,
        user_header: args.user_header,
        max_clients: args.max_clients,
        feed: crate::fleet::commander::web::feed::FeedSettings {
            app,
            tier: target.tier.clone(),
            freeze_key,
            report_prefix,
            stale_after: args.stale_after,
            min_interval: args.min_interval,
        },
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let page =
        crate::fleet::commander::web::FleetPage::start(release, opts, shutdown.clone()).await?;
    say!(
        "fleet page on {} (Ctrl-C stops it){}",
        page.url(),
        if args.read_only { ", read-only" } else { "" }
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Internal(format!("cannot watch SIGTERM: {e}")))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
    page.stopped().await;
    Ok(())
}
