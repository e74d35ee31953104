//! The agent's configuration: a TOML file (`--config`, default
//! `/etc/deploy-agent/config.toml`) parsed once into validated types.
//! Unknown keys and bad values are errors that name the key. Read-only: a
//! crash here changes nothing, and a reload that fails keeps the old config.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod health;
mod signing;
mod status;
mod store;

pub use health::HealthConfig;
pub use signing::SigningConfig;
pub use status::{parse_octal_mode, GroupSpec, StatusConfig, MAX_SOCKET_MODE};
pub use store::StoreConfig;

use serde::Deserialize;

use crate::consul::ConsulSettings;
use crate::error::{Error, Result};

/// Where the config lives unless `--config` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/deploy-agent/config.toml";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The deploy root holding `current`, the slots and `.deploy/`.
    pub deploy_root: PathBuf,
    /// Artifact cache; default `<deploy-root>/.deploy/cache` (same
    /// filesystem as the slots).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    #[serde(default)]
    pub source: SourceConfig,
    #[serde(default)]
    pub consul: ConsulConfig,
    #[serde(default)]
    pub download: DownloadConfig,
    #[serde(default)]
    pub unpack: UnpackLimits,
    #[serde(default)]
    pub drain: DrainConfig,
    #[serde(default)]
    pub hooks: HooksConfig,
    /// The local status socket.
    #[serde(default)]
    pub status: StatusConfig,
    /// The health gate after a flip (`health.rs`); off without url/command.
    #[serde(default)]
    pub health: HealthConfig,
    /// Trusted manifest signing keys (`sign.rs`); none = no signature needed.
    #[serde(default)]
    pub signing: SigningConfig,
    /// Tier, app, host id, rollout splay, host reports, freeze key.
    #[serde(default)]
    pub fleet: FleetConfig,
    /// S3-compatible object stores for `s3://` artifact URLs (`store.rs`).
    #[serde(default)]
    pub store: StoreConfig,
    /// Checking the slots against their records (`[integrity]`).
    #[serde(default)]
    pub integrity: IntegrityConfig,
}

/// `[integrity]`: how often the live slot (and the cold one) are checked
/// against their records, to show a hot-patch or any other in-place
/// change in `status`, the metrics and the host report.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct IntegrityConfig {
    /// Between two checks (stat only, about one stat per file); `"0s"`
    /// turns the periodic check off (`deploy-agent verify` and the check
    /// before every flip to an existing slot still run).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for IntegrityConfig {
    fn default() -> Self {
        IntegrityConfig {
            check_interval: Duration::from_secs(300),
        }
    }
}

/// Fleet membership and behaviour (`[fleet]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct FleetConfig {
    /// The application this host serves; with `tier`, names the default
    /// source key `deploy/<app>/<tier>`.
    pub app: Option<String>,
    /// The host's tier (staging, dogfood, canary, production, ...).
    pub tier: Option<String>,
    /// This host's id for rollout buckets and reports; default
    /// `/etc/machine-id`, else the hostname.
    pub host_id: Option<String>,
    /// Longest random wait before a download, so a fleet does not hit the
    /// artifact server in the same second. Default 20s when `app` is set,
    /// else 0s (off).
    #[serde(with = "humantime_serde")]
    pub splay_max: Option<Duration>,
    /// Write this host's state to Consul on every state change. Default on
    /// when `app` is set.
    pub report: Option<bool>,
    /// Prefix of the per-host report keys (default `deploy-hosts/<app>/`).
    pub report_prefix: Option<String>,
    /// The fleet-wide freeze key (default `deploy/<app>/freeze`).
    pub freeze_key: Option<String>,
}

/// The splay when `[fleet]` is set up but `splay-max` is not.
pub const DEFAULT_FLEET_SPLAY: Duration = Duration::from_secs(20);

impl FleetConfig {
    /// The splay in effect.
    pub fn splay(&self) -> Duration {
        self.splay_max.unwrap_or(if self.app.is_some() {
            DEFAULT_FLEET_SPLAY
        } else {
            Duration::ZERO
        })
    }

    /// The report key prefix when reports are on.
    pub fn report_prefix(&self) -> Option<String> {
        if self.report == Some(false) {
            return None;
        }
        match (&self.report_prefix, &self.app) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(app)) => Some(crate::consul::keys::report_prefix(app)),
            (None, None) => None,
        }
    }

    /// The freeze key every agent of the app watches.
    pub fn freeze_key(&self) -> Option<String> {
        self.freeze_key
            .clone()
            .or_else(|| self.app.as_deref().map(crate::consul::keys::freeze_key))
    }
}

