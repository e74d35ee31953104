//! The serving-impact row of the comparison benchmark (issue 15): nginx
//! serves the live build from the deploy root's `current` under a steady,
//! open-loop load from this process, while the agent deploys, once under
//! the shipped unit's resource settings (Nice=10, CPUWeight=20, best-effort
//! I/O priority 7: systemd/deploy-agent.service) and once without them.
//! The figure is the web server's p99 during a deploy over its p99 idle.
//! docs/performance.md, "Serving impact", says what is applied and how.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::buildgen::Artifact;
use testkit::testserver::consul::ConsulServer;

use crate::{free_port, leftovers, percentile, spawn_nginx, spread, which, Agent, Launch, Proc};

/// Small files at the same paths in every generated build (the generator
/// names sources by index, 40 to a directory), so every request is a 200
/// before and after a flip, and `/BUILD` tells which build is served.
const PAGES: &[&str] = &[
    "/BUILD",
    "/app/src/m0000/f00000.php",
    "/app/src/m0001/f00040.php",
    "/app/src/m0010/f00400.php",
    "/app/src/m0050/f02000.php",
];
/// The load: requests per second, spread over keep-alive connections.
const RATE: u32 = 200;
const CONNECTIONS: u32 = 4;
/// How long the web server is measured with the agent idle, per round.
const IDLE: Duration = Duration::from_secs(10);
/// The load stops by itself after this, whatever happens to the harness.
const LOAD_LIMIT: Duration = Duration::from_secs(3600);

/// What the benchmark needs from `main`.
pub struct Ctx<'a> {
    pub bin: &'a Path,
    pub work: &'a Path,
    pub consul: &'a ConsulServer,
    /// Two builds deployed in turn, `(url, artifact, its BUILD file)`, so
    /// every deploy changes what `current/BUILD` serves.
    pub builds: [(String, &'a Artifact, &'a str); 2],
    /// Sync and read the artifacts into the page cache, as every timed step.
    pub prime: &'a dyn Fn(),
}

/// The agent's full deploy of [`Ctx::builds`]`[i]` (the `deploy` closure
/// of `main`, which numbers the manifests).
pub type Deploy<'a> = dyn FnMut(&mut Agent, &str, &Artifact) -> (Duration, u64) + 'a;

/// One round: the idle window and the two deploy windows.
struct Windows {
    idle: (Instant, Instant),
    unit: (Instant, Instant),
    plain: (Instant, Instant),
}

/// The web server's latencies over some windows.
#[derive(Debug, Clone, Copy)]
struct WebStats {
    p50_ms: f64,
    p99_ms: f64,
    requests: usize,
    errors: usize,
}

impl WebStats {
    fn json(&self) -> Value {
        json!({"p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
               "requests": self.requests, "errors": self.errors})
    }
}

/// The measured row, reported by [`Serving::report`].
pub struct Serving {
    confinement: String,
    applied: Vec<String>,
    samples: Vec<Sample>,
    rounds: Vec<Windows>,
}

/// Runs `runs` rounds (idle window, deploy with the unit's settings, deploy
/// without, the order of the two alternating), or None without nginx.
pub fn measure(ctx: &Ctx, runs: usize, deploy: &mut Deploy) -> Option<Serving> {
    let web = start_web(ctx.work)?;
    let conf = Confinement::detect();
    eprintln!(
        "serving impact: nginx on 127.0.0.1:{}, {RATE} req/s over {CONNECTIONS} connections; {}",
        web.port,
        conf.describe()
    );
    let load = Load::start(web.port);
    let mut rounds = vec![];
    let mut applied = vec![];
    for r in 0..runs {
        eprintln!("serving impact: round {}/{runs}", r + 1);
        let mut idle = None;
        let (mut unit, mut plain) = (None, None);
        // Alternate which deploy follows the idle window, so that neither
        // always runs on a machine that has just been quiet.
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for with_unit in order {
            let launch = conf.launch(with_unit);
            let mut agent = Agent::start_with(ctx.bin, ctx.work, ctx.consul, 4, &launch);
            if r == 0 {
                applied.push(format!("{}: {}", launch.name, applied_settings(agent.pid)));
            }
            if idle.is_none() {
                idle = Some(idle_window(&agent, ctx.prime));
            }
            let w = deploy_window(&mut agent, ctx, web.port, deploy);
            *(if with_unit { &mut unit } else { &mut plain }) = Some(w);
            agent.wait_idle();
            agent.stop();
        }
        rounds.push(Windows {
            idle: idle.unwrap(),
            unit: unit.unwrap(),
            plain: plain.unwrap(),
        });
    }
    for a in &applied {
        eprintln!("serving impact: {a}");
    }
    Some(Serving {
        confinement: conf.describe(),
        applied,
        samples: load.finish(),
        rounds,
    })
}

