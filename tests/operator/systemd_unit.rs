#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `systemd/deploy-agent.service`: systemd itself accepts it
//! (`systemd-analyze verify`, on a copy whose ExecStart points at a binary
//! that exists), and the hardening a reviewer expects is present and does
//! not lock the agent out of what it must do (read workers' /proc entries,
//! chown unpacked files, signal workers).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use deploy_agent_tests::{needs_program, precondition};

fn unit_path() -> PathBuf {
    deploy_agent_tests::repo_root().join("systemd/deploy-agent.service")
}

/// `section -> key -> values` (a key may repeat); comments and blank lines
/// dropped.
fn parse(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        out.entry(section.clone())
            .or_default()
            .entry(k.trim().to_owned())
            .or_default()
            .push(v.trim().to_owned());
    }
    out
}

#[test]
fn unit_has_the_expected_service_settings_and_hardening() {
    let text = std::fs::read_to_string(unit_path()).unwrap();
    let unit = parse(&text);
    let svc = &unit["Service"];
    let one = |k: &str| -> &str {
        let v = svc.get(k).unwrap_or_else(|| panic!("[Service] lacks {k}"));
        assert_eq!(v.len(), 1, "{k} set more than once");
        &v[0]
    };
    for (k, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        (
            "ExecStart",
            "/usr/bin/deploy-agent run --config /etc/deploy-agent/config.toml",
        ),
        // The shell's builtin kill: /bin/kill (procps) is absent on minimal
        // hosts; tests/system/containers.rs runs `systemctl reload` for real.
        ("ExecReload", r#"/bin/sh -c 'kill -HUP "$$MAINPID"'"#),
        ("Restart", "on-failure"),
        ("WatchdogSec", "30s"),
        ("RuntimeDirectory", "deploy-agent"),
        ("RuntimeDirectoryMode", "0750"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("SystemCallFilter", "@system-service"),
        ("UMask", "0027"),
    ] {
        assert_eq!(one(k), want, "{k}");
    }
    for k in [
        "RestartSec",
        "TimeoutStopSec",
        "LimitNOFILE",
        "ReadWritePaths",
    ] {
        assert!(!one(k).is_empty(), "{k}");
    }
    let stop: u64 = one("TimeoutStopSec").trim_end_matches('s').parse().unwrap();
    assert!(
        stop > 0 && stop <= 120,
        "TimeoutStopSec must be bounded: {stop}"
    );
    assert!(one("ReadWritePaths")
        .split_whitespace()
        .any(|p| p == "/srv/app"));

    // The capabilities the agent needs, and nothing broad.
    let caps: Vec<&str> = one("CapabilityBoundingSet").split_whitespace().collect();
    for need in [
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
        "CAP_KILL",
        "CAP_CHOWN",
        "CAP_FOWNER",
    ] {
        assert!(caps.contains(&need), "missing {need}: {caps:?}");
    }
    for never in [
        "CAP_SYS_ADMIN",
        "CAP_NET_ADMIN",
        "CAP_SETUID",
        "CAP_SYS_MODULE",
    ] {
        assert!(!caps.contains(&never), "{never} must not be kept");
    }
    // The drain scan must still see other users' /proc/<pid>/{fd,maps,cwd}.
    if let Some(p) = svc.get("ProtectProc") {
        assert!(
            p.iter().all(|v| v == "default"),
            "ProtectProc={p:?} hides workers"
        );
    }
    if let Some(p) = svc.get("ProcSubset") {
        assert!(p.iter().all(|v| v == "all"), "ProcSubset={p:?}");
    }
    for hiding in ["PrivatePIDs", "PrivateUsers", "DynamicUser"] {
        assert!(
            svc.get(hiding).is_none_or(|v| v.iter().all(|x| x == "no")),
            "{hiding} would cut the agent off from the workers"
        );
    }
    // Every directive in [Service] is explained by a comment somewhere
    // above it in its block (a blank line ends a block).
    let mut commented = false;
    let mut in_service = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            commented = false;
        } else if line.is_empty() {
            commented = false;
        } else if line.starts_with('#') {
            commented = true;
        } else if in_service {
            assert!(commented, "no comment explains {line}");
        }
    }
    assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"]);
    // Documentation= names what the package installs (debian/, agent/Cargo.toml).
    let docs = unit["Unit"]["Documentation"].join(" ");
    assert!(docs.contains("man:deploy-agent(8)"), "{docs}");
    assert!(
        docs.contains("file:///usr/share/doc/deploy-agent/README.md"),
        "{docs}"
    );
    // Nothing reads /var/lib or /var/cache: the state lives in the deploy root.
    for unused in ["StateDirectory", "CacheDirectory"] {
        assert!(svc.get(unused).is_none(), "{unused} is set but unused");
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    if !precondition(needs_program("systemd-analyze", "systemd")) {
        return;
    }
    let text = std::fs::read_to_string(unit_path()).unwrap();
    // verify refuses an ExecStart binary that does not exist; on a build
    // host /usr/bin/deploy-agent is not installed, so point a copy at
    // a binary that is: this very test executable.
    let me = std::env::current_exe().unwrap();
    let old = "ExecStart=/usr/bin/deploy-agent ";
    assert!(text.contains(old));
    let copy = text.replace(old, &format!("ExecStart={} ", me.display()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deploy-agent.service");
    std::fs::write(&path, copy).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("systemd-analyze verify:\n{all}");
    assert!(out.status.success(), "verify failed:\n{all}");
    // Unknown keys and bad values are only warnings (exit 0); treat any
    // complaint about our unit as a failure.
    let complaints: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("deploy-agent.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "verify complained:\n{}",
        complaints.join("\n")
    );
}
