//! A small hand-written Prometheus registry for the agent's own metrics.
//!
//! The daemon updates it on its hot paths with relaxed atomics (no locks
//! except for the rarely-changing build info), and `GET /metrics` renders it
//! in the text exposition format 0.0.4. In memory only: counters restart
//! from zero with the process, which Prometheus' `rate()` handles.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::model::{Outcome, Phase};

/// Upper bounds (seconds) of the phase duration histogram buckets: phases
/// run from milliseconds (flipping) to many minutes (draining long
/// requests, downloading large builds on a slow link).
pub const PHASE_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Kinds of Consul request failures, for `deploy_agent_consul_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsulErrorKind {
    /// TCP connect failed or was refused.
    Connect,
    /// The request (beyond the blocking wait) timed out.
    Timeout,
    /// Consul answered with a non-success HTTP status.
    Status,
    /// The answer could not be decoded.
    Decode,
    /// Anything else.
    Other,
}

impl ConsulErrorKind {
    const ALL: [ConsulErrorKind; 5] = [
        ConsulErrorKind::Connect,
        ConsulErrorKind::Timeout,
        ConsulErrorKind::Status,
        ConsulErrorKind::Decode,
        ConsulErrorKind::Other,
    ];

    fn as_str(self) -> &'static str {
        match self {
            ConsulErrorKind::Connect => "connect",
            ConsulErrorKind::Timeout => "timeout",
            ConsulErrorKind::Status => "status",
            ConsulErrorKind::Decode => "decode",
            ConsulErrorKind::Other => "other",
        }
    }
}

/// A fixed-bucket histogram; the sum is kept in microseconds so it fits an
/// atomic integer.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; PHASE_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // Buckets are stored non-cumulatively and summed when rendering, so
        // an observation touches one bucket only.
        if let Some(i) = PHASE_BUCKETS.iter().position(|&le| secs <= le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// The agent's metrics. Share it as `Arc<Metrics>`; every method takes
/// `&self`.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    deploys: [AtomicU64; Outcome::ALL.len()],
    phases: [Histogram; Phase::ALL.len()],
    bytes_downloaded: AtomicU64,
    cache_hits: AtomicU64,
    health_rollbacks: AtomicU64,
    consul_requests: AtomicU64,
    consul_errors: [AtomicU64; ConsulErrorKind::ALL.len()],
    held: AtomicBool,
    /// Paths of the hot and cold slots that differ from their records, as
    /// of their last check (issue 20).
    slot_changed: [AtomicU64; 2],
    /// (build, slot) currently served; changes once per deploy.
    build: Mutex<Option<(String, String)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry; uptime counts from now.
    pub fn new() -> Self {
        Metrics {
            started: Instant::now(),
            deploys: Default::default(),
            phases: Default::default(),
            bytes_downloaded: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            health_rollbacks: AtomicU64::new(0),
            consul_requests: AtomicU64::new(0),
            consul_errors: Default::default(),
            held: AtomicBool::new(false),
            slot_changed: Default::default(),
            build: Mutex::new(None),
        }
    }

    /// Counts a finished deploy.
    pub fn deploy_finished(&self, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.deploys[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a phase took.
    pub fn phase_finished(&self, phase: Phase, took: Duration) {
        let i = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        self.phases[i].observe(took);
    }

    /// Adds downloaded artifact bytes (not counting cache hits).
    pub fn add_bytes_downloaded(&self, n: u64) {
        self.bytes_downloaded.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts an artifact served from the local cache.
    pub fn cache_hit(&self) {
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a flip back after a failed health check.
    pub fn health_rollback(&self) {
        self.health_rollbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a Consul request (successful or not).
    pub fn consul_request(&self) {
        self.consul_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed Consul request.
    pub fn consul_error(&self, kind: ConsulErrorKind) {
        let i = ConsulErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(ConsulErrorKind::ALL.len() - 1);
        self.consul_errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the Consul counters to the watch loop's own totals (which are
    /// monotonic for the life of the process), so the loop keeps one set of
    /// counters and the registry only mirrors them at scrape time.
    pub fn sync_consul(&self, requests: u64, errors: &[(ConsulErrorKind, u64)]) {
        self.consul_requests.store(requests, Ordering::Relaxed);
        for (kind, n) in errors {
            let i = ConsulErrorKind::ALL
                .iter()
                .position(|k| k == kind)
                .unwrap_or(ConsulErrorKind::ALL.len() - 1);
            self.consul_errors[i].store(*n, Ordering::Relaxed);
        }
    }

    /// Sets the hold gauge.
    pub fn set_held(&self, held: bool) {
        self.held.store(held, Ordering::Relaxed);
    }

    /// Sets how many paths of the hot and the cold slot differ from their
    /// records (0 when intact, unchecked or unrecorded).
    pub fn set_slot_changed(&self, hot: u64, cold: u64) {
        self.slot_changed[0].store(hot, Ordering::Relaxed);
        self.slot_changed[1].store(cold, Ordering::Relaxed);
    }

    /// Sets the build served now (after a flip, a rollback, or at start).
    pub fn set_build(&self, build: &str, slot: &str) {
        // A poisoned lock only means a panic elsewhere while holding it; the
        // value is a plain pair and still fine to overwrite.
        let mut g = self.build.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some((build.to_owned(), slot.to_owned()));
    }

    /// Renders every metric in Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.render_into(&mut out);
        out
    }

    // Long on purpose: one block per metric, in /metrics order, so it reads as the exposition.
    fn render_into(&self, out: &mut String) {
        header(
            out,
            "deploy_agent_deploys_total",
            "counter",
            "Deploys finished, by outcome.",
        );
        for (o, c) in Outcome::ALL.iter().zip(&self.deploys) {
            sample(
                out,
                "deploy_agent_deploys_total",
                &[("outcome", o.as_str())],
                c.load(Ordering::Relaxed),
            );
        }

        let name = "deploy_agent_phase_duration_seconds";
        header(out, name, "histogram", "Time spent in each deploy phase.");
        for (p, h) in Phase::ALL.iter().zip(&self.phases) {
            let count = h.count.load(Ordering::Relaxed);
            if count == 0 {
                // Phases that never ran (idle, done...) would only add noise.
                continue;
            }
            let mut cumulative = 0u64;
            for (le, b) in PHASE_BUCKETS.iter().zip(&h.buckets) {
                cumulative += b.load(Ordering::Relaxed);
                let le = format_float(*le);
                sample(
                    out,
                    &format!("{name}_bucket"),
                    &[("phase", p.as_str()), ("le", &le)],
                    cumulative,
                );
            }
            sample(
                out,
                &format!("{name}_bucket"),
                &[("phase", p.as_str()), ("le", "+Inf")],
                count,
            );
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            sample_f(out, &format!("{name}_sum"), &[("phase", p.as_str())], sum);
            sample(
                out,
                &format!("{name}_count"),
                &[("phase", p.as_str())],
                count,
            );
        }

        let name = "deploy_agent_downloaded_bytes_total";
        header(out, name, "counter", "Artifact bytes downloaded.");
        sample(
            out,
            name,
            &[],
            self.bytes_downloaded.load(Ordering::Relaxed),
        );

        let name = "deploy_agent_artifact_cache_hits_total";
        header(
            out,
            name,
            "counter",
            "Artifacts found in the local cache instead of downloaded.",
        );
        sample(out, name, &[], self.cache_hits.load(Ordering::Relaxed));

        let name = "deploy_agent_health_rollbacks_total";
        header(
            out,
            name,
            "counter",
            "Automatic flips back after a build failed its health check.",
        );
        sample(
            out,
            name,
            &[],
            self.health_rollbacks.load(Ordering::Relaxed),
        );

        let name = "deploy_agent_consul_requests_total";
        header(out, name, "counter", "Requests sent to Consul.");
        sample(out, name, &[], self.consul_requests.load(Ordering::Relaxed));

        let name = "deploy_agent_consul_errors_total";
        header(out, name, "counter", "Failed Consul requests, by kind.");
        for (k, c) in ConsulErrorKind::ALL.iter().zip(&self.consul_errors) {
            sample(
                out,
                name,
                &[("kind", k.as_str())],
                c.load(Ordering::Relaxed),
            );
        }

        let name = "deploy_agent_build_info";
        header(out, name, "gauge", "The build currently served (always 1).");
        let build = self.build.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some((build, slot)) = build {
            sample(out, name, &[("build", &build), ("slot", &slot)], 1);
        }

        let name = "deploy_agent_held";
        header(out, name, "gauge", "1 while an operator holds deploys.");
        sample(out, name, &[], u64::from(self.held.load(Ordering::Relaxed)));

        let name = "deploy_agent_slot_changed_paths";
        header(
            out,
            name,
            "gauge",
            "Paths of a slot modified, added or missing since its deploy (last check).",
        );
        for (slot, n) in ["hot", "cold"].iter().zip(&self.slot_changed) {
            sample(out, name, &[("slot", slot)], n.load(Ordering::Relaxed));
        }

        let name = "deploy_agent_uptime_seconds";
        header(out, name, "gauge", "Seconds since the agent started.");
        sample_f(out, name, &[], self.started.elapsed().as_secs_f64());
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    write_labels(out, labels);
    let _ = writeln!(out, " {value}");
}

fn sample_f(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    write_labels(out, labels);
    let _ = writeln!(out, " {}", format_float(value));
}

fn write_labels(out: &mut String, labels: &[(&str, &str)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    out.push('}');
}

/// Label values escape backslash, double quote and newline (exposition
/// format 0.0.4); anything else is passed through.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text escapes backslash and newline only.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Floats as Prometheus expects: integers without a fraction still parse,
/// but `1.0` reads better than `1` for bucket bounds, and Rust's `Display`
/// never uses exponents for these magnitudes.
fn format_float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.is_nan() {
        "NaN".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the structure every exposition line must have: comments are
    /// HELP/TYPE, samples are `name{labels} value` with a parseable value
    /// and a declared metric family.
    fn assert_valid_exposition(text: &str) {
        let mut families = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                families.push(it.next().unwrap().to_owned());
                let kind = it.next().unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.starts_with('#'), "stray comment {line}");
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf",
                "bad value in {line}"
            );
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| families.iter().any(|x| x == f))
                .unwrap_or(name);
            assert!(families.iter().any(|f| f == family), "undeclared {name}");
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                }
            }
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn renders_valid_exposition_with_all_families() {
        let m = Metrics::new();
        m.deploy_finished(Outcome::Success);
        m.deploy_finished(Outcome::Success);
        m.deploy_finished(Outcome::RolledBack);
        m.phase_finished(Phase::Downloading, Duration::from_millis(700));
        m.phase_finished(Phase::Downloading, Duration::from_secs(4000));
        m.add_bytes_downloaded(1234);
        m.cache_hit();
        m.consul_request();
        m.consul_error(ConsulErrorKind::Timeout);
        m.set_held(true);
        m.set_build("web-1", "a");
        let text = m.render();
        assert_valid_exposition(&text);
        for want in [
            "deploy_agent_deploys_total{outcome=\"success\"} 2\n",
            "deploy_agent_deploys_total{outcome=\"rolled-back\"} 1\n",
            "deploy_agent_deploys_total{outcome=\"failed\"} 0\n",
            "deploy_agent_phase_duration_seconds_bucket{phase=\"downloading\",le=\"0.5\"} 0\n",
            "deploy_agent_phase_duration_seconds_bucket{phase=\"downloading\",le=\"1.0\"} 1\n",
            "deploy_agent_phase_duration_seconds_bucket{phase=\"downloading\",le=\"1800.0\"} 1\n",
            "deploy_agent_phase_duration_seconds_bucket{phase=\"downloading\",le=\"+Inf\"} 2\n",
            "deploy_agent_phase_duration_seconds_sum{phase=\"downloading\"} 4000.7\n",
            "deploy_agent_phase_duration_seconds_count{phase=\"downloading\"} 2\n",
            "deploy_agent_downloaded_bytes_total 1234\n",
            "deploy_agent_artifact_cache_hits_total 1\n",
            "deploy_agent_consul_requests_total 1\n",
            "deploy_agent_consul_errors_total{kind=\"timeout\"} 1\n",
            "deploy_agent_build_info{build=\"web-1\",slot=\"a\"} 1\n",
            "deploy_agent_held 1\n",
            "# TYPE deploy_agent_phase_duration_seconds histogram\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains("phase=\"idle\""),
            "unused phases are skipped"
        );
    }

    #[test]
    fn escapes_label_values() {
        let m = Metrics::new();
        m.set_build("we\"ird\\build\nx", "b");
        let text = m.render();
        assert!(
            text.contains(r#"deploy_agent_build_info{build="we\"ird\\build\nx",slot="b"} 1"#),
            "{text}"
        );
        assert_valid_exposition(&text);
    }

    #[test]
    fn no_build_info_sample_before_the_first_build() {
        let text = Metrics::new().render();
        assert!(text.contains("# TYPE deploy_agent_build_info gauge"));
        assert!(!text.contains("deploy_agent_build_info{"));
        assert_valid_exposition(&text);
    }
}