/// The web server with the agent idle (its last slot purged, nothing dirty).
fn idle_window(agent: &Agent, prime: &dyn Fn()) -> (Instant, Instant) {
    agent.wait_idle();
    prime();
    let from = Instant::now();
    std::thread::sleep(IDLE);
    (from, Instant::now())
}

/// One full deploy of the build not live (key write -> flip, the same step
/// as the `agent` row); checks that nginx serves the new build right after.
fn deploy_window(
    agent: &mut Agent,
    ctx: &Ctx,
    port: u16,
    deploy: &mut Deploy,
) -> (Instant, Instant) {
    let live = agent.served_build();
    let (url, art, id) = ctx
        .builds
        .iter()
        .find(|b| live.as_deref() != Some(b.2))
        .unwrap();
    (ctx.prime)();
    deploy(agent, url, art);
    let (status, body) = Conn::new(port).get("/BUILD").unwrap();
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (200, *id),
        "nginx does not serve the new build from the flipped `current`"
    );
    agent.last_deploy.unwrap()
}

impl Serving {
    /// Prints the two rows (the unit's through `target`, a goal of the
    /// issue; the one without settings beside it) and returns the JSON.
    pub fn report(&self, target: &mut dyn FnMut(&str, String, &str, bool)) -> Value {
        let idle = self.stats(|w| w.idle);
        let mut out = json!({
            "rate_per_s": RATE, "connections": CONNECTIONS, "idle_window_s": IDLE.as_secs(),
            "confinement": self.confinement, "applied": self.applied, "idle": idle.json(),
        });
        for (key, unit) in [("unit", true), ("plain", false)] {
            let pick = |w: &Windows| if unit { w.unit } else { w.plain };
            let during = self.stats(pick);
            let ratio = during.p99_ms / idle.p99_ms;
            let per_round = |f: &dyn Fn(&Windows) -> (Instant, Instant)| -> Vec<f64> {
                self.rounds.iter().map(|w| self.p99(f(w))).collect()
            };
            // The settings trade deploy time for serving latency: show both.
            let took: Vec<f64> = self
                .rounds
                .iter()
                .map(|w| pick(w).1.duration_since(pick(w).0).as_secs_f64())
                .collect();
            let measured = format!(
                "{ratio:.2} {}: p99 {:.1} ms during / {:.1} ms idle, p50 {:.1} / {:.1} ms, \
                 errors {} of {} / {} of {}; deploy {:.2} s (median)",
                spread(&per_round(&pick), &per_round(&|w| w.idle)),
                during.p99_ms,
                idle.p99_ms,
                during.p50_ms,
                idle.p50_ms,
                during.errors,
                during.requests,
                idle.errors,
                idle.requests,
                crate::median(&took)
            );
            if unit {
                let name = "web p99 during deploy / idle (unit settings)";
                target(name, measured, "<= 2.0", ratio <= 2.0);
            } else {
                println!(
                    "| web p99 during deploy / idle (no settings) | {measured} | reference | - |"
                );
            }
            out[key] = json!({"during": during.json(), "ratio": ratio, "deploy_s": took});
        }
        out["rounds_p99_ms"] = self
            .rounds
            .iter()
            .map(|w| json!({"idle": self.p99(w.idle), "unit": self.p99(w.unit), "plain": self.p99(w.plain)}))
            .collect();
        out
    }

    fn p99(&self, window: (Instant, Instant)) -> f64 {
        self.window_stats(&[window]).p99_ms
    }

    /// Pooled over every round's window of one kind.
    fn stats(&self, pick: impl Fn(&Windows) -> (Instant, Instant)) -> WebStats {
        let windows: Vec<_> = self.rounds.iter().map(pick).collect();
        self.window_stats(&windows)
    }

    /// Latencies of the successful requests due in `windows`; errors and
    /// non-200 answers are counted apart.
    fn window_stats(&self, windows: &[(Instant, Instant)]) -> WebStats {
        let due: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| windows.iter().any(|(a, b)| s.due >= *a && s.due <= *b))
            .collect();
        let ok: Vec<f64> = due.iter().filter(|s| s.ok).map(|s| s.ms).collect();
        WebStats {
            p50_ms: percentile(&ok, 0.5),
            p99_ms: percentile(&ok, 0.99),
            requests: due.len(),
            errors: due.len() - ok.len(),
        }
    }
}

