//! Human-readable rendering of status and history for the CLI: a compact
//! table with a progress bar, colour (ANSI, written by hand) only when the
//! caller says the output is a terminal. Pure functions of their inputs;
//! nothing is written anywhere, so there is nothing to lose on a crash.

use crate::clock::duration;
use std::fmt::Write as _;

use super::model::{
    ConsulInfo, DesiredBuild, DrainHolder, FleetInfo, HistoryEntry, HistoryKind, HoldState,
    LastError, Outcome, Phase, SlotInfo, StatusReport,
};

const RED: &str = "31";
const GREEN: &str = "32";
const YELLOW: &str = "33";
const BOLD: &str = "1";
const DIM: &str = "2";

/// Wraps text in an ANSI colour when enabled.
#[derive(Debug, Clone, Copy)]
struct Paint(bool);

impl Paint {
    fn paint(self, code: &str, s: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }
}

/// Renders a status report as a table. `now_unix` anchors the "ago" times.
pub fn render_status(r: &StatusReport, color: bool, now_unix: u64) -> String {
    let p = Paint(color);
    let mut o = String::new();
    // Writing to a String cannot fail; the `let _` below are for that.
    let _ = writeln!(
        o,
        "{} {}, up {}",
        p.paint(BOLD, "deploy-agent"),
        r.version,
        duration(r.uptime_seconds)
    );
    for (label, slot) in [("hot", &r.hot), ("cold", &r.cold)] {
        let _ = writeln!(o, "{}", slot_line(label, slot.as_ref(), now_unix));
    }
    if let Some(d) = &r.desired {
        let _ = writeln!(o, "{}", desired_line(d));
    }
    let _ = writeln!(o, "{:<9} {}", "state", state_line(&r.state, now_unix, p));
    let _ = writeln!(o, "{}", phase_line(r, now_unix, p));
    if let Some(pr) = &r.progress {
        let _ = writeln!(o, "{:<9} {}", "progress", progress_line(pr));
    }
    write_drain(&mut o, &r.drain_holders);
    if let Some(c) = &r.consul {
        let _ = writeln!(o, "{}", consul_line(c, p));
    }
    write_hold(&mut o, &r.hold, now_unix, p);
    if let Some(f) = &r.fleet {
        write_fleet(&mut o, f, p);
    }
    if let Some(e) = &r.last_error {
        let _ = writeln!(o, "{}", last_error_line(e, now_unix, p));
    }
    o
}

/// One slot: its directory and build (or what a failed deploy left in it),
/// with the build's sha256 and when it was marked ready.
fn slot_line(label: &str, slot: Option<&SlotInfo>, now_unix: u64) -> String {
    let Some(s) = slot else {
        return format!("{label:<9} (unknown)");
    };
    let leftovers = s.unmarked_bytes.map(|n| {
        format!(
            "(no build: {} left by a failed deploy, cleared by the next)",
            bytes(n)
        )
    });
    let build = s
        .build
        .as_deref()
        .or(leftovers.as_deref())
        .unwrap_or("(empty)");
    let mut line = format!("{label:<9} {}  {build}", s.name);
    if let Some(sha) = &s.sha256 {
        let _ = write!(line, "  sha256 {}", short_sha(sha));
    }
    if let Some(t) = s.marked_unix {
        let _ = write!(line, "  marked {}", ago(now_unix, t));
    }
    if let Some(c) = &s.integrity {
        let _ = write!(line, "\n{:<9} {}", "", integrity_text(c, now_unix));
    }
    line
}

/// A slot's last check against its record, under its line.
fn integrity_text(c: &crate::integrity::SlotCheck, now_unix: u64) -> String {
    use crate::integrity::SlotVerdict as V;
    let when = ago(now_unix, c.checked_unix);
    match &c.verdict {
        V::Intact { mechanism, .. } => {
            format!("intact (files {}), checked {when}", mechanism.as_str())
        }
        V::Unrecorded => format!("no record (built before records), checked {when}"),
        V::Drifted { drift, .. } => format!(
            "CHANGED SINCE DEPLOY ({} {}): {}; checked {when}",
            drift.count(),
            if drift.count() == 1 { "path" } else { "paths" },
            drift.summary()
        ),
        V::Unprovable { reason } => format!("CANNOT BE PROVEN INTACT: {reason}; checked {when}"),
    }
}

