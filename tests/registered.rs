//! The test targets are registered where Cargo can see them: every file in
//! tests/ is a `[[test]]` of the agent package (agent/Cargo.toml lists them,
//! since they live outside its directory), and the binary the support
//! library runs is the one Cargo built for this test run.

use std::path::{Path, PathBuf};

#[test]
fn every_test_file_is_a_target_of_the_agent_package() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = std::fs::read_to_string(root.join("agent/Cargo.toml")).unwrap();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(root.join("tests")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".rs") {
            if !manifest.contains(&format!("path = \"../tests/{stem}.rs\"")) {
                missing.push(name);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "tests/ files that cargo would never build (add a [[test]] to agent/Cargo.toml): {missing:?}"
    );
}

#[test]
fn the_support_library_runs_the_binary_cargo_built() {
    let cargo = PathBuf::from(env!("CARGO_BIN_EXE_deploy-agent"));
    assert_eq!(
        deploy_agent_tests::agent_bin().canonicalize().unwrap(),
        cargo.canonicalize().unwrap()
    );
}