/// Where the desired state comes from.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SourceConfig {
    /// The Consul KV key holding the manifest.
    pub key: Option<String>,
    /// A local file holding the manifest instead (hosts without Consul).
    pub file: Option<PathBuf>,
}

/// How to reach Consul. Environment variables (`CONSUL_HTTP_ADDR`, ...)
/// override these, as every Consul tool does.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ConsulConfig {
    pub address: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    pub ssl_verify: bool,
    pub datacenter: Option<String>,
    /// Blocking query wait (at most 10m).
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// LastContact above this triggers a consistent re-read.
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
    /// The first request waits a random delay below this (default 5s), so
    /// a fleet-wide restart does not reach Consul in one burst.
    #[serde(default, with = "humantime_serde")]
    pub first_request_splay: Option<Duration>,
    /// Watch token bucket: requests that may go out back to back (default 2).
    #[serde(default)]
    pub rate_burst: Option<u32>,
    /// Watch token bucket: one more request per interval (default 15s).
    #[serde(default, with = "humantime_serde")]
    pub rate_interval: Option<Duration>,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        // The client's defaults are the section's: they are written once,
        // in `ConsulSettings::default`, so the two cannot drift apart.
        let s = ConsulSettings::default();
        ConsulConfig {
            address: s.address,
            token: None,
            token_file: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            tls_server_name: None,
            ssl_verify: s.ssl_verify,
            datacenter: None,
            wait: s.wait,
            max_stale: s.max_stale,
            first_request_splay: None,
            rate_burst: None,
            rate_interval: None,
        }
    }
}

/// Download behaviour.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DownloadConfig {
    pub parallel_ranges: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    pub retries: u32,
    /// Total bytes per second across ranges; none = unlimited.
    pub bandwidth_limit: Option<u64>,
    /// Allow `file://` artifact URLs in manifests from Consul.
    pub allow_file_urls: bool,
    /// Artifacts kept in the cache.
    pub cache_keep: usize,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            parallel_ranges: 4,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(30),
            retries: 5,
            bandwidth_limit: None,
            allow_file_urls: false,
            cache_keep: 2,
        }
    }
}

/// The `[unpack]` section: the bounds that stop archive bombs while
/// streaming (a manifest may lower them, never raise them). The unpacker
/// takes this type as is.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct UnpackLimits {
    /// Maximum total bytes of file contents.
    pub max_bytes: u64,
    /// Maximum number of archive entries (files, dirs, links).
    pub max_entries: u64,
    /// Threads writing file contents during an unpack: how hard a deploy
    /// may push the disk while the host serves (1 to 16).
    pub writer_threads: usize,
    /// Bytes unpacked between two early writeback requests (one `syncfs`
    /// in the background, so the final one before the ready-marker finds
    /// little left); 0 writes everything back only at that final `syncfs`.
    pub writeback_every: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 20 << 30,
            max_entries: 2_000_000,
            // Two measured best on two cores: file creation is metadata-bound
            // in the kernel, and more threads contend on the directory lock.
            writer_threads: 2,
            // 32, 64 and 128 MiB measured the same within noise on the
            // 400 MB build (the final syncfs fell from 0.7-1.0 s to
            // 40-80 ms, docs/performance.md).
            writeback_every: 32 << 20,
        }
    }
}

/// What to do when processes still use the cold slot at the deadline.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ColdSlotAction {
    /// Fail the deploy, naming the processes.
    #[default]
    Fail,
    /// SIGTERM them, then SIGKILL after a grace period.
    Kill,
}

/// The condition that says the hot slot is drained before a flip.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case", tag = "type", deny_unknown_fields)]
pub enum HotDrain {
    /// Flip without waiting (the default: php-fpm style workers pick up
    /// the new `current` on their next request).
    #[default]
    None,
    /// Wait until no process uses the hot slot.
    NoProcess,
    /// Wait until this command exits 0.
    Command { argv: Vec<String> },
    /// Wait until this URL answers 2xx.
    Http { url: String },
}

