#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Issue 13, items 4 and 5 (messages and operator surfaces), on the real
//! binary where the behaviour is the binary's: `check-config` runs `run`'s
//! validation, the config keys README and docs/ name are accepted, the
//! socket refuses an oversized body at once and keeps a slot for operators, `status --watch`
//! ends when the agent goes away and writes no terminal codes into a pipe,
//! the CLI never says "join group root", JSON logs carry values, one
//! exit-code table, and `fleet status` refuses a server that is not Consul.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use deploy_agent::status::model::{CommandRequest, HistoryEntry, StatusReport, StatusSource};
use deploy_agent::status::{CancellationToken, SocketSettings, StatusServer};
use deploy_agent_tests::{agent_bin, children, fast_tempdir, DEADLINE};
use deploy_agent_tests::{needs_root, precondition};

const NOBODY: u32 = 65534;

/// Runs the binary with `args`, without any CONSUL_HTTP_* from the
/// caller's environment.
fn run_bin(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Proc::new(agent_bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("CONSUL_HTTP_") || k == "DEPLOY_AGENT_SOCKET" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn check_config(dir: &Path, body: &str, env: &[(&str, &str)]) -> Output {
    let path = dir.join("config.toml");
    std::fs::write(&path, body).unwrap();
    run_bin(&["check-config", "--config", path.to_str().unwrap()], env)
}

// ---------------------------------------------------------------- config

/// README.md and every `docs/*.md`, as (path from the repository root, text).
fn docs() -> Vec<(String, String)> {
    let root = deploy_agent_tests::repo_root();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    paths.sort();
    paths.insert(0, root.join("README.md"));
    paths
        .iter()
        .map(|p| {
            let name = p.strip_prefix(root).unwrap().display().to_string();
            (name, std::fs::read_to_string(p).unwrap())
        })
        .collect()
}

/// The text of one of `docs()`.
fn doc(name: &str) -> String {
    std::fs::read_to_string(deploy_agent_tests::repo_root().join(name)).unwrap()
}

/// `(table, key, value)` for every key the docs name: every line of the
/// ```toml blocks in README.md and docs/ (commented-out examples too), and
/// backticked `key = value` mentions in README's Configuration section and
/// docs/configuration.md's validation and "Consul watch rate (config)"
/// sections (bare backticked keys there too, with a sample value).
fn readme_keys() -> Vec<(String, String, String)> {
    let mut keys = Vec::new();
    for (_, text) in docs() {
        toml_keys(&text, &mut keys);
    }
    for (file, heading, table) in [
        ("README.md", "## Configuration", ""),
        ("docs/configuration.md", "# Configuration reference", ""),
        (
            "docs/configuration.md",
            "## Consul watch rate (config)",
            "consul",
        ),
    ] {
        let text = format!("\n{}", doc(file));
        prose_keys(&text, heading, table, &mut keys);
    }
    // README's example config is also docs/configuration.md's.
    keys.sort();
    keys.dedup();
    keys
}

/// Every key line of the ```toml blocks in `text`.
fn toml_keys(text: &str, keys: &mut Vec<(String, String, String)>) {
    let mut table = String::new();
    let mut in_toml = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_toml = line == "```toml";
            table.clear();
            continue;
        }
        if !in_toml {
            continue;
        }
        let l = line.trim_start_matches('#').trim();
        if let Some(t) = l.strip_prefix('[') {
            if let Some((name, _)) = t.split_once(']') {
                table = name.to_owned();
            }
            continue;
        }
        if let Some((k, v)) = l.split_once(" = ") {
            let k = k.trim();
            if !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                let v = strip_comment(v);
                keys.push((table.clone(), k.to_owned(), v));
            }
        }
    }
}

