//! The `test-child` program: the child processes of the integration tests
//! (`deploy_agent_tests::children`). A test target without the harness, so
//! Cargo and nextest build it with the tests; run as `test-child <mode>
//! [args...]`. A failure panics, which exits 101. Run by a test runner
//! (no mode, or libtest's `--list` and friends) it lists no tests and does
//! nothing.

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(mode) = args.next().filter(|m| !m.starts_with('-')) else {
        return;
    };
    let rest: Vec<String> = args.collect();
    deploy_agent_tests::children::run(&mode, &rest);
}