/// Drain settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DrainConfig {
    #[serde(with = "humantime_serde")]
    pub cold_deadline: Duration,
    pub cold_action: ColdSlotAction,
    pub hot: HotDrain,
    #[serde(with = "humantime_serde")]
    pub hot_deadline: Duration,
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            cold_deadline: Duration::from_secs(60),
            cold_action: ColdSlotAction::Fail,
            hot: HotDrain::None,
            hot_deadline: Duration::from_secs(30),
            poll: Duration::from_millis(100),
        }
    }
}

/// Commands run around the flip. Each is an argv (no shell).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct HooksConfig {
    pub pre_flip: Option<Vec<String>>,
    pub post_flip: Option<Vec<String>>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Bytes of hook output kept for the log and status.
    pub output_limit: usize,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            pre_flip: None,
            post_flip: None,
            timeout: Duration::from_secs(60),
            output_limit: 64 * 1024,
        }
    }
}

impl Config {
    /// A config with every default, watching `key` on the Consul agent at
    /// `consul_address` for the deploy root `deploy_root` (the demo and
    /// tests start from this).
    pub fn for_consul_key(deploy_root: PathBuf, key: &str, consul_address: &str) -> Config {
        Config {
            deploy_root,
            cache_dir: None,
            source: SourceConfig {
                key: Some(key.to_string()),
                file: None,
            },
            consul: ConsulConfig {
                address: consul_address.to_string(),
                ..ConsulConfig::default()
            },
            download: DownloadConfig::default(),
            unpack: UnpackLimits::default(),
            drain: DrainConfig::default(),
            hooks: HooksConfig::default(),
            health: Default::default(),
            signing: Default::default(),
            fleet: FleetConfig::default(),
            status: StatusConfig::default(),
            integrity: IntegrityConfig::default(),
            store: StoreConfig::default(),
        }
    }

    /// Reads and validates the config file at `path`: [`Config::parse`],
    /// then [`Config::check_host`]. `run` (at start and on every reload)
    /// and `check-config` both call this, so they accept the same files.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Config::parse(&text, path)?;
        cfg.check_host(path)?;
        Ok(cfg)
    }

    /// The checks that depend on this host rather than on the text: the
    /// groups named in `[status]` exist, and the Consul settings resolve
    /// with the environment's `CONSUL_HTTP_*` overrides (a token file that
    /// cannot be read fails here, not after the agent set anything up).
    /// Creates nothing. Group lookups may go to NSS (LDAP...) and block.
    pub fn check_host(&self, path: &Path) -> Result<()> {
        let invalid = |message: String| Error::ConfigInvalid {
            path: path.to_path_buf(),
            message,
        };
        for (name, group) in [
            ("status.socket-group", &self.status.socket_group),
            ("status.operator-group", &self.status.operator_group),
        ] {
            if let Some(g) = group {
                g.resolve().map_err(|e| invalid(format!("{name}: {e}")))?;
            }
        }
        if self.source.key.is_some() || self.fleet.report_prefix().is_some() {
            consul_settings(self).map_err(|e| invalid(format!("consul: {e}")))?;
        }
        Ok(())
    }

    /// Parses and validates config text; `path` is only for messages.
    /// The checks run in this order, so a file with several mistakes is
    /// told about the same one first every time.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let invalid = |message: String| Error::ConfigInvalid {
            path: path.to_path_buf(),
            message,
        };
        let mut cfg: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        check_fleet_names(&cfg).map_err(invalid)?;
        if let (None, None, Some(app), Some(tier)) = (
            &cfg.source.key,
            &cfg.source.file,
            &cfg.fleet.app,
            &cfg.fleet.tier,
        ) {
            cfg.source.key = Some(crate::consul::keys::tier_key(app, tier));
        }
        check_deploy_root(&cfg.deploy_root).map_err(invalid)?;
        check_socket_mode_literal(text).map_err(invalid)?;
        check_limits(&cfg).map_err(invalid)?;
        check_keys(&cfg).map_err(invalid)?;
        check_ranges(&cfg).map_err(invalid)?;
        check_commands(&cfg).map_err(invalid)?;
        cfg.health.validate().map_err(invalid)?;
        cfg.store.validate().map_err(invalid)?;
        crate::sign::TrustedKeys::parse(&cfg.signing.public_keys)
            .map_err(|e| invalid(format!("signing.{e}")))?;
        Ok(cfg)
    }

    /// The artifact cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.deploy_root.join(".deploy/cache"))
    }
}

