//! The test targets are registered where Cargo can see them: every area
//! folder in tests/ is a `[[test]]` of the agent package (agent/Cargo.toml
//! lists them, since they live outside its directory), every file in an
//! area is a module of its `main.rs` (Cargo would silently never build one
//! that is not), and the binary the support library runs is the one Cargo
//! built for this test run. The README's test command is the one `.ci/run`
//! runs.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The area folders of tests/ (every folder with a `main.rs`).
fn areas() -> Vec<String> {
    let mut areas: Vec<String> = std::fs::read_dir(root().join("tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("main.rs").is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    areas.sort();
    areas
}

#[test]
fn every_area_is_a_target_and_every_file_a_module() {
    let manifest = std::fs::read_to_string(root().join("agent/Cargo.toml")).unwrap();
    let areas = areas();
    assert!(areas.len() >= 6, "areas: {areas:?}");
    let mut missing = Vec::new();
    for area in &areas {
        let entry = format!("name = \"{area}\"\npath = \"../tests/{area}/main.rs\"");
        if !manifest.contains(&entry) {
            missing.push(format!("{area}: no [[test]] in agent/Cargo.toml"));
        }
        let dir = root().join("tests").join(area);
        let main = std::fs::read_to_string(dir.join("main.rs")).unwrap();
        for file in std::fs::read_dir(&dir).unwrap() {
            let name = file.unwrap().file_name().to_string_lossy().into_owned();
            let Some(module) = name.strip_suffix(".rs") else {
                continue;
            };
            if module != "main" && !main.contains(&format!("mod {module};")) {
                missing.push(format!("tests/{area}/{name}: not a module of main.rs"));
            }
        }
    }
    // No test file outside the areas (support, data and the child program
    // are not test files).
    for entry in std::fs::read_dir(root().join("tests")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".rs") {
            missing.push(format!("tests/{name}: outside every area"));
        }
    }
    assert!(missing.is_empty(), "never built: {missing:#?}");
}

#[test]
fn the_support_library_runs_the_binary_cargo_built() {
    let cargo = PathBuf::from(env!("CARGO_BIN_EXE_deploy-agent"));
    assert_eq!(
        deploy_agent_tests::agent_bin().canonicalize().unwrap(),
        cargo.canonicalize().unwrap()
    );
}

#[test]
fn the_readme_test_command_is_the_one_ci_runs() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    // The README's second command, without its comment.
    let command = readme
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .nth(2)
        .and_then(|l| l.split('#').next())
        .map(str::trim)
        .unwrap();
    assert!(
        command.contains("nextest run"),
        "README's test command: {command:?}"
    );
    assert!(
        ci.lines().any(|l| l.trim() == command),
        ".ci/run does not run the README's test command {command:?}"
    );
}

/// Every test that can skip (it calls `precondition`) is one whose output
/// tests/nextest.toml shows, so its `SKIPPED` line is seen.
#[test]
fn every_test_that_can_skip_shows_its_output() {
    let config = std::fs::read_to_string(root().join("tests/nextest.toml")).unwrap();
    let shown = config
        .lines()
        .find(|l| l.starts_with("filter = 'test(/::("))
        .expect("the override for tests that can skip");
    let mut hidden = Vec::new();
    for area in areas() {
        let dir = root().join("tests").join(&area);
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            if path.ends_with("registered.rs") {
                continue; // this check names the call, it makes none
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (at, _) in text.match_indices("precondition(") {
                for test in tests_reaching(&text, at) {
                    if !shown.contains(&format!("|{test}|"))
                        && !shown.contains(&format!("({test}|"))
                        && !shown.contains(&format!("|{test})"))
                    {
                        hidden.push(format!("{area}::{test}"));
                    }
                }
            }
        }
    }
    hidden.dedup();
    assert!(
        hidden.is_empty(),
        "tests that can skip silently: {hidden:?} (add them to tests/nextest.toml)"
    );
}

/// The test functions that run the code at byte `at` of `text`: the
/// function around it if it is a test, else the tests that call it.
fn tests_reaching(text: &str, at: usize) -> Vec<String> {
    let is_test_attr =
        |attr: &str| attr.starts_with("#[test]") || attr.starts_with("#[tokio::test");
    let fn_name = |rest: &str| {
        rest.split('(')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let Some(start) = text[..at].rfind("fn ") else {
        return Vec::new();
    };
    let name = fn_name(&text[start + 3..]);
    let head = &text[start.saturating_sub(120)..start];
    if head.rfind("#[").is_some_and(|i| is_test_attr(&head[i..])) {
        return vec![name];
    }
    // A helper: every test whose body calls it.
    let mut tests = Vec::new();
    for (i, _) in text.match_indices("#[") {
        if !is_test_attr(&text[i..]) {
            continue;
        }
        let Some(f) = text[i..].find("fn ") else {
            continue;
        };
        let body_start = i + f;
        let body_end = text[body_start..]
            .find("\n}\n")
            .map_or(text.len(), |e| body_start + e);
        if text[body_start..body_end].contains(&format!("{name}(")) {
            tests.push(fn_name(&text[body_start + 3..]));
        }
    }
    tests
}