/// The build the source names, and which source.
fn desired_line(d: &DesiredBuild) -> String {
    let kind = match d.source.kind {
        super::model::SourceKind::Consul => "consul",
        super::model::SourceKind::File => "file",
    };
    let mut line = format!(
        "{:<9} {}  from {kind} {}",
        "desired", d.build, d.source.location
    );
    if let Some(i) = d.modify_index {
        let _ = write!(line, " (index {i})");
    }
    line
}

/// The deploy phase, coloured by outcome, and how long it has lasted.
fn phase_line(r: &StatusReport, now_unix: u64, p: Paint) -> String {
    let phase = match r.phase {
        Phase::Failed => p.paint(RED, r.phase.as_str()),
        Phase::Done | Phase::Idle => p.paint(GREEN, r.phase.as_str()),
        _ => p.paint(BOLD, r.phase.as_str()),
    };
    let line = match r.phase_since_unix {
        Some(t) => format!(
            "{:<9} {phase} for {}",
            "phase",
            duration(now_unix.saturating_sub(t))
        ),
        None => format!("{:<9} {phase}", "phase"),
    };
    // The one phase in which nothing visibly happens on purpose.
    if r.phase == Phase::Splay {
        return format!("{line} (a random wait before the download, so the tier's hosts do not all fetch at once; [fleet] splay-max)");
    }
    line
}

/// The processes a drain waits on, one a line; nothing when none.
fn write_drain(o: &mut String, holders: &[DrainHolder]) {
    if holders.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "{:<9} waiting on {} process(es):",
        "drain",
        holders.len()
    );
    for h in holders {
        let _ = writeln!(
            o,
            "{:<9}   pid {:<7} {:<16} {}",
            "", h.pid, h.command, h.how
        );
    }
}

/// The Consul watch: address, key, index, last contact, and its errors in
/// red while they last.
fn consul_line(c: &ConsulInfo, p: Paint) -> String {
    let mut line = format!("{:<9} {} key {}", "consul", c.address, c.key);
    if let Some(i) = c.last_index {
        let _ = write!(line, "  index {i}");
    }
    if let Some(ms) = c.last_contact_ms {
        let _ = write!(line, "  contact {ms}ms ago");
    }
    if c.consecutive_errors > 0 {
        let errs = format!("  {} consecutive errors", c.consecutive_errors);
        line.push_str(&p.paint(RED, &errs));
        if let Some(e) = &c.last_error {
            let _ = write!(line, "\n{:<9} {}", "", p.paint(RED, &e.message));
        }
    }
    line
}

/// The operator hold: who, since when and why, and how to lift it.
fn write_hold(o: &mut String, hold: &HoldState, now_unix: u64, p: Paint) {
    if !hold.held {
        let _ = writeln!(o, "{:<9} not held", "hold");
        return;
    }
    let mut line = String::from("HELD");
    if let Some(t) = hold.since_unix {
        let _ = write!(line, " since {}", ago(now_unix, t));
    }
    if let Some(uid) = hold.by_uid {
        let _ = write!(line, " by uid {uid}");
    }
    if let Some(reason) = &hold.reason {
        let _ = write!(line, ": {reason}");
    }
    let _ = writeln!(o, "{:<9} {}", "hold", p.paint(YELLOW, &line));
    let _ = writeln!(
        o,
        "{:<9} {}",
        "",
        p.paint(DIM, "resume with: deploy-agent resume")
    );
}

/// This host's rollout decision, and the fleet-wide freeze if set.
fn write_fleet(o: &mut String, f: &FleetInfo, p: Paint) {
    let _ = writeln!(o, "{:<9} {}", "fleet", member_line(f));
    if f.frozen {
        let line = format!(
            "FROZEN fleet-wide ({})",
            f.freeze_key.as_deref().unwrap_or("-")
        );
        let _ = writeln!(o, "{:<9} {}", "", p.paint(YELLOW, &line));
    }
}

