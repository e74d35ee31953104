//! The package's inputs, checked without root or containers (the full
//! install is `tests/system/containers.rs`): the example config that becomes
//! /etc/deploy-agent/config.toml validates and covers every table, the
//! files `[package.metadata.deb]` names exist, the maintainer scripts are
//! executable, and the binary generates its man pages and completions and
//! names its commit and build date in `--version`. Read-only but for a
//! temp dir that is removed on drop: a crash midway leaves nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    deploy_agent_tests::repo_root()
}

#[test]
fn example_config_is_complete_and_valid() {
    let path = repo().join("systemd/config.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg = deploy_agent::config::Config::parse(&text, &path).unwrap();
    assert_eq!(cfg.deploy_root, Path::new("/srv/app"));
    for table in [
        "source", "consul", "download", "unpack", "drain", "hooks", "status", "health", "signing",
        "fleet",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == format!("[{table}]")),
            "the example config lacks [{table}]"
        );
    }
}

#[test]
fn package_inputs_exist() {
    let manifest = std::fs::read_to_string(repo().join("agent/Cargo.toml")).unwrap();
    assert!(manifest.contains("[package.metadata.deb]"));
    for f in [
        "LICENSE",
        "systemd/deploy-agent.service",
        "systemd/config.example.toml",
        "README.md",
    ] {
        assert!(repo().join(f).is_file(), "{f} missing");
        assert!(
            manifest.contains(&format!("\"../{f}\"")),
            "{f} not packaged"
        );
    }
    let license = std::fs::read_to_string(repo().join("LICENSE")).unwrap();
    assert!(license.contains("Apache License") && license.contains("Version 2.0"));
    for script in ["postinst", "prerm", "postrm", "build-deb.sh"] {
        let mode = std::fs::metadata(repo().join("debian").join(script))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "debian/{script} is not executable");
    }
    let postinst = std::fs::read_to_string(repo().join("debian/postinst")).unwrap();
    assert!(
        postinst.contains("check-config"),
        "postinst restarts unchecked"
    );
    assert!(!postinst.contains("enable --now deploy-agent.service"));
}

#[test]
fn version_and_generated_docs() {
    let bin = deploy_agent_tests::agent_bin();
    let out = Command::new(&bin).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.starts_with("deploy-agent ") && v.contains("commit ") && v.contains("built "),
        "{v}"
    );
    let dir = tempfile::tempdir().unwrap();
    for what in ["man", "completions"] {
        let st = Command::new(&bin)
            .args(["generate", what])
            .arg(dir.path().join(what))
            .status()
            .unwrap();
        assert!(st.success(), "generate {what}");
    }
    let man = std::fs::read_to_string(dir.path().join("man/deploy-agent.8")).unwrap();
    assert!(
        man.contains(".TH deploy-agent 8"),
        "{}",
        &man[..200.min(man.len())]
    );
    assert!(dir.path().join("man/deploy-agent-status.8").is_file());
    let bash = std::fs::read_to_string(dir.path().join("completions/deploy-agent.bash")).unwrap();
    assert!(bash.contains("check-config"));
    // Hidden: not in --help, so not in the man page either.
    assert!(!man.contains("generate"));
}