/// System directories the agent must never own as a deploy root: it
/// creates slots, a `current` link and `.deploy/` there and deletes what
/// it does not recognise in its slots.
const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/usr/bin",
    "/usr/lib",
    "/usr/local",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/share",
    "/var",
    "/var/lib",
    "/var/log",
    "/var/tmp",
];

/// Kernel pseudo filesystems: nothing below them can be a deploy root.
/// (`/dev` itself is refused above, but `/dev/shm` is a real tmpfs.)
const PSEUDO_FS: &[&str] = &["/proc", "/sys"];

/// Why `root` cannot be a deploy root, if it cannot. Judged lexically
/// (`.` and trailing slashes ignored, `..` refused): the directory may not
/// exist yet.
pub fn dangerous_root(root: &Path) -> Option<&'static str> {
    use std::path::Component;
    let mut clean = PathBuf::from("/");
    for c in root.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => clean.push(p),
            Component::ParentDir => return Some("contains `..`"),
            Component::Prefix(_) => return Some("is not a Unix path"),
        }
    }
    if SYSTEM_DIRS.iter().any(|d| clean == Path::new(d)) {
        return Some("is a system directory");
    }
    if PSEUDO_FS.iter().any(|d| clean.starts_with(d)) {
        return Some("is on a kernel pseudo filesystem");
    }
    None
}

/// `[status] socket-mode` written as a decimal integer (`660`) is refused
/// even when it is at most 0o777: TOML reads `660` as six hundred and
/// sixty, which is not the mode the operator meant. Octal literals
/// (`0o660`) and strings (`"0660"`) are what the value means.
fn check_socket_mode_literal(text: &str) -> Result<(), String> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        status: Option<Status>,
    }
    #[derive(Deserialize)]
    struct Status {
        #[serde(default, rename = "socket-mode")]
        socket_mode: Option<toml::Spanned<toml::Value>>,
    }
    // The full parse already succeeded, so this one does too; a failure
    // here means there is no literal to judge.
    let Ok(File {
        status: Some(Status {
            socket_mode: Some(v),
        }),
    }) = toml::from_str::<File>(text)
    else {
        return Ok(());
    };
    if !matches!(v.get_ref(), toml::Value::Integer(_)) {
        return Ok(());
    }
    let literal = text.get(v.span()).unwrap_or_default().trim();
    if literal.starts_with("0o") {
        return Ok(());
    }
    Err(format!(
        "status.socket-mode: {literal} is a decimal number; write the mode in octal, \
         0o{literal} or \"{literal}\""
    ))
}

/// `[fleet]` app and tier go into key names: one path segment each.
fn check_fleet_names(cfg: &Config) -> Result<(), String> {
    for (name, v) in [
        ("fleet.app", &cfg.fleet.app),
        ("fleet.tier", &cfg.fleet.tier),
    ] {
        if let Some(v) = v {
            if v.is_empty() || v.contains('/') || !valid_key(v) {
                return Err(format!("{name}: {v:?} must be [A-Za-z0-9._-], without '/'"));
            }
        }
    }
    Ok(())
}

/// An absolute directory of its own: never a system directory.
fn check_deploy_root(root: &Path) -> Result<(), String> {
    if !root.is_absolute() {
        return Err("deploy-root: must be an absolute path".into());
    }
    if let Some(why) = dangerous_root(root) {
        return Err(format!(
            "deploy-root: {} {why}; use a directory of its own, e.g. /srv/<app>",
            root.display()
        ));
    }
    Ok(())
}

/// Exactly one source (a Consul key or a file), and every Consul key the
/// config names is one the client accepts.
fn check_keys(cfg: &Config) -> Result<(), String> {
    match (&cfg.source.key, &cfg.source.file) {
        (Some(_), Some(_)) => {
            return Err("source: set either `key` or `file`, not both".into())
        }
        (None, None) => {
            return Err(
                "source: set `key` (a Consul KV key) or `file` (a local manifest), or [fleet] `app` and `tier`".into(),
            )
        }
        (Some(k), None) if !valid_key(k) => {
            return Err(format!(
                "source.key: {k:?} must be [A-Za-z0-9._/-], no leading '/', no '..'"
            ))
        }
        _ => {}
    }
    for (name, k) in [
        ("fleet.report-prefix", &cfg.fleet.report_prefix),
        ("fleet.freeze-key", &cfg.fleet.freeze_key),
    ] {
        if k.as_deref().is_some_and(|k| !valid_key(k)) {
            return Err(format!("{name}: must be [A-Za-z0-9._/-]"));
        }
    }
    Ok(())
}