/// The last error: in red while it is the state now, dimmed once resolved.
fn last_error_line(e: &LastError, now_unix: u64, p: Paint) -> String {
    let line = format!("{} ({})", e.message, ago(now_unix, e.at_unix));
    if e.current {
        format!("{:<9} {}", "error", p.paint(RED, &line))
    } else {
        // Resolved since: shown for the record, not as the state now.
        format!(
            "{:<9} {}",
            "last err",
            p.paint(DIM, &format!("{line}, resolved since"))
        )
    }
}

/// The agent state in one line: what it does, or why it does not deploy.
fn state_line(state: &super::model::AgentState, now_unix: u64, p: Paint) -> String {
    use super::model::AgentState as S;
    match state {
        S::Idle => p.paint(GREEN, "idle"),
        S::Deploying { build, phase } => p.paint(BOLD, &format!("deploying {build} ({phase})")),
        S::RetryWait {
            build,
            at_unix,
            attempt,
        } => p.paint(
            RED,
            &format!(
                "retry-wait: {build} failed {attempt} time(s), next try in {}",
                duration(at_unix.saturating_sub(now_unix))
            ),
        ),
        S::Held {
            reason,
            since_unix,
            pinned,
            ..
        } => {
            let mut line = format!("held {}: {reason}", ago(now_unix, *since_unix));
            if let Some(b) = pinned {
                let _ = write!(line, " (pinned to {b})");
            }
            p.paint(YELLOW, &line)
        }
        S::Frozen { since_unix } => p.paint(
            YELLOW,
            &format!(
                "frozen {}: the commander froze the fleet (release unfreeze lifts it)",
                ago(now_unix, *since_unix)
            ),
        ),
    }
}

/// `[#####-----]  48%  12.0 MiB / 25.0 MiB  3.1 MiB/s  ETA 4s  1200 entries`
pub fn progress_line(pr: &super::model::ProgressInfo) -> String {
    let mut line = String::new();
    match pr.bytes_total.filter(|t| *t > 0) {
        Some(total) => {
            let pct = (pr.bytes_done.min(total) as f64 / total as f64 * 100.0).floor() as u64;
            let _ = write!(
                line,
                "{} {pct:>3}%  {} / {}",
                bar(pr.bytes_done, total, 24),
                bytes(pr.bytes_done),
                bytes(total)
            );
        }
        None => line.push_str(&bytes(pr.bytes_done)),
    }
    if let Some(rate) = pr.rate_bytes_per_sec {
        let _ = write!(line, "  {}/s", bytes(rate));
    }
    if let Some(eta) = pr.eta_seconds {
        let _ = write!(line, "  ETA {}", duration(eta));
    }
    if let Some(n) = pr.entries {
        let _ = write!(line, "  {n} entries");
    }
    line
}

/// A `width`-cell bar of `#` and `-`.
pub fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done.min(total) as u128 * width as u128) / total as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Renders history entries, newest first, one line each.
pub fn render_history(h: &[HistoryEntry], color: bool, now_unix: u64) -> String {
    let p = Paint(color);
    let mut o = String::new();
    if h.is_empty() {
        o.push_str("no deploys yet\n");
        return o;
    }
    let _ = writeln!(
        o,
        "{:<14} {:<28} {:<12} {:>9}  phases",
        "started", "build", "outcome", "took"
    );
    for e in h {
        if e.kind != HistoryKind::Deploy {
            // An operator action: who did what, and why.
            let what = match e.kind {
                HistoryKind::Hold => "hold",
                HistoryKind::Resume => "resume",
                HistoryKind::Rollback => "rollback",
                HistoryKind::Redeploy => "redeploy",
                HistoryKind::Deploy => "deploy",
            };
            let mut line = format!(
                "{:<14} {:<28} {}",
                ago(now_unix, e.started_unix),
                e.build,
                p.paint(YELLOW, &format!("operator {what}"))
            );
            if let Some(uid) = e.by_uid {
                let _ = write!(line, " by uid {uid}");
            }
            if let Some(r) = &e.reason {
                let _ = write!(line, ": {r}");
            }
            let _ = writeln!(o, "{line}");
            continue;
        }
        let outcome = match e.outcome {
            Some(Outcome::Success) => p.paint(GREEN, "success"),
            Some(Outcome::Failed) => p.paint(RED, "failed"),
            Some(Outcome::Cancelled) => p.paint(YELLOW, "cancelled"),
            Some(Outcome::RolledBack) => p.paint(YELLOW, "rolled-back"),
            Some(Outcome::HealthFailed) => p.paint(RED, "health-failed"),
            None => p.paint(BOLD, "running"),
        };
        // Pad by the visible width: escape codes take no columns.
        let pad = 12usize.saturating_sub(e.outcome.map_or("running".len(), |o| o.as_str().len()));
        let took = e
            .finished_unix
            .map(|f| duration(f.saturating_sub(e.started_unix)))
            .unwrap_or_else(|| "-".into());
        let mut phases = e
            .phase_ms
            .iter()
            .map(|(k, ms)| format!("{} {}", k.as_str(), millis(*ms)))
            .collect::<Vec<_>>()
            .join(", ");
        if e.from_delta {
            phases.insert_str(0, "(delta) ");
        }
        let _ = writeln!(
            o,
            "{:<14} {:<28} {outcome}{} {took:>9}  {phases}",
            ago(now_unix, e.started_unix),
            e.build,
            " ".repeat(pad)
        );
        if let Some(err) = &e.error {
            let _ = writeln!(o, "{:<14} {}", "", p.paint(RED, err));
        }
        if let Some(note) = &e.integrity {
            let _ = writeln!(o, "{:<14} {note}", "");
        }
    }
    o
}

