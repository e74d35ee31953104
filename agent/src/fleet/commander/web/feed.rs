//! The fleet page's one Consul watch per app, shared by every browser.
//!
//! One blocking recursive read per watched prefix (the control keys'
//! subtree, plus the report prefix and the freeze key when they live
//! outside it) feeds one assembler, which turns the latest pairs into a
//! [`Snapshot`], serialises it once and publishes it on a `watch` channel
//! that every server-sent-event stream reads. A browser never causes a
//! Consul request: the cost is one blocking query per prefix per change,
//! at most one per `min_interval`, and one per `wait` when nothing changes.
//!
//! The aggregation is `fleet::view::summarise` (the same numbers as
//! `fleet status`); the key names come from `fleet::tier_key`,
//! `fleet::freeze_key` and `fleet::report_prefix`.
//!
//! Read-only and in memory: nothing here writes to Consul or disk. If the
//! process dies, the next start reads everything again from index 0.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::now_secs;
use crate::consul::{ConsulClient, KvPair, QueryOptions};
use crate::deploy::Phase;
use crate::fleet::commander::release::{Current, Release};
use crate::fleet::commander::view::{self, FleetSummary};
use crate::fleet::host::hostreport::HostRecord;
use crate::manifest::{Manifest, UrlPolicy};
use crate::pacing::{Backoff, BackoffState};
use crate::source::consul::next_index;

/// The rollout steps the page promotes through.
pub const STEPS: [f64; 6] = [2.0, 10.0, 25.0, 50.0, 75.0, 100.0];

/// How often the snapshot is recomputed without a Consul change, so a
/// host turns stale (a matter of time, not of writes) without a request.
const RECOMPUTE_EVERY: Duration = Duration::from_secs(10);

/// What the feed watches and how.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    pub app: String,
    /// Show only this tier.
    pub tier: Option<String>,
    pub freeze_key: String,
    pub report_prefix: String,
    /// See `fleet status --stale-after`.
    pub stale_after: Duration,
    /// Least time between two reads of one prefix: a rollout of thousands
    /// of hosts writes reports many times a second, the page needs at most
    /// one read per interval.
    pub min_interval: Duration,
}

impl FeedSettings {
    /// The subtree holding the tier keys: `tier_key(app, "")`, derived so a
    /// change of the key layout flows through.
    pub fn control_prefix(&self) -> String {
        crate::fleet::tier_key(&self.app, "")
    }

    /// The prefixes to read recursively: the control subtree, and the
    /// report prefix and freeze key when they are outside it (the report
    /// prefix is moving out of it, issue 11).
    pub fn prefixes(&self) -> Vec<String> {
        let mut all = vec![
            self.control_prefix(),
            self.report_prefix.clone(),
            self.freeze_key.clone(),
        ];
        all.sort();
        all.dedup();
        let covered = all.clone();
        all.retain(|p| !covered.iter().any(|q| q != p && p.starts_with(q.as_str())));
        all
    }
}

/// What the page shows. Serialised once per change.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub app: String,
    /// Unix seconds of this snapshot (the page ages hosts from it).
    pub generated_at: u64,
    /// The Consul address the server talks to (for the CLI equivalents).
    pub consul: String,
    /// The last Consul error of the watch, while it lasts.
    pub error: Option<String>,
    pub freeze_key: String,
    pub freeze: Option<Freeze>,
    pub stale_after_secs: u64,
    pub tiers: Vec<TierView>,
    /// Reports that do not parse as a host record.
    pub unreadable_reports: usize,
    /// The column names of `hosts`.
    pub host_fields: [&'static str; 9],
    pub hosts: Vec<HostRow>,
}

/// The freeze key's value.
#[derive(Debug, Clone, Serialize)]
pub struct Freeze {
    pub modify_index: u64,
    pub reason: Option<String>,
    pub by: Option<String>,
    pub at: Option<u64>,
    /// The raw value when it is not the JSON `release freeze` writes.
    pub raw: String,
    pub cli: String,
}