/// Numbers with a bounded range (beyond the zeros of [`check_limits`]).
fn check_ranges(cfg: &Config) -> Result<(), String> {
    if cfg.consul.wait.is_zero() || cfg.consul.wait > Duration::from_secs(600) {
        return Err("consul.wait: must be between 1s and 10m".into());
    }
    if !(1..=64).contains(&cfg.download.parallel_ranges) {
        return Err("download.parallel-ranges: must be 1 to 64".into());
    }
    if cfg.download.cache_keep == 0 {
        return Err("download.cache-keep: must be at least 1".into());
    }
    Ok(())
}

/// A hook or drain command, when set, names a program.
fn check_commands(cfg: &Config) -> Result<(), String> {
    for (name, argv) in [
        ("hooks.pre-flip", &cfg.hooks.pre_flip),
        ("hooks.post-flip", &cfg.hooks.post_flip),
    ] {
        if argv.as_ref().is_some_and(|a| a.is_empty()) {
            return Err(format!("{name}: must name a command"));
        }
    }
    if let HotDrain::Command { argv } = &cfg.drain.hot {
        if argv.is_empty() {
            return Err("drain.hot.argv: must name a command".into());
        }
    }
    Ok(())
}

/// Zero values that cannot be meant: a zero timeout fails every request,
/// a zero limit refuses every build, a zero rate or poll interval spins.
fn check_limits(cfg: &Config) -> Result<(), String> {
    let zero_durations = [
        ("download.connect-timeout", cfg.download.connect_timeout),
        ("download.read-timeout", cfg.download.read_timeout),
        ("drain.poll", cfg.drain.poll),
        ("hooks.timeout", cfg.hooks.timeout),
        (
            "consul.rate-interval",
            cfg.consul.rate_interval.unwrap_or(Duration::from_secs(1)),
        ),
    ];
    for (name, d) in zero_durations {
        if d.is_zero() {
            return Err(format!("{name}: must be above zero"));
        }
    }
    if !(1..=16).contains(&cfg.unpack.writer_threads) {
        return Err("unpack.writer-threads: must be 1 to 16".into());
    }
    let zero_counts = [
        ("unpack.max-bytes", cfg.unpack.max_bytes),
        ("unpack.max-entries", cfg.unpack.max_entries),
        (
            "download.bandwidth-limit",
            cfg.download.bandwidth_limit.unwrap_or(1),
        ),
        (
            "consul.rate-burst",
            u64::from(cfg.consul.rate_burst.unwrap_or(1)),
        ),
        (
            "status.max-clients",
            cfg.status.max_clients.unwrap_or(1) as u64,
        ),
    ];
    for (name, n) in zero_counts {
        if n == 0 {
            return Err(format!("{name}: must be at least 1"));
        }
    }
    if cfg.status.max_clients.is_some_and(|n| n > 1024) {
        return Err("status.max-clients: must be at most 1024".into());
    }
    Ok(())
}

/// Consul key rule (docs/consul-watch-rules.md rule 15): the Consul
/// client's own validator, so `check-config` and the client never disagree.
pub fn valid_key(k: &str) -> bool {
    crate::consul::validate_key(k, false).is_ok()
}