/// Backticked `key = value` and `[table] key` mentions in the section of
/// `text` under `heading` (up to the next line starting with '#').
fn prose_keys(text: &str, heading: &str, table: &str, keys: &mut Vec<(String, String, String)>) {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no section {heading:?}"))
        + 1;
    let body = &text[start + heading.len()..];
    let end = body.find("\n#").unwrap_or(body.len());
    let body = &body[..end];
    // Skip the toml block, already read above.
    let prose: String = body
        .split("```")
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, s)| s)
        .collect();
    for (i, piece) in prose.split('`').enumerate() {
        if i % 2 == 0 {
            continue;
        }
        let (k, v) = match piece.split_once(" = ") {
            Some((k, v)) => (k.trim(), Some(v.trim().to_owned())),
            None => (piece.trim(), None),
        };
        let (t, k) = match k.rsplit_once(' ') {
            // `[consul] rate-burst`
            Some((t, k)) => (t.trim_matches(|c| c == '[' || c == ']'), k),
            None => (table, k),
        };
        let kebab = !k.is_empty()
            && k.contains('-')
            && k.chars().all(|c| c.is_ascii_lowercase() || c == '-');
        if kebab && !t.is_empty() {
            keys.push((t.to_owned(), k.to_owned(), v.unwrap_or_default()));
        }
    }
}

fn strip_comment(v: &str) -> String {
    // Values in README carry no '#', except inside strings we do not use.
    let v = match v.find("  #") {
        Some(i) => &v[..i],
        None => v,
    };
    v.trim().to_owned()
}

