//! The fleet view (`deploy-agent fleet status`): reads every host report
//! under `deploy-hosts/<app>/` and the tier key, and summarises hosts per
//! build and per phase, the converged percentage, failed hosts and stale
//! hosts. Read-only: nothing here writes, so a crash changes nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::clock::now_secs;
use crate::consul::ConsulClient;
use crate::deploy::Phase;
use crate::error::Result;
use crate::fleet::commander::release::Release;
use crate::fleet::host::hostreport::HostRecord;

/// The summary `fleet status` prints.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FleetSummary {
    pub key: String,
    /// The tier key's current build and percentage.
    pub target: Option<String>,
    pub previous: Option<String>,
    pub percent: Option<f64>,
    pub modify_index: Option<u64>,
    pub frozen: bool,
    pub hosts: usize,
    pub per_build: BTreeMap<String, usize>,
    pub per_phase: BTreeMap<String, usize>,
    /// Hosts serving the build their rollout decision names, idle.
    pub converged: usize,
    pub converged_percent: f64,
    /// Hosts serving the tier's new build.
    pub on_target: usize,
    pub failed: Vec<FailedHost>,
    /// Hosts that have not acknowledged the current key for longer than
    /// the threshold.
    pub stale: Vec<String>,
    /// Hosts whose live slot differs from its record (a hot-patch, any
    /// write into it), with what their last check found (issue 20).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<ChangedHost>,
}

/// A host serving a build changed since its deploy.
#[derive(Debug, Clone, Serialize)]
pub struct ChangedHost {
    pub host: String,
    pub build: Option<String>,
    /// `modified <path>`, `added <path>`, `missing <path>`.
    pub paths: Vec<String>,
}

/// A host whose last deploy failed.
#[derive(Debug, Clone, Serialize)]
pub struct FailedHost {
    pub host: String,
    pub build: Option<String>,
    pub error: Option<String>,
}

/// Reads the reports of `tier` (all tiers when `None`) and summarises them.
pub async fn collect(
    client: &ConsulClient,
    release: &Release,
    prefix: &str,
    tier: Option<&str>,
    stale_after: Duration,
) -> Result<FleetSummary> {
    let shown = release.show().await?;
    let cur = release.read().await.ok().flatten();
    let pairs = client.list(prefix).await?;
    let reports: Vec<HostRecord> = pairs
        .iter()
        .filter_map(|p| serde_json::from_slice::<HostRecord>(&p.value).ok())
        .filter(|r| tier.is_none() || r.tier.as_deref() == tier)
        .collect();
    let published_at = shown
        .manifest
        .as_ref()
        .and_then(|m| m.get("published_at"))
        .and_then(serde_json::Value::as_u64);
    Ok(summarise(
        &release.key,
        cur.as_ref().map(|c| &c.manifest),
        shown.modify_index,
        published_at,
        shown.freeze.is_some(),
        &reports,
        stale_after,
        now_secs(),
    ))
}