/// Builds the Consul settings from the config, then the environment
/// (`CONSUL_HTTP_ADDR` and friends override the file, as in every Consul
/// tool).
pub fn consul_settings(cfg: &Config) -> Result<ConsulSettings> {
    let c = &cfg.consul;
    let mut s = ConsulSettings {
        address: c.address.clone(),
        token: c.token.clone(),
        ca_cert: c.ca_cert.clone(),
        client_cert: c.client_cert.clone(),
        client_key: c.client_key.clone(),
        tls_server_name: c.tls_server_name.clone(),
        ssl_verify: c.ssl_verify,
        datacenter: c.datacenter.clone(),
        wait: c.wait,
        max_stale: c.max_stale,
        ..ConsulSettings::default()
    };
    // Read now (a missing file fails the start) and again by the client
    // whenever it changes.
    s.token_file = c.token_file.clone();
    if let Some(d) = c.first_request_splay {
        s.first_request_splay = d;
    }
    if let Some(b) = c.rate_burst {
        s.rate.burst = b.max(1);
    }
    if let Some(i) = c.rate_interval {
        s.rate.refill_interval = i;
    }
    s.from_env()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config> {
        Config::parse(t, Path::new("test.toml"))
    }

    #[test]
    fn keys_are_checked_by_the_consul_clients_own_rule() {
        // `a..b` once passed check-config and was then refused by the
        // client on every request, forever.
        for k in ["deploy/a..b", "deploy/x", "/deploy/x", "deploy/x y"] {
            let cfg = format!("deploy-root = \"/s\"\n[source]\nkey = \"{k}\"\n");
            assert_eq!(
                parse(&cfg).is_ok(),
                crate::consul::validate_key(k, false).is_ok(),
                "{k}"
            );
        }
        assert!(parse("deploy-root = \"/s\"\n[source]\nkey = \"deploy/a..b\"\n").is_err());
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("deploy-root = \"/srv/app\"\n[source]\nkey = \"deploy/app/prod\"\n").unwrap();
        assert_eq!(c.download.parallel_ranges, 4);
        assert_eq!(c.consul.wait, Duration::from_secs(300));
        assert_eq!(c.cache_dir(), PathBuf::from("/srv/app/.deploy/cache"));
    }

    #[test]
    fn watch_pacing_defaults_and_overrides() {
        let c = parse("deploy-root = \"/x\"\n[source]\nkey = \"k\"\n").unwrap();
        assert_eq!((c.consul.rate_burst, c.consul.rate_interval), (None, None));
        let s = consul_settings(&c).unwrap();
        assert_eq!(
            (s.rate.burst, s.rate.refill_interval),
            (2, Duration::from_secs(15))
        );
        let c = parse(
            "deploy-root = \"/x\"\n[source]\nkey = \"k\"\n[consul]\nrate-burst = 3\nrate-interval = \"100ms\"\n",
        )
        .unwrap();
        let s = consul_settings(&c).unwrap();
        assert_eq!(s.rate.burst, 3);
        assert_eq!(s.rate.refill_interval, Duration::from_millis(100));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = parse("deploy-root = \"/x\"\nbogus = 1\n[source]\nkey=\"k\"").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e =
            parse("deploy-root = \"/x\"\n[source]\nkey=\"k\"\n[download]\nread-timeout = \"soon\"")
                .unwrap_err();
        assert!(
            e.to_string().contains("read-timeout") || e.to_string().contains("soon"),
            "{e}"
        );
        let e = parse("deploy-root = \"/x\"\n[source]\nkey=\"/abs\"").unwrap_err();
        assert!(e.to_string().contains("source.key"), "{e}");
        let e = parse("deploy-root = \"rel\"\n[source]\nkey=\"k\"").unwrap_err();
        assert!(e.to_string().contains("deploy-root"), "{e}");
    }

    #[test]
    fn partial_tables_take_defaults() {
        let c = parse("deploy-root = \"/x\"\n[source]\nkey=\"k\"\n[consul]\naddress = \"http://c:8500\"\nwait = \"5s\"\n").unwrap();
        assert_eq!(c.consul.wait, Duration::from_secs(5));
        assert!(c.consul.ssl_verify);
        assert_eq!(c.consul.max_stale, Duration::from_secs(10));
    }

    #[test]
    fn app_and_tier_name_the_key() {
        let c = parse("deploy-root = \"/srv/app\"\n[fleet]\napp = \"web\"\ntier = \"canary\"\n")
            .unwrap();
        assert_eq!(c.source.key.as_deref(), Some("deploy/web/canary"));
        assert_eq!(c.fleet.splay(), DEFAULT_FLEET_SPLAY);
        assert_eq!(
            c.fleet.report_prefix().as_deref(),
            Some("deploy-hosts/web/")
        );
        let c = parse("deploy-root = \"/s\"\n[fleet]\napp = \"web\"\ntier = \"c\"\nsplay-max = \"0s\"\n[source]\nkey = \"k/x\"\n").unwrap();
        assert_eq!(c.source.key.as_deref(), Some("k/x"));
        assert_eq!(c.fleet.splay(), Duration::ZERO);
        let e = parse("deploy-root = \"/s\"\n[fleet]\napp = \"a/b\"\ntier = \"c\"\n").unwrap_err();
        assert!(e.to_string().contains("app"), "{e}");
        let e = parse("deploy-root = \"/s\"\n[fleet]\napp = \"web\"\n").unwrap_err();
        assert!(e.to_string().contains("tier"), "{e}");
    }

    #[test]
    fn a_partial_consul_table_gets_defaults() {
        let c = parse(
            "deploy-root = \"/x\"\n[source]\nkey=\"k\"\n[consul]\naddress = \"http://10.0.0.1:8500\"\n",
        )
        .unwrap();
        assert!(c.consul.ssl_verify);
        assert_eq!(c.consul.wait, Duration::from_secs(300));
        assert_eq!(c.consul.first_request_splay, None);
    }

    #[test]
    fn dangerous_roots_are_refused() {
        for root in [
            "/",
            "/etc",
            "/etc/",
            "/usr",
            "/var",
            "/tmp",
            "/home",
            "/proc/1",
            "/sys/x",
            "/srv/../etc",
            "//",
        ] {
            let e = parse(&format!(
                "deploy-root = \"{root}\"\n[source]\nkey = \"k\"\n"
            ))
            .unwrap_err();
            assert!(e.to_string().contains("deploy-root"), "{root}: {e}");
        }
        for root in ["/srv/app", "/tmp/x", "/var/lib/app", "/opt/app/."] {
            assert!(
                parse(&format!(
                    "deploy-root = \"{root}\"\n[source]\nkey = \"k\"\n"
                ))
                .is_ok(),
                "{root}"
            );
        }
    }

    #[test]
    fn socket_mode_must_be_written_in_octal() {
        let with = |m: &str| {
            parse(&format!(
                "deploy-root = \"/srv/a\"\n[source]\nkey = \"k\"\n[status]\nsocket-mode = {m}\n"
            ))
        };
        assert_eq!(with("0o660").unwrap().status.socket_mode, Some(0o660));
        assert_eq!(with("\"0640\"").unwrap().status.socket_mode, Some(0o640));
        for bad in ["660", "432", "0o7777", "\"7777\"", "\"rw\""] {
            let e = with(bad).unwrap_err();
            assert!(e.to_string().contains("socket-mode"), "{bad}: {e}");
        }
    }

    #[test]
    fn zero_timeouts_and_limits_are_refused() {
        for (table, kv) in [
            ("download", "connect-timeout = \"0s\""),
            ("download", "read-timeout = \"0ms\""),
            ("download", "bandwidth-limit = 0"),
            ("unpack", "max-bytes = 0"),
            ("unpack", "max-entries = 0"),
            ("drain", "poll = \"0s\""),
            ("hooks", "timeout = \"0s\""),
            ("consul", "rate-burst = 0"),
            ("consul", "rate-interval = \"0s\""),
            ("status", "max-clients = 0"),
        ] {
            let key = kv.split(' ').next().unwrap();
            let e = parse(&format!(
                "deploy-root = \"/srv/a\"\n[source]\nkey = \"k\"\n[{table}]\n{kv}\n"
            ))
            .unwrap_err();
            assert!(
                e.to_string().contains(&format!("{table}.{key}")),
                "{kv}: {e}"
            );
        }
    }

    #[test]
    fn groups_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let body = |g: &str| {
            format!("deploy-root = \"/srv/a\"\n[source]\nfile = \"/srv/m.json\"\n[status]\noperator-group = \"{g}\"\n")
        };
        std::fs::write(&path, body("no-such-group-deploy-agent")).unwrap();
        let e = Config::load(&path).unwrap_err();
        assert!(e.to_string().contains("status.operator-group"), "{e}");
        std::fs::write(&path, body("root")).unwrap();
        Config::load(&path).unwrap();
    }

    #[test]
    fn durations_read_as_people_write_them() {
        let c = parse("deploy-root = \"/x\"\n[source]\nkey = \"k\"\n[download]\nread-timeout = \"1m 30s\"\nconnect-timeout = \"250ms\"\n").unwrap();
        assert_eq!(c.download.read_timeout, Duration::from_secs(90));
        assert_eq!(c.download.connect_timeout, Duration::from_millis(250));
        let e = parse(
            "deploy-root = \"/x\"\n[source]\nkey = \"k\"\n[download]\nread-timeout = \"5\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("read-timeout"), "{e}");
    }
}
