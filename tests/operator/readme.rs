//! The README's examples stay true: its example config (the first toml
//! code block) parses. Every key the other docs name: tests/operator/surfaces.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;

#[test]
fn readme_example_config_parses() {
    let readme =
        std::fs::read_to_string(deploy_agent_tests::repo_root().join("README.md")).unwrap();
    let start = readme.find("```toml\n").expect("README has a toml example") + 8;
    let len = readme[start..].find("```").unwrap();
    let cfg =
        deploy_agent::config::Config::parse(&readme[start..start + len], Path::new("README.md"))
            .unwrap();
    assert_eq!(cfg.source.key.as_deref(), Some("deploy/app/production"));
    assert_eq!(cfg.hooks.post_flip.as_ref().map(Vec::len), Some(3));
}