#[test]
fn every_config_key_in_readme_is_accepted_by_check_config() {
    let dir = fast_tempdir();
    let token = dir.path().join("consul.token");
    std::fs::write(&token, "t0k3n\n").unwrap();
    let (public, _) = deploy_agent::sign::keygen(&dir.path().join("sign.key")).unwrap();
    let keys = readme_keys();
    assert!(keys.len() >= 40, "README parse found only {keys:?}");
    assert!(
        keys.iter()
            .any(|(t, k, _)| t == "consul" && k == "rate-interval"),
        "{keys:?}"
    );
    let mut failures = Vec::new();
    for (table, key, value) in &keys {
        // Values that name things on the writer's host get a local one; the
        // point is that the key is accepted.
        let value = match (table.as_str(), key.as_str()) {
            ("consul", "token-file") => format!("{:?}", token.display().to_string()),
            ("consul", "ca-cert") => format!("{:?}", token.display().to_string()),
            ("status", "socket-group" | "operator-group") => "\"root\"".into(),
            ("signing", "public-keys") => format!("[\"{public}\"]"),
            (_, k) if value.is_empty() && k.ends_with("splay") => "\"5s\"".into(),
            (_, k) if value.is_empty() && k.ends_with("interval") => "\"15s\"".into(),
            (_, _) if value.is_empty() => "2".into(),
            _ => value.clone(),
        };
        let top = table.is_empty();
        let mut body = if top && key == "deploy-root" {
            String::new()
        } else {
            format!(
                "deploy-root = {:?}\n",
                dir.path().join("root").display().to_string()
            )
        };
        if top {
            body.push_str(&format!("{key} = {value}\n"));
        }
        if table != "source" {
            body.push_str("[source]\nkey = \"deploy/app/production\"\n");
        }
        if !top {
            body.push_str(&format!("[{table}]\n"));
            if table == "fleet" && key != "app" && key != "tier" {
                body.push_str("app = \"web\"\ntier = \"production\"\n");
            }
            if table == "fleet" && key == "app" {
                body.push_str("tier = \"production\"\n");
            }
            if table == "fleet" && key == "tier" {
                body.push_str("app = \"web\"\n");
            }
            body.push_str(&format!("{key} = {value}\n"));
        }
        let out = check_config(dir.path(), &body, &[]);
        if !out.status.success() {
            failures.push(format!(
                "[{table}] {key} = {value}: {}",
                text(&out.stderr).trim()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every backticked `[table] key` and `key = value` anywhere in README.md
/// and docs/ whose key is kebab-case with a dash (so log fields like
/// `reason = ...` are not taken for config keys), with `file:line`.
fn readme_mentions_everywhere() -> Vec<(Option<String>, String, String)> {
    let mut found = Vec::new();
    for (file, text) in docs() {
        mentions(&file, &text, &mut found);
    }
    found
}

fn mentions(file: &str, text: &str, found: &mut Vec<(Option<String>, String, String)>) {
    for (n, line) in text.lines().enumerate() {
        for (i, piece) in line.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            let (table, rest) = match piece.strip_prefix('[').and_then(|p| p.split_once("] ")) {
                Some((t, rest)) => (Some(t.to_owned()), rest),
                None => (None, piece),
            };
            let key = match rest.split_once(" = ") {
                Some((k, _)) => k.trim(),
                None if table.is_some() => rest.trim(),
                None => continue,
            };
            if key.contains('-') && key.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                found.push((table, key.to_owned(), format!("{file}:{}", n + 1)));
            }
        }
    }
}

/// The whole of README.md and docs/, not only the configuration pages: a
/// backticked key anywhere must be a real config key.
#[test]
fn no_readme_mention_names_a_key_that_does_not_exist() {
    const TABLES: &[&str] = &[
        "", "source", "consul", "download", "unpack", "drain", "hooks", "status", "health",
        "signing", "fleet",
    ];
    let mut unknown = Vec::new();
    for (table, key, line) in readme_mentions_everywhere() {
        let tables: Vec<&str> = match &table {
            Some(t) => vec![t.as_str()],
            None => TABLES.to_vec(),
        };
        let known = tables.iter().any(|t| {
            let body = if t.is_empty() {
                format!("deploy-root = \"/srv/a\"\n{key} = 1\n[source]\nkey = \"k\"\n")
            } else if *t == "source" {
                format!("deploy-root = \"/srv/a\"\n[source]\nkey = \"k\"\n{key} = 1\n")
            } else {
                format!("deploy-root = \"/srv/a\"\n[source]\nkey = \"k\"\n[{t}]\n{key} = 1\n")
            };
            match deploy_agent::config::Config::parse(&body, Path::new("README.md")) {
                Ok(_) => true,
                Err(e) => !e.to_string().contains(&format!("unknown field `{key}`")),
            }
        });
        if !known {
            unknown.push(format!("{line}: {key}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "not config keys:\n{}",
        unknown.join("\n")
    );
}

fn base_config(dir: &Path, extra: &str) -> String {
    format!(
        "deploy-root = {:?}\n[source]\nfile = {:?}\n[status]\nsocket = {:?}\n{extra}",
        dir.join("root").display().to_string(),
        dir.join("manifest.json").display().to_string(),
        dir.join("run/agent.sock").display().to_string(),
    )
}

/// Runs the binary with `args` and a stdout whose reader is already gone:
/// every write to it fails with EPIPE.
fn run_with_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    Proc::new(agent_bin())
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// A command whose reader went away (`deploy-agent ... | head -1`) ends
/// quietly with 0: the command's work is done, only its report is unread.
/// Rust ignores SIGPIPE, so a plain `println!` would panic (exit 101), and
/// the host commands said "I/O error on <socket>" with exit 1. Both kinds:
/// `check-config` (like `release`, printed with `say!`) and `status` (the
/// host commands' client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_a_command_quietly() {
    let dir = fast_tempdir();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, base_config(dir.path(), "")).unwrap();
    let server = Server::start(|_| {}).await;
    let socket = server.path.to_str().unwrap().to_string();
    let config = path.to_str().unwrap().to_string();
    let outs = tokio::task::spawn_blocking(move || {
        [
            run_with_closed_stdout(&["check-config", "--config", &config]),
            run_with_closed_stdout(&["status", "--socket", &socket]),
        ]
    })
    .await
    .unwrap();
    for out in outs {
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(err.is_empty(), "{err}");
    }
    server.stop().await;
}

#[test]
fn check_config_refuses_what_run_refuses_and_what_is_dangerous() {
    let dir = fast_tempdir();
    let ok = check_config(dir.path(), &base_config(dir.path(), ""), &[]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let cases: &[(&str, &str)] = &[
        (
            "operator-group = \"no-such-group-deploy-agent\"\n",
            "operator-group",
        ),
        (
            "socket-group = \"no-such-group-deploy-agent\"\n",
            "socket-group",
        ),
        ("socket-mode = 0o7777\n", "socket-mode"),
        ("socket-mode = 660\n", "socket-mode"),
        ("max-clients = 0\n", "max-clients"),
        ("[download]\nconnect-timeout = \"0s\"\n", "connect-timeout"),
        ("[download]\nread-timeout = \"0s\"\n", "read-timeout"),
        ("[unpack]\nmax-bytes = 0\n", "max-bytes"),
        ("[unpack]\nmax-entries = 0\n", "max-entries"),
    ];
    for (extra, key) in cases {
        let out = check_config(dir.path(), &base_config(dir.path(), extra), &[]);
        assert_eq!(out.status.code(), Some(2), "{extra}: {}", text(&out.stdout));
        assert!(
            text(&out.stderr).contains(key),
            "{extra}: {}",
            text(&out.stderr)
        );
    }
    for root in ["/", "/etc", "/usr/", "/var", "/proc/self"] {
        let body = format!("deploy-root = \"{root}\"\n[source]\nkey = \"k\"\n");
        let out = check_config(dir.path(), &body, &[]);
        assert_eq!(out.status.code(), Some(2), "{root}");
        assert!(text(&out.stderr).contains("deploy-root"), "{root}");
    }
}

#[test]
fn run_validates_groups_before_creating_anything() {
    let dir = fast_tempdir();
    let body = base_config(
        dir.path(),
        "operator-group = \"no-such-group-deploy-agent\"\n",
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, body).unwrap();
    let out = run_bin(
        &[
            "--log-format",
            "text",
            "run",
            "--config",
            path.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("operator-group"));
    assert!(!dir.path().join("root").exists(), "deploy root created");
    assert!(!dir.path().join("run").exists(), "socket directory created");
}

#[test]
fn check_config_applies_the_consul_environment() {
    let dir = fast_tempdir();
    let body = "deploy-root = \"/srv/app\"\n[source]\nkey = \"deploy/app/production\"\n";
    let out = check_config(
        dir.path(),
        body,
        &[
            ("CONSUL_HTTP_ADDR", "10.1.2.3:8501"),
            ("CONSUL_HTTP_SSL", "true"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("at https://10.1.2.3:8501"),
        "{}",
        text(&out.stdout)
    );
    // A token file named by the environment that does not exist fails the
    // check as it fails `run`.
    let out = check_config(
        dir.path(),
        body,
        &[("CONSUL_HTTP_TOKEN_FILE", "/nonexistent/deploy-agent.token")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
}

// ---------------------------------------------------------------- socket

struct Empty;

impl StatusSource for Empty {
    fn status(&self) -> StatusReport {
        StatusReport::new(1)
    }
    fn history(&self) -> Vec<HistoryEntry> {
        Vec::new()
    }
    fn metrics(&self) -> String {
        String::new()
    }
}

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(tweak: impl FnOnce(&mut SocketSettings)) -> Server {
        let dir = fast_tempdir();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("agent.sock");
        let mut settings = SocketSettings {
            path: path.clone(),
            mode: 0o666,
            header_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            ..SocketSettings::default()
        };
        tweak(&mut settings);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<CommandRequest>(4);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let _ = req.reply.send(Ok(serde_json::Value::Null));
            }
        });
        let shutdown = CancellationToken::new();
        let handle = StatusServer::start(settings, Arc::new(Empty), tx, shutdown.clone())
            .await
            .unwrap();
        Server {
            _dir: dir,
            path,
            shutdown,
            handle,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
    }
}

/// Sends `head` and returns the first bytes of the answer.
fn send_raw(path: &Path, head: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(head).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    text(&buf[..n])
}

/// Server timeouts longer than any client here waits: an answer the
/// client gets was given without waiting for a timeout.
fn no_timeouts(s: &mut SocketSettings) {
    s.header_timeout = 10 * DEADLINE;
    s.request_timeout = 10 * DEADLINE;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_content_length_gets_413_before_the_body() {
    // The body never comes: a 413 within the client's wait is an answer
    // given before it, not after a timeout.
    let server = Server::start(no_timeouts).await;
    let p = server.path.clone();
    for head in [
        &b"POST /v1/hold HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n"[..],
        &b"POST /v1/resume HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n"[..],
        &b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n"[..],
    ] {
        let p = p.clone();
        let answer = tokio::task::spawn_blocking(move || send_raw(&p, head))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    server.stop().await;
}

fn as_nobody(cmd: &mut Proc) {
    // std drops the supplementary groups (setgroups(0)) when it changes the
    // uid as root, then sets gid and uid: no code of ours runs after fork.
    cmd.uid(NOBODY).gid(NOBODY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unprivileged_clients_cannot_starve_root() {
    if !precondition(needs_root("to flood as uid 65534")) {
        return;
    }
    // No timeouts drop the flood while root asks: root is answered from
    // its reserved slot, or not at all.
    let server = Server::start(|s| {
        s.max_clients = 4;
        no_timeouts(s);
    })
    .await;
    let p = server.path.clone();
    let mut flood = children::command("flood");
    flood
        .arg(&p)
        .arg("12")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    as_nobody(&mut flood);
    let mut child = flood.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let mut b = [0u8; 256];
        while !text(&seen).contains("ready") {
            let n = out.read(&mut b).unwrap();
            assert!(n > 0, "flood child ended early: {}", text(&seen));
            seen.extend_from_slice(&b[..n]);
        }
    });
    tokio::time::timeout(Duration::from_secs(20), ready)
        .await
        .unwrap()
        .unwrap();
    // Let the server accept (and turn away) all of them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = p.clone();
    let answer = tokio::task::spawn_blocking(move || {
        send_raw(
            &q,
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "root starved by unprivileged clients: {answer}"
    );
    drop(child.stdin.take());
    let _ = child.wait();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_when_the_agent_goes_away_and_writes_no_codes_into_a_pipe() {
    let server = Server::start(|_| {}).await;
    let child = Proc::new(agent_bin())
        .args(["status", "--watch", "--socket"])
        .arg(&server.path)
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    server.stop().await;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = match tokio::time::timeout(Duration::from_secs(10), waited).await {
        Ok(r) => r.unwrap().unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("status --watch still running 10 s after the agent went away");
        }
    };
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not running"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !stdout.contains('\x1b'),
        "terminal codes in a pipe: {stdout:?}"
    );
    assert!(
        stdout.matches("deploy-agent ").count() >= 2,
        "one report per second: {stdout}"
    );
    assert!(
        stdout.contains("\n\ndeploy-agent "),
        "reports separated by a blank line: {stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprivileged_cli_is_never_told_to_join_group_root() {
    if !precondition(needs_root("to run the CLI as uid 65534")) {
        return;
    }
    // Socket of group root, mode 0660: only root (and sudo) gets in.
    let server = Server::start(|s| s.mode = 0o660).await;
    let mut cmd = Proc::new(agent_bin());
    cmd.args(["status", "--socket"]).arg(&server.path);
    as_nobody(&mut cmd);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(deploy_agent::exit::PERMISSION_DENIED as i32),
        "{err}"
    );
    assert!(!err.contains("join group root"), "{err}");
    assert!(err.contains("sudo"), "{err}");
    server.stop().await;
}

// ---------------------------------------------------------------- logs

#[test]
fn json_logs_carry_values_not_debug_strings() {
    let dir = fast_tempdir();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, base_config(dir.path(), "")).unwrap();
    let mut child = Proc::new(agent_bin())
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let sock = dir.path().join("run/agent.sock");
    // Up to 20 s for the socket, then on either way: the log below says
    // what happened.
    let _ =
        deploy_agent_tests::poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
            if sock.exists() {
                Ok(())
            } else {
                Err(())
            }
        });
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    child.wait().unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let listening = lines
        .iter()
        .find(|l| l["message"] == "status socket listening")
        .unwrap_or_else(|| panic!("{log}"));
    assert!(listening.get("group").is_none(), "{listening}");
    assert_eq!(listening["max_clients"], 16, "{listening}");
    for l in &lines {
        for (k, v) in l.as_object().unwrap() {
            let s = v.as_str().unwrap_or_default();
            assert!(
                s != "None" && !s.starts_with("Some("),
                "field {k} is a Debug string: {l}"
            );
        }
    }
}

// ---------------------------------------------------------------- exit codes and Consul

#[test]
fn one_exit_code_table_for_every_command() {
    use deploy_agent::exit;
    let mut all = exit::ALL.to_vec();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), exit::ALL.len(), "codes are distinct");
    let frozen = deploy_agent::Error::ReleaseFrozen {
        key: "deploy/web/freeze".into(),
        detail: "x".into(),
    };
    let conflict = deploy_agent::Error::ReleaseConflict {
        key: "deploy/web/production".into(),
        expected: 1,
    };
    assert_eq!(
        deploy_agent::fleet::commander::cli::code(&frozen),
        exit::FROZEN
    );
    assert_eq!(
        deploy_agent::fleet::commander::cli::code(&conflict),
        exit::CONFLICT
    );
    // The host commands' codes for the same numbers mean something else
    // no more.
    for (host_code, release_code) in [
        (exit::NOT_RUNNING, exit::CONFLICT),
        (exit::PERMISSION_DENIED, exit::FROZEN),
    ] {
        assert_ne!(host_code, release_code);
    }
    // docs/operating.md documents every code.
    let page = doc("docs/operating.md");
    let start = page.find("\n## Exit codes\n").unwrap();
    let section = &page[start..start + page[start..].find("\n## The local API").unwrap()];
    for c in exit::ALL {
        assert!(
            section.contains(&format!("\n| {c} |")),
            "code {c} not in docs/operating.md"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_freeze_twice_exits_with_the_frozen_code() {
    let consul = testkit::testserver::consul::ConsulServer::start(Default::default())
        .await
        .unwrap();
    let url = consul.url();
    let out = tokio::task::spawn_blocking(move || {
        let args = [
            "release",
            "--app",
            "web",
            "--tier",
            "production",
            "--consul",
            &url,
            "freeze",
        ];
        let first = run_bin(&args, &[]);
        assert!(first.status.success(), "{}", text(&first.stderr));
        run_bin(&args, &[])
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(deploy_agent::exit::FROZEN as i32),
        "{}",
        text(&out.stderr)
    );
}

/// A web server that answers 404 to everything, like a wrong port.
async fn not_consul() -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\n\
                          content-length: 9\r\nconnection: close\r\n\r\nnot found",
                    )
                    .await;
            });
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_status_against_something_that_is_not_consul_fails_clearly() {
    let (url, task) = not_consul().await;
    let out = tokio::task::spawn_blocking(move || {
        run_bin(
            &[
                "fleet",
                "--app",
                "web",
                "--tier",
                "production",
                "--consul",
                &url,
                "status",
            ],
            &[],
        )
    })
    .await
    .unwrap();
    task.abort();
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(deploy_agent::exit::NOT_CONSUL as i32),
        "stdout {} stderr {err}",
        text(&out.stdout)
    );
    assert!(err.contains("did not answer like a Consul agent"), "{err}");
}
