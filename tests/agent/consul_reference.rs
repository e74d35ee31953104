//! Replays every recorded Consul 1.9.0 exchange in
//! `tests/data/consul-reference/NN-*.txt` against `testserver::consul` and checks
//! status, the headers that matter, the body byte for byte, and the timings
//! of the blocking queries from the README table.
//!
//! Indexes differ in absolute value between the recording and our server, so
//! they are checked structurally: every recorded index is bound to the index
//! our server answered in the same place, and the binding must be
//! consistent (same recorded index -> same actual index) and preserve order.
//! Recorded request indexes are translated through that binding.
//!
//! Nothing here persists anything; a killed run leaves nothing behind.

// Test code: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::testserver::consul::{AclConfig, ConsulServer, ConsulServerConfig};

const MASTER_TOKEN: &str = "11111111-2222-3333-4444-555555555555";

/// One recorded exchange.
#[derive(Debug)]
struct Exchange {
    number: u32,
    name: String,
    method: String,
    headers: Vec<(String, String)>,
    data: Option<String>,
    url: String,
    status: u16,
    resp_headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn reference_dir() -> PathBuf {
    deploy_agent_tests::repo_root().join("tests/data/consul-reference")
}

fn parse_exchange(path: &Path) -> Exchange {
    let raw = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let number: u32 = name[..2].parse().unwrap();
    let nl = raw.iter().position(|&b| b == b'\n').unwrap();
    let cmd = std::str::from_utf8(&raw[..nl]).unwrap();
    let rest = &raw[nl + 1..];

    let mut tokens = cmd.split(' ').peekable();
    assert_eq!(tokens.next(), Some("$"), "{name}: command line");
    assert_eq!(tokens.next(), Some("curl"), "{name}: command line");
    let (mut method, mut headers, mut data, mut url) = (None, Vec::new(), None, None);
    while let Some(t) = tokens.next() {
        match t {
            "-X" => method = tokens.next().map(str::to_string),
            "--data-binary" => data = tokens.next().map(str::to_string),
            "-H" => {
                // The recorder dropped the quotes: `-H Name: value`.
                let n = tokens.next().unwrap();
                let (n, v) = match n.strip_suffix(':') {
                    Some(n) => (n.to_string(), tokens.next().unwrap_or("").to_string()),
                    None => {
                        let (a, b) = n.split_once(':').unwrap();
                        (a.to_string(), b.trim().to_string())
                    }
                };
                headers.push((n, v));
            }
            u if u.starts_with("http") => url = Some(u.to_string()),
            other => panic!("{name}: unexpected curl argument {other}"),
        }
    }
    let method = method.unwrap_or_else(|| if data.is_some() { "POST" } else { "GET" }.into());

    let split = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{name}: no end of headers"));
    let head = std::str::from_utf8(&rest[..split]).unwrap();
    let mut body = rest[split + 4..].to_vec();
    // The recorder appended one newline after the body.
    assert_eq!(body.pop(), Some(b'\n'), "{name}: trailing newline");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let resp_headers = lines
        .map(|l| {
            let (n, v) = l.split_once(": ").unwrap();
            (n.to_string(), v.to_string())
        })
        .collect();
    Exchange {
        number,
        name,
        method,
        headers,
        data,
        url: url.expect("no URL in the command line"),
        status,
        resp_headers,
        body,
    }
}

/// Expected durations of the blocking queries, from the README table.
fn timing_table() -> BTreeMap<u32, f64> {
    let readme = std::fs::read_to_string(reference_dir().join("README.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in readme.lines() {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        if cols.len() < 4 {
            continue;
        }
        let Ok(n) = cols[1].parse::<u32>() else {
            continue;
        };
        let secs: String = cols[3]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        if let Ok(s) = secs.parse::<f64>() {
            out.insert(n, s);
        }
    }
    out
}

/// Order-preserving, consistent binding of recorded indexes to ours.
#[derive(Default)]
struct IndexMap {
    pairs: Vec<(u64, u64)>,
}

impl IndexMap {
    fn bind(&mut self, recorded: u64, actual: u64) -> Result<(), String> {
        for &(r, a) in &self.pairs {
            if r.cmp(&recorded) != a.cmp(&actual) {
                return Err(format!(
                    "index order differs: recorded {r} vs {recorded}, ours {a} vs {actual}"
                ));
            }
        }
        self.pairs.push((recorded, actual));
        Ok(())
    }