/// `512 B`, `12.0 KiB`, `3.4 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        duration(ms / 1000)
    }
}

fn ago(now: u64, then: u64) -> String {
    if then > now {
        return "just now".into();
    }
    format!("{} ago", duration(now - then))
}

fn short_sha(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// One line about this host's rollout decision, for `status`.
pub fn member_line(f: &super::model::FleetInfo) -> String {
    let mut s = format!("host {}", f.host_id);
    if let Some(t) = &f.tier {
        let _ = write!(s, " tier {t}");
    }
    if let Some(b) = f.bucket {
        let _ = write!(s, "  bucket {b:.3}");
    }
    match (f.percent, f.choice.as_deref()) {
        (Some(p), Some(c)) => {
            let _ = write!(s, " vs {p}% -> {c}");
        }
        (None, Some(c)) => {
            let _ = write!(s, " -> {c}");
        }
        _ => {}
    }
    if let Some(b) = &f.decided_build {
        let _ = write!(s, " ({b})");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::model::*;

    #[test]
    fn formats_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(25 * 1024 * 1024), "25.0 MiB");
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(245), "4m05s");
        assert_eq!(duration(3 * 3600 + 720), "3h12m");
        assert_eq!(bar(5, 10, 10), "[#####-----]");
        assert_eq!(bar(20, 10, 4), "[####]");
        assert_eq!(bar(1, 0, 4), "[----]");
    }

    #[test]
    fn colour_only_when_asked() {
        let mut r = StatusReport::new(10);
        r.phase = Phase::Failed;
        r.last_error = Some(LastError {
            message: "checksum mismatch".into(),
            at_unix: 100,
            current: true,
            ..LastError::default()
        });
        r.hold = HoldState {
            held: true,
            reason: Some("db migration".into()),
            since_unix: Some(40),
            by_uid: Some(1000),
        };
        let plain = render_status(&r, false, 160);
        assert!(!plain.contains('\x1b'), "{plain}");
        assert!(
            plain.contains("HELD since 2m00s ago by uid 1000: db migration"),
            "{plain}"
        );
        assert!(plain.contains("checksum mismatch (1m00s ago)"), "{plain}");
        let coloured = render_status(&r, true, 160);
        assert!(coloured.contains("\x1b[31mchecksum mismatch"), "{coloured}");
        assert!(coloured.contains("\x1b[33mHELD"), "{coloured}");
    }

    #[test]
    fn progress_line_shows_bytes_rate_eta() {
        let pr = ProgressInfo {
            bytes_done: 12 * 1024 * 1024,
            bytes_total: Some(24 * 1024 * 1024),
            rate_bytes_per_sec: Some(3 * 1024 * 1024),
            eta_seconds: Some(4),
            entries: None,
        };
        assert_eq!(
            progress_line(&pr),
            "[############------------]  50%  12.0 MiB / 24.0 MiB  3.0 MiB/s  ETA 4s"
        );
    }
}