/// One tier as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TierView {
    pub tier: String,
    pub key: String,
    pub modify_index: u64,
    pub build: Option<String>,
    pub previous: Option<String>,
    /// Absent in the manifest means 100.
    pub percent: f64,
    pub published_at: Option<u64>,
    pub rolled_back_from: Option<String>,
    /// Why the published value cannot be used, if it cannot.
    pub problem: Option<String>,
    /// The release commands that write this value.
    pub produced_by: Vec<String>,
    pub summary: FleetSummary,
    pub steps: Vec<StepView>,
    pub stale: Vec<StaleHost>,
    pub actions: Actions,
}

/// One step of the rollout and how far its hosts have converged.
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    pub percent: f64,
    /// Reporting hosts whose bucket is below `percent`.
    pub hosts: usize,
    /// Of those, converged on the tier's build (for reached steps) or
    /// already on it (for the others).
    pub converged: usize,
    /// The rollout is at or past this step.
    pub reached: bool,
}

/// A host that has not acknowledged the current key in time.
#[derive(Debug, Clone, Serialize)]
pub struct StaleHost {
    pub host: String,
    /// Seconds since its last report.
    pub silent_secs: u64,
    pub build: Option<String>,
    pub phase: &'static str,
}

/// What the controls would do; `None` (with a reason) when unavailable.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Actions {
    pub promote: Option<Planned>,
    pub rollback: Option<Planned>,
    pub freeze: Option<Planned>,
    pub unfreeze: Option<Planned>,
    /// Why promote or rollback is not offered.
    pub unavailable: Vec<String>,
}

/// One control: the key it writes, the index it must still be at, what it
/// writes and the CLI command that does the same.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    pub key: String,
    pub expected_index: u64,
    pub percent: Option<f64>,
    /// The build that will be published (promote, rollback) or that is
    /// live when freezing.
    pub build: Option<String>,
    pub cli: String,
}

/// One host row: serialised as an array in `host_fields` order, which
/// keeps 5,000 hosts near half a megabyte.
#[derive(Debug, Clone)]
pub struct HostRow {
    pub host: String,
    pub tier: Option<String>,
    pub build: Option<String>,
    pub desired: Option<String>,
    pub phase: &'static str,
    pub state: HostState,
    pub error: Option<String>,
    pub updated_at: u64,
    pub bucket: Option<f64>,
}

/// A host's standing, as `fleet status` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    Failed,
    Stale,
    Converged,
    Deploying,
    Waiting,
}

impl HostState {
    fn as_str(self) -> &'static str {
        match self {
            HostState::Failed => "failed",
            HostState::Stale => "stale",
            HostState::Converged => "converged",
            HostState::Deploying => "deploying",
            HostState::Waiting => "waiting",
        }
    }
}

const HOST_FIELDS: [&str; 9] = [
    "host",
    "tier",
    "build",
    "desired",
    "phase",
    "state",
    "error",
    "updated_at",
    "bucket",
];

impl Serialize for HostRow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(HOST_FIELDS.len()))?;
        seq.serialize_element(&self.host)?;
        seq.serialize_element(&self.tier)?;
        seq.serialize_element(&self.build)?;
        seq.serialize_element(&self.desired)?;
        seq.serialize_element(self.phase)?;
        seq.serialize_element(self.state.as_str())?;
        seq.serialize_element(&self.error)?;
        seq.serialize_element(&self.updated_at)?;
        // Two decimals are plenty for a table; saves bytes.
        seq.serialize_element(&self.bucket.map(|b| (b * 100.0).round() / 100.0))?;
        seq.end()
    }
}

/// One published snapshot: the JSON every browser receives.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Bumped on every publish.
    pub version: u64,
    /// `Snapshot` as JSON; empty until the first read of every prefix.
    pub json: Bytes,
}

/// The receiving end: clone it per browser.
pub type FeedReceiver = watch::Receiver<Arc<Published>>;

/// Makes every watch re-read at once (after the page's own write), so the
/// page shows the result without waiting for the blocking query to return
/// and the min interval to pass.
#[derive(Debug, Clone)]
pub struct Nudge(Arc<watch::Sender<u64>>);

impl Nudge {
    /// Asks every prefix watch for an immediate re-read.
    pub fn reread(&self) {
        self.0.send_modify(|g| *g = g.wrapping_add(1));
    }
}

