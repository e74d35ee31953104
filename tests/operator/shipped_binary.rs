//! What ships is only the agent: the packaged `deploy-agent` (the agent
//! package's normal dependency tree, which `debian/build-deb.sh` builds)
//! contains no test server, build generator or test-only crate, and its CLI
//! has no demo.

use std::process::Command;

#[test]
fn the_packaged_build_depends_on_no_test_code() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "deploy-agent",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("deploy-agent v"), "{tree}");
    for test_only in [
        "testkit",
        "deploy-agent-tests",
        "tempfile",
        "proptest",
        "criterion",
    ] {
        assert!(
            !tree
                .lines()
                .any(|l| l.starts_with(&format!("{test_only} v"))),
            "{test_only} is in the shipped dependency tree:\n{tree}"
        );
    }
}

#[test]
fn the_shipped_cli_has_no_demo() {
    let out = Command::new(env!("CARGO_BIN_EXE_deploy-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("check-config"), "{help}");
    assert!(!help.contains("demo"), "{help}");
}