/// nginx serving the deploy root's `current`: a symlink the agent flips,
/// which nginx follows on every request (`disable_symlinks` is off by
/// default and there is no `open_file_cache`).
struct Web {
    _proc: Proc,
    port: u16,
}

fn start_web(work: &Path) -> Option<Web> {
    let dir = work.join("web");
    fs::create_dir_all(dir.join("tmp")).unwrap();
    let port = free_port();
    // As root, nginx's workers would run as nobody, who may not read the slots.
    let user = if nix::unistd::geteuid().is_root() {
        "user root;"
    } else {
        ""
    };
    let conf = format!(
        r#"worker_processes auto;
{user}
pid {d}/nginx.pid;
error_log {d}/error.log;
daemon off;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  keepalive_timeout 60s; keepalive_requests 1000000;
  default_type text/plain;
  server {{
    listen 127.0.0.1:{port};
    root {root}/current;
  }}
}}
"#,
        d = dir.display(),
        root = work.join("root").display()
    );
    let proc = spawn_nginx(&dir, &conf, port);
    if proc.is_none() {
        eprintln!("serving impact: nginx did not start; see {}", dir.display());
    }
    proc.map(|p| Web { _proc: p, port })
}

/// One HTTP/1.1 keep-alive connection, reopened after an error.
struct Conn {
    port: u16,
    stream: Option<BufReader<TcpStream>>,
}

impl Conn {
    fn new(port: u16) -> Conn {
        Conn { port, stream: None }
    }