/// Starts the watch tasks; they stop when `shutdown` fires.
pub fn start(
    release: Release,
    settings: FeedSettings,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) -> (FeedReceiver, Nudge) {
    let (tx, rx) = watch::channel(Arc::new(Published::default()));
    let (nudge, _) = watch::channel(0u64);
    let nudge = Nudge(Arc::new(nudge));
    let prefixes = settings.prefixes();
    info!(app = %settings.app, prefixes = ?prefixes, wait = ?release.client.settings().wait, min_interval = ?settings.min_interval, "fleet page: watching Consul");
    let (up_tx, up_rx) = mpsc::channel(prefixes.len() * 2);
    for p in &prefixes {
        tracker.spawn(watch_prefix(
            release.client.clone(),
            p.clone(),
            settings.clone(),
            up_tx.clone(),
            nudge.0.subscribe(),
            shutdown.clone(),
        ));
    }
    drop(up_tx);
    tracker.spawn(assemble(release, settings, prefixes, up_rx, tx, shutdown));
    (rx, nudge)
}

/// What one prefix's watch reports.
#[derive(Debug)]
struct Update {
    prefix: String,
    pairs: Result<Vec<KvPair>, String>,
}

/// The blocking-query loop on one prefix: sends the pairs whenever the
/// index moves.
async fn watch_prefix(
    client: ConsulClient,
    prefix: String,
    settings: FeedSettings,
    tx: mpsc::Sender<Update>,
    mut nudged: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let mut index = 0u64;
    let mut backoff = BackoffState::new(Backoff::default());
    let mut rng = StdRng::from_entropy();
    loop {
        let started = Instant::now();
        let opts = QueryOptions {
            index,
            // The client's own `wait`: its request timeout is sized on it.
            wait: Some(client.settings().wait),
            stale: false,
            consistent: false,
        };
        let read = tokio::select! {
            _ = shutdown.cancelled() => return,
            // Dropping the blocking request closes it; read afresh.
            _ = nudged.changed() => {
                index = 0;
                continue;
            }
            r = client.list_blocking(&prefix, &opts) => r,
        };
        let pause = match read {
            Ok((received, pairs)) => {
                backoff.reset();
                let moved = index <= 1 || received != index;
                index = next_index(index, received);
                if moved {
                    debug!(%prefix, index, keys = pairs.len(), "fleet page: prefix changed");
                    let u = Update {
                        prefix: prefix.clone(),
                        pairs: Ok(pairs),
                    };
                    if tx.send(u).await.is_err() {
                        return;
                    }
                }
                settings.min_interval.saturating_sub(started.elapsed())
            }
            Err(e) => {
                let delay = backoff.next_delay(&mut rng);
                warn!(%prefix, error = %e, retry_in = ?delay, "fleet page: Consul read failed");
                let u = Update {
                    prefix: prefix.clone(),
                    pairs: Err(e.to_string()),
                };
                if tx.send(u).await.is_err() {
                    return;
                }
                delay
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = nudged.changed() => index = 0,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Keeps the latest pairs of every prefix and publishes a snapshot when
/// they change, and every [`RECOMPUTE_EVERY`] when time alone changed it.
async fn assemble(
    release: Release,
    settings: FeedSettings,
    prefixes: Vec<String>,
    mut updates: mpsc::Receiver<Update>,
    tx: watch::Sender<Arc<Published>>,
    shutdown: CancellationToken,
) {
    let mut pairs: BTreeMap<String, Vec<KvPair>> = BTreeMap::new();
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    let mut last_body: Option<String> = None;
    let mut version = 0u64;
    let mut tick = tokio::time::interval(RECOMPUTE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            u = updates.recv() => {
                let Some(u) = u else { return };
                match u.pairs {
                    Ok(p) => {
                        errors.remove(&u.prefix);
                        pairs.insert(u.prefix, p);
                    }
                    Err(e) => {
                        errors.insert(u.prefix, e);
                    }
                }
            }
            _ = tick.tick() => {}
        }
        let all_read = prefixes.iter().all(|p| pairs.contains_key(p));
        if !all_read && errors.is_empty() {
            continue;
        }
        let started = std::time::Instant::now();
        let all: Vec<&KvPair> = pairs.values().flatten().collect();
        let error = (!errors.is_empty()).then(|| {
            errors
                .iter()
                .map(|(p, e)| format!("{p}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        });
        let mut snap = snapshot(&release, &settings, &all, error, now_secs());
        // Compare without the timestamp: an unchanged fleet is not resent.
        let generated_at = std::mem::take(&mut snap.generated_at);
        let body = serde_json::to_string(&snap).unwrap_or_default();
        if last_body.as_deref() == Some(body.as_str()) {
            continue;
        }
        snap.generated_at = generated_at;
        let json = match serde_json::to_vec(&snap) {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "fleet page: cannot encode the snapshot");
                continue;
            }
        };
        last_body = Some(body);
        version += 1;
        debug!(
            version,
            hosts = snap.hosts.len(),
            bytes = json.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "fleet page: snapshot published"
        );
        tx.send_replace(Arc::new(Published {
            version,
            json: Bytes::from(json),
        }));
    }
}

/// The CLI's common flags for this app, as a commander would type them.
pub fn cli_prefix(consul: &str, app: &str, tier: Option<&str>) -> String {
    let mut s = format!(
        "deploy-agent release --consul {consul} --app {}",
        quote(app)
    );
    if let Some(t) = tier {
        s.push_str(&format!(" --tier {}", quote(t)));
    }
    s
}

/// Shell-quotes a word when it needs it.
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-:=,@%+".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn fmt_percent(p: f64) -> String {
    // 25 rather than 25.0; fractions as given.
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

/// The next step above `percent`, if any.
pub fn next_step(percent: f64) -> Option<f64> {
    STEPS.iter().copied().find(|s| *s > percent)
}

/// Builds the page's snapshot from the pairs of every watched prefix.
/// Pure apart from the `release` used for its key names and validation.
pub fn snapshot(
    release: &Release,
    settings: &FeedSettings,
    pairs: &[&KvPair],
    error: Option<String>,
    now: u64,
) -> Snapshot {
    let consul = release.client.address().to_string();
    let sorted = sort_pairs(settings, pairs);
    let freeze = sorted
        .freeze
        .map(|p| freeze_view(p, &consul, &settings.app));
    let frozen = freeze.is_some();

    let mut states: BTreeMap<String, HostState> = BTreeMap::new();
    let mut views = Vec::new();
    for name in tier_names(&sorted) {
        let of_tier: Vec<HostRecord> = sorted
            .reports
            .iter()
            .filter(|r| r.tier.as_deref() == Some(name.as_str()))
            .cloned()
            .collect();
        let v = tier_view(
            &tier_release(release, settings, &name),
            settings,
            &consul,
            &name,
            sorted.tiers.get(&name).copied(),
            freeze.as_ref(),
            &of_tier,
            now,
        );
        for r in &of_tier {
            let state = host_state(&v, r, frozen, settings.stale_after, now);
            states.insert(r.host.clone(), state);
        }
        views.push(v);
    }

    let hosts = sorted
        .reports
        .iter()
        .map(|r| host_row(r, states.get(r.host.as_str()).copied()))
        .collect();

    Snapshot {
        app: settings.app.clone(),
        generated_at: now,
        consul,
        error,
        freeze_key: settings.freeze_key.clone(),
        freeze,
        stale_after_secs: settings.stale_after.as_secs(),
        tiers: views,
        unreadable_reports: sorted.unreadable,
        host_fields: HOST_FIELDS,
        hosts,
    }
}

/// The watched pairs, sorted by what each key is.
struct Sorted<'a> {
    /// The tier keys the page shows, by tier name.
    tiers: BTreeMap<String, &'a KvPair>,
    freeze: Option<&'a KvPair>,
    /// The reports of the shown tiers, by host name.
    reports: Vec<HostRecord>,
    /// Reports that do not parse as a host record.
    unreadable: usize,
}

/// Sorts the pairs into tier keys, the freeze key and host reports; keeps
/// only the `--tier` one when the page shows one tier.
fn sort_pairs<'a>(settings: &FeedSettings, pairs: &[&'a KvPair]) -> Sorted<'a> {
    let control = settings.control_prefix();
    let mut sorted = Sorted {
        tiers: BTreeMap::new(),
        freeze: None,
        reports: Vec::new(),
        unreadable: 0,
    };
    for p in pairs.iter().copied() {
        if p.key.starts_with(&settings.report_prefix) {
            match serde_json::from_slice::<HostRecord>(&p.value) {
                Ok(r) => sorted.reports.push(r),
                Err(_) => sorted.unreadable += 1,
            }
        } else if p.key == settings.freeze_key {
            sorted.freeze = Some(p);
        } else if let Some(tier) = p.key.strip_prefix(&control) {
            if !tier.is_empty()
                && !tier.contains('/')
                && crate::fleet::tier_key(&settings.app, tier) == p.key
                && settings.tier.as_deref().is_none_or(|t| t == tier)
            {
                sorted.tiers.insert(tier.to_string(), p);
            }
        }
    }
    if let Some(t) = &settings.tier {
        sorted
            .reports
            .retain(|r| r.tier.as_deref() == Some(t.as_str()));
    }
    sorted.reports.sort_by(|a, b| a.host.cmp(&b.host));
    sorted
}

/// The freeze key's value as the page shows it: the fields `release
/// freeze` writes when it is that JSON, the raw text in any case.
fn freeze_view(p: &KvPair, consul: &str, app: &str) -> Freeze {
    let raw = String::from_utf8_lossy(&p.value).into_owned();
    let v: Option<Map<String, Value>> = serde_json::from_slice(&p.value).ok();
    let field = |k: &str| v.as_ref().and_then(|m| m.get(k));
    Freeze {
        modify_index: p.modify_index,
        reason: field("reason").and_then(Value::as_str).map(str::to_string),
        by: field("by").and_then(Value::as_str).map(str::to_string),
        at: field("at").and_then(Value::as_u64),
        raw,
        cli: format!(
            "{} freeze --reason {}",
            cli_prefix(consul, app, None),
            quote(
                field("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("frozen by the deploy commander")
            )
        ),
    }
}

/// The tiers to show, sorted: the published ones, and those that hosts
/// report but nobody published.
fn tier_names(sorted: &Sorted) -> Vec<String> {
    let mut names: Vec<String> = sorted.tiers.keys().cloned().collect();
    for r in &sorted.reports {
        if let Some(t) = &r.tier {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
    }
    names.sort();
    names
}

/// `release` pointed at one tier's key: same client, same freeze key.
fn tier_release(release: &Release, settings: &FeedSettings, tier: &str) -> Release {
    Release {
        client: release.client.clone(),
        key: crate::fleet::tier_key(&settings.app, tier),
        freeze_key: settings.freeze_key.clone(),
    }
}

/// One host's table row. `state` is `None` for a host of no shown tier;
/// it counts as failed or waiting by its phase alone.
fn host_row(r: &HostRecord, state: Option<HostState>) -> HostRow {
    HostRow {
        host: r.host.clone(),
        tier: r.tier.clone(),
        build: r.build.clone(),
        desired: r.desired.clone(),
        phase: r.phase.as_str(),
        state: state.unwrap_or(if r.phase == Phase::Failed {
            HostState::Failed
        } else {
            HostState::Waiting
        }),
        error: r.error.clone(),
        updated_at: r.updated_at,
        bucket: r.bucket,
    }
}

/// One host's standing, by `view::summarise` over that host alone, so the
/// page and `fleet status` share one definition of converged and stale.
fn host_state(
    tier: &TierView,
    r: &HostRecord,
    frozen: bool,
    stale_after: Duration,
    now: u64,
) -> HostState {
    if r.phase == Phase::Failed {
        return HostState::Failed;
    }
    let one = view::summarise(
        &tier.key,
        None,
        (tier.modify_index > 0).then_some(tier.modify_index),
        tier.published_at,
        frozen,
        std::slice::from_ref(r),
        stale_after,
        now,
    );
    if !one.stale.is_empty() {
        HostState::Stale
    } else if one.converged == 1 {
        HostState::Converged
    } else if r.phase.is_active() {
        HostState::Deploying
    } else {
        HostState::Waiting
    }
}

/// One tier as the page shows it: the published release, how far its
/// hosts are at each step, and the controls that apply now.
#[allow(clippy::too_many_arguments)]
fn tier_view(
    release: &Release,
    settings: &FeedSettings,
    consul: &str,
    tier: &str,
    pair: Option<&KvPair>,
    freeze: Option<&Freeze>,
    reports: &[HostRecord],
    now: u64,
) -> TierView {
    let cli = cli_prefix(consul, &settings.app, Some(tier));
    let (current, problem) = read_published(pair);
    let published_at = current
        .as_ref()
        .and_then(|c| c.raw.get("published_at"))
        .and_then(Value::as_u64);
    // The whole tier and each step's hosts are counted alike.
    let summarise = |hosts: &[HostRecord]| {
        view::summarise(
            &release.key,
            current.as_ref().map(|c| &c.manifest),
            pair.map(|p| p.modify_index),
            published_at,
            freeze.is_some(),
            hosts,
            settings.stale_after,
            now,
        )
    };
    let summary = summarise(reports);
    let stale = stale_hosts(&summary, reports, now);
    let percent = current
        .as_ref()
        .and_then(|c| c.manifest.percent)
        .unwrap_or(100.0);
    let (produced_by, mut actions, steps) = match &current {
        Some(c) => (
            produced_by(&cli, c),
            release_actions(release, c, percent, &cli),
            step_views(&c.manifest, percent, reports, summarise),
        ),
        None => (Vec::new(), Actions::default(), Vec::new()),
    };
    let live = current.as_ref().map(|c| c.manifest.spec.build.clone());
    add_freeze_control(&mut actions, settings, consul, freeze, percent, live);
    TierView {
        tier: tier.to_string(),
        key: release.key.clone(),
        modify_index: pair.map_or(0, |p| p.modify_index),
        build: current.as_ref().map(|c| c.manifest.spec.build.clone()),
        previous: current
            .as_ref()
            .and_then(|c| c.manifest.previous.as_ref().map(|p| p.build.clone())),
        percent,
        published_at,
        rolled_back_from: current
            .as_ref()
            .and_then(|c| c.raw.get("rolled_back_from"))
            .and_then(Value::as_str)
            .map(str::to_string),
        problem,
        produced_by,
        summary,
        steps,
        stale,
        actions,
    }
}

/// The tier key's value as a release, or why it cannot be used.
fn read_published(pair: Option<&KvPair>) -> (Option<Current>, Option<String>) {
    let Some(p) = pair else {
        return (None, Some("nothing is published for this tier".into()));
    };
    match Manifest::parse(&p.value, UrlPolicy { allow_file: true }) {
        Ok(manifest) => {
            let raw = match serde_json::from_slice(&p.value) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            };
            let current = Current {
                raw,
                manifest,
                modify_index: p.modify_index,
            };
            (Some(current), None)
        }
        Err(e) => (
            None,
            Some(format!(
                "the published manifest does not parse ({e}); fix it with `release publish`"
            )),
        ),
    }
}

/// The hosts `summary` counts as stale, with how long each has been silent.
fn stale_hosts(summary: &FleetSummary, reports: &[HostRecord], now: u64) -> Vec<StaleHost> {
    let by_host: std::collections::HashMap<&str, &HostRecord> =
        reports.iter().map(|r| (r.host.as_str(), r)).collect();
    summary
        .stale
        .iter()
        .filter_map(|h| by_host.get(h.as_str()).copied())
        .map(|r| StaleHost {
            host: r.host.clone(),
            silent_secs: now.saturating_sub(r.updated_at),
            build: r.build.clone(),
            phase: r.phase.as_str(),
        })
        .collect()
}

/// The release commands that wrote the tier's current value.
fn produced_by(cli: &str, c: &Current) -> Vec<String> {
    if c.raw
        .get("rolled_back_from")
        .and_then(Value::as_str)
        .is_some()
    {
        return vec![format!("{cli} rollback")];
    }
    let m = &c.manifest;
    let s = &m.spec;
    let mut commands = vec![format!(
        "{cli} publish --build {} --url {} --sha256 {} --size {} --format {}",
        quote(&s.build),
        quote(s.urls.first().map(String::as_str).unwrap_or("")),
        s.sha256,
        s.size,
        s.format.as_str()
    )];
    if let Some(p) = m.percent {
        commands.push(format!("{cli} promote --percent {}", fmt_percent(p)));
    }
    commands
}

/// Promote (to the next step) and rollback, each planned by the CLI's own
/// `promoted` / `rolled_back`, or the reason it is not offered.
fn release_actions(release: &Release, c: &Current, percent: f64, cli: &str) -> Actions {
    let m = &c.manifest;
    let mut actions = Actions::default();
    match next_step(percent) {
        Some(next) => match release.promoted(c, next) {
            Ok(_) => {
                actions.promote = Some(Planned {
                    key: release.key.clone(),
                    expected_index: c.modify_index,
                    percent: Some(next),
                    build: Some(m.spec.build.clone()),
                    cli: format!("{cli} promote --percent {}", fmt_percent(next)),
                })
            }
            Err(e) => actions.unavailable.push(format!("promote: {e}")),
        },
        None => actions
            .unavailable
            .push("promote: the rollout is at 100%".into()),
    }
    match release.rolled_back(c) {
        Ok(_) => {
            actions.rollback = Some(Planned {
                key: release.key.clone(),
                expected_index: c.modify_index,
                percent: Some(100.0),
                build: m.previous.as_ref().map(|p| p.build.clone()),
                cli: format!("{cli} rollback"),
            })
        }
        Err(e) => actions.unavailable.push(format!("rollback: {e}")),
    }
    actions
}

/// Every rollout step (and the current percentage, when it is between
/// steps) with the hosts whose bucket under this build's salt falls below
/// it, counted by `summarise`.
fn step_views(
    m: &Manifest,
    percent: f64,
    reports: &[HostRecord],
    summarise: impl Fn(&[HostRecord]) -> FleetSummary,
) -> Vec<StepView> {
    let salt = crate::fleet::salt(m);
    let buckets: Vec<(f64, &HostRecord)> = reports
        .iter()
        .map(|r| (crate::fleet::bucket(salt, &r.host), r))
        .collect();
    let mut marks: Vec<f64> = STEPS.to_vec();
    if !marks.contains(&percent) {
        marks.push(percent);
        marks.sort_by(f64::total_cmp);
    }
    marks
        .into_iter()
        .map(|s| {
            let subset: Vec<HostRecord> = buckets
                .iter()
                .filter(|(b, _)| *b < s)
                .map(|(_, r)| (*r).clone())
                .collect();
            let sum = summarise(&subset);
            let reached = s <= percent;
            StepView {
                percent: s,
                hosts: subset.len(),
                converged: if reached {
                    sum.converged
                } else {
                    sum.on_target
                },
                reached,
            }
        })
        .collect()
}

/// Freeze when the app is not frozen, unfreeze (at the freeze key's
/// index) when it is.
fn add_freeze_control(
    actions: &mut Actions,
    settings: &FeedSettings,
    consul: &str,
    freeze: Option<&Freeze>,
    percent: f64,
    live: Option<String>,
) {
    let cli = cli_prefix(consul, &settings.app, None);
    match freeze {
        None => {
            actions.freeze = Some(Planned {
                key: settings.freeze_key.clone(),
                expected_index: 0,
                percent: Some(percent),
                build: live,
                cli: format!("{cli} freeze --reason REASON"),
            })
        }
        Some(f) => {
            actions.unfreeze = Some(Planned {
                key: settings.freeze_key.clone(),
                expected_index: f.modify_index,
                percent: Some(percent),
                build: live,
                cli: format!("{cli} unfreeze"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::ConsulSettings;

    fn settings(report_prefix: &str) -> FeedSettings {
        FeedSettings {
            app: "web".into(),
            tier: None,
            freeze_key: crate::fleet::freeze_key("web"),
            report_prefix: report_prefix.into(),
            stale_after: Duration::from_secs(120),
            min_interval: Duration::from_secs(1),
        }
    }

    fn release() -> Release {
        Release {
            client: ConsulClient::new(&ConsulSettings::default()).unwrap(),
            key: crate::fleet::tier_key("web", ""),
            freeze_key: crate::fleet::freeze_key("web"),
        }
    }

    fn pair(key: &str, value: Value, index: u64) -> KvPair {
        KvPair {
            key: key.into(),
            value: serde_json::to_vec(&value).unwrap(),
            modify_index: index,
            create_index: index,
            flags: 0,
        }
    }

    fn report(host: &str, build: &str, seen: u64, phase: &str) -> Value {
        serde_json::json!({"host": host, "tier": "production", "build": build, "desired": build,
            "seen_index": seen, "phase": phase, "outcome": null, "error": null, "bucket": null,
            "frozen": false, "started_at": null, "finished_at": null, "updated_at": 1000,
            "agent_version": "t"})
    }

    #[test]
    fn one_prefix_when_reports_live_under_the_control_keys_two_when_not() {
        let today = settings(&crate::fleet::report_prefix("web"));
        let control = today.control_prefix();
        if today.report_prefix.starts_with(&control) {
            assert_eq!(today.prefixes(), vec![control.clone()]);
        }
        // Issue 11 moves reports out of the control subtree.
        let moved = settings("deploy-hosts/web/");
        assert_eq!(
            moved.prefixes(),
            vec!["deploy-hosts/web/".to_string(), control]
        );
    }

    #[test]
    fn snapshot_classifies_keys_and_plans_the_next_step() {
        for prefix in [
            crate::fleet::report_prefix("web"),
            "deploy-hosts/web/".into(),
        ] {
            let s = settings(&prefix);
            let spec = |b: &str| {
                serde_json::json!({"build": b, "url": "http://h/a.tar.gz",
                    "sha256": "ab".repeat(32), "size": 1, "format": "tar.gz"})
            };
            let mut m = spec("b2");
            m["percent"] = serde_json::json!(10);
            m["previous"] = spec("b1");
            m["published_at"] = serde_json::json!(900);
            let pairs = [
                pair(&crate::fleet::tier_key("web", "production"), m, 50),
                pair(&format!("{prefix}h1"), report("h1", "b2", 50, "done"), 51),
                pair(&format!("{prefix}h2"), report("h2", "b1", 40, "idle"), 41),
            ];
            let refs: Vec<&KvPair> = pairs.iter().collect();
            let snap = snapshot(&release(), &s, &refs, None, 2000);
            assert_eq!(snap.tiers.len(), 1, "{prefix}");
            let t = &snap.tiers[0];
            assert_eq!((t.build.as_deref(), t.percent), (Some("b2"), 10.0));
            assert_eq!(t.summary.hosts, 2);
            let p = t.actions.promote.as_ref().unwrap();
            assert_eq!((p.percent, p.expected_index), (Some(25.0), 50));
            assert!(
                p.cli.ends_with("--tier production promote --percent 25"),
                "{}",
                p.cli
            );
            assert_eq!(
                t.actions.rollback.as_ref().unwrap().build.as_deref(),
                Some("b1")
            );
            assert!(t.actions.freeze.is_some() && t.actions.unfreeze.is_none());
            // h2 never acknowledged index 50, published long ago: stale.
            assert_eq!(t.stale.len(), 1);
            assert_eq!(t.stale[0].host, "h2");
            assert_eq!(t.stale[0].silent_secs, 1000);
            let states: Vec<_> = snap.hosts.iter().map(|h| h.state).collect();
            assert_eq!(states, vec![HostState::Converged, HostState::Stale]);
            assert_eq!(
                serde_json::to_value(&snap.hosts[0]).unwrap()[0],
                serde_json::json!("h1")
            );
        }
    }

    #[test]
    fn steps_and_quoting() {
        assert_eq!(next_step(0.0), Some(2.0));
        assert_eq!(next_step(10.0), Some(25.0));
        assert_eq!(next_step(33.0), Some(50.0));
        assert_eq!(next_step(100.0), None);
        assert_eq!(quote("b-1.2"), "b-1.2");
        assert_eq!(quote("it's bad"), r"'it'\''s bad'");
    }
}