    fn translate(&self, recorded: u64, current: u64) -> u64 {
        if recorded == 0 || recorded >= 1_000_000 {
            // 0 (non-blocking) and "far ahead of the server" keep their
            // meaning as they are.
            return recorded;
        }
        self.pairs
            .iter()
            .find(|(r, _)| *r == recorded)
            .map(|(_, a)| *a)
            // An index the recording never showed was the server's
            // current one at the time.
            .unwrap_or(current)
    }
}

/// Writes the recording implies happened while a blocking query waited.
fn concurrent_write(number: u32) -> Option<(&'static str, &'static [u8])> {
    match number {
        6 => Some(("deploy/web/prod", br#"{"build":"b2"}"#)),
        7 => Some(("deploy/web/other", b"x")),
        18 => Some(("deploy/web/prod", br#"{"build":"b4"}"#)),
        24 => Some(("deploy/web/another", b"z")),
        _ => None,
    }
}

fn request_body(ex: &Exchange) -> Option<Vec<u8>> {
    let d = ex.data.as_deref()?;
    let Some(file) = d.strip_prefix('@') else {
        return Some(d.as_bytes().to_vec());
    };
    if file.starts_with("/dev/fd/") {
        // A process substitution: its size is in the recorded 413 message.
        let text = String::from_utf8_lossy(&ex.body);
        let n: usize = text
            .split("Request body(")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(600 * 1024);
        return Some(vec![b'a'; n]);
    }
    Some(std::fs::read(file).unwrap_or_else(|_| "some service list\n".repeat(1000).into_bytes()))
}

/// Replaces recorded `CreateIndex`/`ModifyIndex` numbers with ours.
fn substitute_indexes(body: &[u8], map: &IndexMap) -> Vec<u8> {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let field = ["\"CreateIndex\": ", "\"ModifyIndex\": "]
            .into_iter()
            .find(|f| trimmed.starts_with(f));
        match field {
            Some(f) => {
                let indent = &line[..line.len() - trimmed.len()];
                let num_str: String = trimmed[f.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                let tail = &trimmed[f.len() + num_str.len()..];
                let rec: u64 = num_str.parse().unwrap();
                let act = map.translate(rec, u64::MAX);
                out.push_str(&format!("{indent}{f}{act}{tail}"));
            }
            None => out.push_str(line),
        }
    }
    out.into_bytes()
}

/// Binds the indexes in two JSON documents of the same shape.
fn bind_json(
    exp: &serde_json::Value,
    act: &serde_json::Value,
    map: &mut IndexMap,
) -> Result<(), String> {
    use serde_json::Value::*;
    match (exp, act) {
        (Array(e), Array(a)) if e.len() == a.len() => {
            e.iter().zip(a).try_for_each(|(e, a)| bind_json(e, a, map))
        }
        (Object(e), Object(a)) => {
            if e.keys().collect::<Vec<_>>() != a.keys().collect::<Vec<_>>() {
                return Err(format!("fields differ: {exp} vs {act}"));
            }
            for (k, ev) in e {
                let av = &a[k];
                if k == "CreateIndex" || k == "ModifyIndex" {
                    match (ev.as_u64(), av.as_u64()) {
                        (Some(r), Some(x)) => map.bind(r, x)?,
                        _ => return Err(format!("{k} not a number")),
                    }
                } else {
                    bind_json(ev, av, map)?;
                }
            }
            Ok(())
        }
        (e, a) if e == a => Ok(()),
        _ => Err(format!("JSON differs: expected {exp}, got {act}")),
    }
}

async fn replay(
    ex: &Exchange,
    server: &ConsulServer,
    http: &reqwest::Client,
    map: &mut IndexMap,
    timings: &BTreeMap<u32, f64>,
) -> Vec<String> {
    let mut errors = Vec::new();
    let mut url = ex.url.replace("127.0.0.1:8500", &server.addr().to_string());
    // Translate recorded `index=N` and `cas=N` into ours.
    for param in ["index=", "cas="] {
        if let Some(pos) = url.find(param) {
            let start = pos + param.len();
            let end = url[start..]
                .find('&')
                .map(|e| start + e)
                .unwrap_or(url.len());
            let rec: u64 = url[start..end].parse().unwrap();
            let act = map.translate(rec, server.index());
            url.replace_range(start..end, &act.to_string());
        }
    }
    let mut req = http.request(ex.method.parse().unwrap(), &url);
    for (n, v) in &ex.headers {
        req = req.header(n, v);
    }
    if let Some(body) = request_body(ex) {
        req = req.body(body);
    }
    let writer = concurrent_write(ex.number);
    let started = Instant::now();
    let send = req.send();
    let resp = if let Some((key, value)) = writer {
        let write = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            server.put(key, value);
        };
        let (resp, ()) = tokio::join!(send, write);
        resp
    } else {
        send.await
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return vec![format!("request failed: {e}")],
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    let elapsed = started.elapsed().as_secs_f64();

    if status != ex.status {
        errors.push(format!("status {status}, recorded {}", ex.status));
    }
    // Headers: every recorded one (but Date/Content-Length) must be there
    // with the same value; indexes through the binding.
    for (n, v) in &ex.resp_headers {
        let got = headers.get(n.as_str()).and_then(|v| v.to_str().ok());
        match n.as_str() {
            "Content-Length" => {
                let cl: Option<usize> = got.and_then(|g| g.parse().ok());
                if cl != Some(body.len()) {
                    errors.push(format!("Content-Length {got:?} but body is {}", body.len()));
                }
                if v.parse::<usize>().ok() != Some(ex.body.len()) {
                    errors.push("recording's Content-Length does not match its body".into());
                }
            }
            "X-Consul-Index" => match got.and_then(|g| g.parse::<u64>().ok()) {
                Some(a) => {
                    if let Err(e) = map.bind(v.parse().unwrap(), a) {
                        errors.push(format!("X-Consul-Index: {e}"));
                    }
                }
                None => errors.push(format!("X-Consul-Index missing or bad: {got:?}")),
            },
            _ => {
                if got != Some(v.as_str()) {
                    errors.push(format!("header {n}: got {got:?}, recorded {v:?}"));
                }
            }
        }
    }
    // No Consul header the recording does not have (e.g. an index on a PUT).
    for n in headers.keys() {
        if n.as_str().starts_with("x-consul-")
            && !ex
                .resp_headers
                .iter()
                .any(|(r, _)| r.eq_ignore_ascii_case(n.as_str()))
        {
            errors.push(format!("unexpected header {n}"));
        }
    }
    // Body: JSON indexes bound structurally, then byte-for-byte with our
    // indexes substituted.
    let is_json = ex
        .resp_headers
        .iter()
        .any(|(n, v)| n == "Content-Type" && v == "application/json");
    if is_json {
        match (
            serde_json::from_slice::<serde_json::Value>(&ex.body),
            serde_json::from_slice::<serde_json::Value>(&body),
        ) {
            (Ok(e), Ok(a)) => {
                if let Err(e) = bind_json(&e, &a, map) {
                    errors.push(format!("body: {e}"));
                }
            }
            (_, Err(e)) => errors.push(format!("body is not JSON: {e}")),
            (Err(e), _) => errors.push(format!("recorded body is not JSON: {e}")),
        }
    }
    let expected = substitute_indexes(&ex.body, map);
    if expected != body {
        errors.push(format!(
            "body differs:\n--- recorded (indexes substituted)\n{}\n--- ours\n{}",
            String::from_utf8_lossy(&expected),
            String::from_utf8_lossy(&body)
        ));
    }
    if let Some(&exp) = timings.get(&ex.number) {
        if elapsed < exp - 0.3 || elapsed > exp + 0.4 {
            errors.push(format!("returned after {elapsed:.2} s, recorded {exp} s"));
        }
    }
    // 11: an index ahead of the server waits the full `wait` (1 s).
    if url.contains("index=99999999") && elapsed < 0.95 {
        errors.push(format!(
            "index ahead returned after {elapsed:.2} s, before wait"
        ));
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recorded_exchange_replays_identically() {
    let dir = reference_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with(".txt") && n.as_bytes()[0].is_ascii_digit()
        })
        .collect();
    files.sort();
    assert_eq!(files.len(), 28, "expected the 28 recorded exchanges");
    let exchanges: Vec<Exchange> = files.iter().map(|p| parse_exchange(p)).collect();
    let timings = timing_table();
    assert_eq!(
        timings.keys().copied().collect::<Vec<_>>(),
        vec![5, 6, 7, 18, 24]
    );

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let plain = ConsulServer::start(ConsulServerConfig::default())
        .await
        .unwrap();
    // Files 25-28 come from a second server with ACLs on, default deny, and
    // the key already written (CreateIndex 16 there).
    let acl = ConsulServer::start(ConsulServerConfig {
        acl: Some(AclConfig {
            master_token: MASTER_TOKEN.into(),
            tokens: Vec::new(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    acl.put("deploy/web/prod", br#"{"build":"b1"}"#.to_vec());

    let (mut plain_map, mut acl_map) = (IndexMap::default(), IndexMap::default());
    let mut failures = Vec::new();
    for ex in &exchanges {
        let (server, map) = if ex.number >= 25 {
            (&acl, &mut acl_map)
        } else {
            (&plain, &mut plain_map)
        };
        for e in replay(ex, server, &http, map, &timings).await {
            failures.push(format!("{}: {e}", ex.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches against the recordings:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn index_map_rejects_reordering() {
    let mut m = IndexMap::default();
    m.bind(25, 1).unwrap();
    m.bind(27, 2).unwrap();
    assert!(m.bind(26, 3).is_err(), "26 sits between 25 and 27");
    assert!(m.bind(25, 2).is_err(), "25 is already bound to 1");
    assert_eq!(m.translate(27, 99), 2);
    assert_eq!(m.translate(34, 99), 99);
}
