//! The demo (the README's first command, `cargo run --release -p testkit --bin demo`) runs end to end: two
//! deploys and a rollback from the cold slot, with the real agent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use deploy_agent::deploy::Outcome;
use deploy_agent::manifest::Format;
use testkit::buildgen::BuildProfile;
use testkit::demo::{run, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_deploys_twice_and_rolls_back() {
    let tmp = deploy_agent_tests::fast_tempdir();
    let mut out = Vec::new();
    let records = run(
        DemoOptions {
            dir: Some(tmp.path().to_path_buf()),
            profile: BuildProfile::TINY,
            format: Format::TarGz,
        },
        &mut out,
    )
    .await
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    let outcomes: Vec<_> = records.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            Some(Outcome::Success),
            Some(Outcome::Success),
            Some(Outcome::RolledBack)
        ],
        "{text}"
    );
    assert!(text.contains("demo complete"), "{text}");
    // Build 2 went out as a delta from build 1.
    assert!(records[1].from_delta, "{text}");
    assert!(text.contains("from the delta"), "{text}");
    assert!(text.contains("deploy-agent status --socket"), "{text}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("srv/app/current/BUILD")).unwrap(),
        "2026.11.26-1"
    );
}