    /// GET `path`: the status code and the body.
    fn get(&mut self, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
            self.stream = Some(BufReader::new(s));
        }
        let r = self.exchange(path);
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    fn exchange(&mut self, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let s = self.stream.as_mut().unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
        s.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        s.read_line(&mut line)?;
        let bad = |what: &str| std::io::Error::other(format!("{what}: {line:?}"));
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| bad("status line"))?;
        let (mut len, mut close) = (0usize, false);
        loop {
            let mut h = String::new();
            if s.read_line(&mut h)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let Some((name, value)) = h.trim_end().split_once(':') else {
                break; // the empty line that ends the header
            };
            match name.to_ascii_lowercase().as_str() {
                "content-length" => len = value.trim().parse().map_err(std::io::Error::other)?,
                "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body)?;
        if close {
            self.stream = None;
        }
        Ok((status, body))
    }
}

/// One request of the load: when it was due, how long after that its
/// answer had fully arrived, and whether it was a 200.
struct Sample {
    due: Instant,
    ms: f64,
    ok: bool,
}

/// Open-loop load: request k is due at `start + k / RATE`, on connection
/// `k % CONNECTIONS`, whatever happened to the requests before it, and its
/// latency counts from when it was due: a stalled server is charged for
/// every request it delayed (no coordinated omission).
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let threads = (0..CONNECTIONS)
            .map(|c| {
                let (stop, samples) = (stop.clone(), samples.clone());
                std::thread::spawn(move || client(port, c, start, &stop, &samples))
            })
            .collect();
        Load {
            stop,
            samples,
            threads,
        }
    }

    /// Stops the load and returns every request's sample.
    fn finish(mut self) -> Vec<Sample> {
        self.stop_threads();
        std::mem::take(&mut *self.samples.lock().unwrap())
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Connection `first`'s share of the timetable.
fn client(port: u16, first: u32, start: Instant, stop: &AtomicBool, out: &Mutex<Vec<Sample>>) {
    let mut conn = Conn::new(port);
    let period = Duration::from_secs(1) / RATE;
    let mut k = first;
    while !stop.load(Ordering::Relaxed) {
        let due = start + period * k;
        if due - start > LOAD_LIMIT {
            break;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let ok = matches!(conn.get(PAGES[k as usize % PAGES.len()]), Ok((200, _)));
        let ms = due.elapsed().as_secs_f64() * 1e3;
        out.lock().unwrap().push(Sample { due, ms, ok });
        k += CONNECTIONS;
    }
}

/// Where the unit's CPUWeight=20 comes from on this machine.
enum Confinement {
    /// PID 1 is not systemd: a cgroup v1 `cpu` group of ours, whose
    /// `cpu.shares` is set before each agent starts in it.
    CgroupV1(PathBuf),
    /// `systemd-run --scope -p CPUWeight=`.
    SystemdScope,
    /// Neither: CPUWeight is not applied (nice and ionice still are).
    Unavailable(String),
}

impl Confinement {
    fn detect() -> Confinement {
        if !nix::unistd::geteuid().is_root() {
            return Confinement::Unavailable("not root".into());
        }
        let pid1 = fs::read_to_string("/proc/1/comm").unwrap_or_default();
        if pid1.trim() == "systemd" && which("systemd-run") {
            return Confinement::SystemdScope;
        }
        let cpu = Path::new("/sys/fs/cgroup/cpu");
        if !cpu.join("cpu.shares").exists() {
            return Confinement::Unavailable(
                "PID 1 is not systemd and there is no cgroup v1 cpu controller".into(),
            );
        }
        let dir = cpu.join(format!("deploy-agent-bench-{}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => {
                leftovers().cgroups.push(dir.clone());
                Confinement::CgroupV1(dir)
            }
            Err(e) => Confinement::Unavailable(format!("cannot create {}: {e}", dir.display())),
        }
    }

    fn describe(&self) -> String {
        let how = match self {
            Confinement::CgroupV1(d) => format!(
                "CPUWeight as cgroup v1 cpu.shares in {} (web server and load at the default weight)",
                d.display()
            ),
            Confinement::SystemdScope => "CPUWeight through systemd-run --scope".into(),
            Confinement::Unavailable(why) => {
                format!("CPUWeight NOT applied ({why}); Nice and I/O priority are")
            }
        };
        format!("{how}; I/O schedulers: {}", io_schedulers())
    }

    /// How to start an agent with (`unit`) or without the unit's settings:
    /// without them it gets the default weight (CPUWeight=100, 1024 shares),
    /// as a service started by systemd without those lines would.
    fn launch(&self, unit: bool) -> Launch {
        let weight: u32 = if unit { 20 } else { 100 };
        let mut prefix: Vec<String> = match self {
            Confinement::CgroupV1(dir) => {
                let shares = (weight * 1024 + 50) / 100;
                fs::write(dir.join("cpu.shares"), shares.to_string()).unwrap();
                // The shell joins the group and execs the agent, so every
                // thread the agent starts is in it from the first.
                let join = format!("echo $$ > {}/cgroup.procs && exec \"$@\"", dir.display());
                vec!["sh".into(), "-c".into(), join, "sh".into()]
            }
            Confinement::SystemdScope => {
                let w = format!("CPUWeight={weight}");
                vec!["systemd-run", "--scope", "--quiet", "-p", &w]
                    .into_iter()
                    .map(String::from)
                    .collect()
            }
            Confinement::Unavailable(_) => vec![],
        };
        if unit {
            prefix.extend(["nice", "-n", "10", "ionice", "-c", "2", "-n", "7"].map(String::from));
        }
        Launch {
            name: if unit { "agent-unit" } else { "agent-plain" }.into(),
            prefix,
            quick_start: true,
            key: None,
            no_store: false,
        }
    }
}

/// Removes a cgroup of ours, moving anything left in it to the root first.
pub fn remove_cgroup(dir: &Path) {
    let root = dir.parent().unwrap_or(dir).join("cgroup.procs");
    for _ in 0..50 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = fs::write(&root, pid);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("could not remove the cgroup {}", dir.display());
}

/// What the kernel says process `pid` runs with: nice, I/O class, cgroup.
fn applied_settings(pid: i32) -> String {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 19 of stat(5); the split starts at field 3, after the name.
    let nice = stat
        .rsplit(") ")
        .next()
        .and_then(|r| r.split(' ').nth(16))
        .unwrap_or("?")
        .to_string();
    let io = Command::new("ionice")
        .args(["-p", &pid.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("ionice: {e}"));
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let cpu = cgroups
        .lines()
        .find_map(|l| l.split_once(":cpu:").map(|(_, p)| p.to_string()))
        .unwrap_or_else(|| "?".into());
    let shares = fs::read_to_string(format!("/sys/fs/cgroup/cpu{cpu}/cpu.shares"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("nice {nice}, I/O {io}, cpu cgroup {cpu} (cpu.shares {shares})")
}

/// "vda: mq-deadline, ..." for the disks (loop devices left out: they pass
/// the I/O on to their backing file's disk, and I/O priorities with it
/// only through the loop worker).
fn io_schedulers() -> String {
    let Ok(dir) = fs::read_dir("/sys/block") else {
        return "unknown".into();
    };
    let mut out: Vec<String> = dir
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| {
            let s = fs::read_to_string(e.path().join("queue/scheduler")).ok()?;
            let active = s.split('[').nth(1)?.split(']').next()?.to_string();
            Some(format!("{}: {active}", e.file_name().to_string_lossy()))
        })
        .collect();
    out.sort();
    out.join(", ")
}