/// The pure part of [`collect`].
#[allow(clippy::too_many_arguments)]
pub fn summarise(
    key: &str,
    manifest: Option<&crate::manifest::Manifest>,
    modify_index: Option<u64>,
    published_at: Option<u64>,
    frozen: bool,
    reports: &[HostRecord],
    stale_after: Duration,
    now: u64,
) -> FleetSummary {
    let mut s = FleetSummary {
        key: key.to_string(),
        target: manifest.map(|m| m.spec.build.clone()),
        previous: manifest.and_then(|m| m.previous.as_ref().map(|p| p.build.clone())),
        percent: manifest.and_then(|m| m.percent),
        modify_index,
        frozen,
        hosts: reports.len(),
        ..FleetSummary::default()
    };
    for r in reports {
        let build = r.build.clone().unwrap_or_else(|| "(none)".into());
        *s.per_build.entry(build).or_default() += 1;
        *s.per_phase.entry(r.phase.as_str().to_string()).or_default() += 1;
        let idle = matches!(r.phase, Phase::Idle | Phase::Done);
        let acked = modify_index.is_none_or(|i| r.seen_index >= i);
        if acked && idle && r.desired.is_some() && r.build == r.desired {
            s.converged += 1;
        }
        if r.build.is_some() && r.build == s.target {
            s.on_target += 1;
        }
        if r.phase == Phase::Failed {
            s.failed.push(FailedHost {
                host: r.host.clone(),
                build: r.desired.clone(),
                error: r.error.clone(),
            });
        }
        if !r.changed.is_empty() {
            s.changed.push(ChangedHost {
                host: r.host.clone(),
                build: r.build.clone(),
                paths: r.changed.clone(),
            });
        }
        // Reports are written on change only, so age alone means nothing:
        // a host is stale when it has not acknowledged the current key
        // for longer than the threshold.
        let since = published_at.unwrap_or(r.updated_at).max(r.updated_at);
        if !acked && now.saturating_sub(since) >= stale_after.as_secs() {
            s.stale.push(r.host.clone());
        }
    }
    if s.hosts > 0 {
        s.converged_percent = s.converged as f64 * 100.0 / s.hosts as f64;
    }
    s
}

/// Renders the summary for a terminal.
pub fn render(s: &FleetSummary) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "key       {} (index {})",
        s.key,
        s.modify_index.map_or("-".into(), |i| i.to_string())
    );
    let _ = writeln!(
        o,
        "release   {} at {}%{}{}",
        s.target.as_deref().unwrap_or("(nothing published)"),
        s.percent.unwrap_or(100.0),
        s.previous
            .as_deref()
            .map(|p| format!(", others on {p}"))
            .unwrap_or_default(),
        if s.frozen { "  FROZEN" } else { "" }
    );
    let _ = writeln!(
        o,
        "hosts     {}  converged {} ({:.1}%)  on {} {}",
        s.hosts,
        s.converged,
        s.converged_percent,
        s.target.as_deref().unwrap_or("-"),
        s.on_target
    );
    let _ = writeln!(o, "builds");
    for (b, n) in &s.per_build {
        let _ = writeln!(o, "  {b:<40} {n}");
    }
    let _ = writeln!(o, "phases");
    for (p, n) in &s.per_phase {
        let _ = writeln!(o, "  {p:<40} {n}");
    }
    if !s.failed.is_empty() {
        let _ = writeln!(o, "failed    {}", s.failed.len());
        for f in &s.failed {
            let _ = writeln!(
                o,
                "  {} ({}): {}",
                f.host,
                f.build.as_deref().unwrap_or("-"),
                f.error.as_deref().unwrap_or("-")
            );
        }
    }
    if !s.stale.is_empty() {
        let _ = writeln!(o, "stale     {}: {}", s.stale.len(), s.stale.join(" "));
    }
    if !s.changed.is_empty() {
        let _ = writeln!(
            o,
            "changed   {} (live build changed since its deploy)",
            s.changed.len()
        );
        for c in &s.changed {
            let build = c.build.as_deref().unwrap_or("-");
            let _ = writeln!(o, "  {} ({build}): {}", c.host, c.paths.join(", "));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::host::hostreport::HostRecord;

    /// A host whose live slot was changed since its deploy is listed with
    /// the paths its report names; the others are not.
    #[test]
    fn hosts_serving_a_changed_build_are_listed() {
        let host = |name: &str, changed: Vec<String>| HostRecord {
            desired: Some("b2".into()),
            phase: Phase::Done,
            changed,
            ..HostRecord::fresh(name, None, Some("b2".into()))
        };
        let reports = [
            host("web-1", vec!["modified app/f3.php".into()]),
            host("web-2", vec![]),
        ];
        let s = summarise(
            "k",
            None,
            None,
            None,
            false,
            &reports,
            Duration::from_secs(60),
            0,
        );
        assert_eq!(s.changed.len(), 1);
        let text = render(&s);
        assert!(
            text.contains("changed   1") && text.contains("web-1 (b2): modified app/f3.php"),
            "{text}"
        );
    }
}
