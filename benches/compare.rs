//! The comparison benchmark (issue 5): the real `deploy-agent` binary
//! against what a team would otherwise script (curl + sha256sum + tar), and
//! against the floors of the tools themselves, in one run.
//!
//! Run it with `cargo bench --bench compare -- [--small] [--dir D]
//! [--runs N] [--json out.json] [--publishes N] [--idle-secs S]
//! [--agent-config TOML]`
//! (docs/performance.md explains every row).
//!
//! Everything it creates lives under one work directory: a loop-mounted
//! journaled ext4 image when run as root without `--dir`, unmounted and
//! deleted at the end (also when a step panics: the guards below run while
//! unwinding). Killed with SIGKILL it leaves `/var/tmp/deploy-agent-bench-*`
//! mounted; `umount` and delete it by hand. Generated artifacts are cached
//! in `target/bench-artifacts/` so a second run skips the generation.
//! Every build is published with its file index (`release index`), as a
//! release engineer publishes it with `--index-url`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly by design

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deploy_agent::manifest::Format;
use serde_json::{json, Value};
use testkit::buildgen::{self, Artifact, BuildProfile};
use testkit::testserver::artifact::ArtifactServer;
use testkit::testserver::consul::{ConsulServer, ConsulServerConfig};

#[path = "compare/serving.rs"]
mod serving;

const KEY: &str = "deploy/bench/web";

struct Args {
    small: bool,
    dir: Option<PathBuf>,
    runs: usize,
    json: Option<PathBuf>,
    publishes: usize,
    idle_secs: u64,
    /// TOML appended to every agent's config (`--agent-config`), to compare
    /// settings such as `[unpack] writeback-every = 0` in the same harness.
    agent_config: String,
    /// Another `deploy-agent` binary (an older commit's) whose full deploy
    /// is timed in every round beside this one's (`--baseline-agent`).
    baseline: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        small: false,
        dir: None,
        runs: 5,
        json: None,
        publishes: 50,
        idle_secs: 60,
        agent_config: String::new(),
        baseline: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--small" => a.small = true,
            "--dir" => a.dir = Some(it.next().expect("--dir needs a path").into()),
            "--runs" => a.runs = it.next().expect("--runs N").parse().expect("--runs N"),
            "--json" => a.json = Some(it.next().expect("--json needs a path").into()),
            "--publishes" => a.publishes = it.next().expect("N").parse().expect("N"),
            "--idle-secs" => a.idle_secs = it.next().expect("S").parse().expect("S"),
            "--agent-config" => a.agent_config = it.next().expect("--agent-config TOML"),
            "--baseline-agent" => {
                a.baseline = Some(it.next().expect("--baseline-agent needs a path").into())
            }
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => panic!("unknown argument {other:?}; see docs/performance.md"),
        }
    }
    assert!(a.runs >= 1 && a.publishes >= 2);
    a
}

/// The runs of row `name`.
fn row_of(rows: &[(&str, Vec<f64>)], name: &str) -> Vec<f64> {
    rows.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// testkit's S3-compatible server with the artifacts directory as bucket
/// `bench` (a symlink) and a key file for the agents (`STORE_CONFIG`).
/// Returns the server and the main build's `s3://` URL.
async fn start_s3(art: &Path, work: &Path) -> (testkit::testserver::s3::S3Server, String) {
    let root = work.join("s3");
    fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink(art, root.join("bench")).unwrap();
    let keys = std::sync::Arc::new(testkit::testserver::s3::KeyRing::default());
    keys.add("AKIABENCH00000000001", "bench-secret");
    let server = testkit::testserver::s3::S3Server::start(&root, keys)
        .await
        .unwrap();
    // As a PutObject would have: else every GET hashes the whole object.
    server.record_etag("bench", "main.tar.gz").unwrap();
    let key_file = work.join("s3-credentials");
    fs::write(
        &key_file,
        "[default]\naws_access_key_id = AKIABENCH00000000001\naws_secret_access_key = bench-secret\n",
    )
    .unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    STORE_CONFIG
        .set(format!(
            "[store]\nendpoint = \"{}\"\npath-style = true\ncredentials-file = \"{}\"\n",
            server.endpoint(),
            key_file.display()
        ))
        .unwrap();
    eprintln!("S3-compatible server: {}", server.endpoint());
    (server, "s3://bench/main.tar.gz".to_string())
}

/// `--agent-config`: appended to every agent config this run writes.
static AGENT_CONFIG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// The `[store]` section pointing every agent at the benchmark's S3 server.
static STORE_CONFIG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn main() {
    let args = parse_args();
    AGENT_CONFIG.set(args.agent_config.clone()).unwrap();
    if !args.agent_config.is_empty() {
        println!("agent config added: {:?}", args.agent_config);
    }
    let is_root = nix::unistd::geteuid().is_root();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    ensure_tools(is_root);
    let agent_bin = build_agent();

    // ---- where ----
    let cleanup = Cleanup;
    rt.spawn(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("interrupted: cleaning up");
        clean_up_now();
        std::process::exit(130);
    });
    let work = match (&args.dir, is_root) {
        (Some(d), _) => {
            fs::create_dir_all(d).unwrap();
            let w = d.join(format!("deploy-agent-bench-{}", std::process::id()));
            fs::create_dir_all(&w).unwrap();
            leftovers().remove.push(w.clone());
            w
        }
        (None, true) => {
            let base = PathBuf::from(format!(
                "/var/tmp/deploy-agent-bench-{}",
                std::process::id()
            ));
            let img = base.join("fs.img");
            let mnt = base.join("mnt");
            fs::create_dir_all(&mnt).unwrap();
            leftovers().remove.push(base.clone());
            run(&format!(
                "truncate -s {} {img} && mkfs.ext4 -q -F {img} && mount -o loop {img} {mnt}",
                if args.small { "2G" } else { "8G" },
                img = img.display(),
                mnt = mnt.display()
            ));
            leftovers().mount = Some(mnt.clone());
            mnt
        }
        (None, false) => {
            eprintln!(
                "not root: no loop image; benchmarking in a temp dir under the current directory"
            );
            let w = std::env::current_dir()
                .unwrap()
                .join(format!("deploy-agent-bench-{}", std::process::id()));
            fs::create_dir_all(&w).unwrap();
            leftovers().remove.push(w.clone());
            w
        }
    };
    let fs_info = filesystem_of(&work);
    eprintln!("work dir {} on {fs_info}", work.display());

    // ---- what ----
    let profile = if args.small {
        BuildProfile::SMALL
    } else {
        BuildProfile::FULL
    };
    let art_dir = artifacts_dir(if args.small { "small" } else { "full" });
    let main_gz = cached_build(&art_dir, "main.tar.gz", profile, 1, "bench", Format::TarGz);
    let main_tar = cached_build(&art_dir, "main.tar", profile, 1, "bench", Format::Tar);
    let small_gz = (!args.small).then(|| {
        cached_build(
            &artifacts_dir("small"),
            "main.tar.gz",
            BuildProfile::SMALL,
            1,
            "bench",
            Format::TarGz,
        )
    });
    let tiny: Vec<Artifact> = (0..args.publishes)
        .map(|i| {
            let id = format!("r{i}");
            cached_build(
                &art_dir,
                &format!("tiny-{i}.tar.gz"),
                BuildProfile::TINY,
                7,
                &id,
                Format::TarGz,
            )
        })
        .collect();
    // The next build: 1% of its files differ from main's, and the delta to it.
    let main2_gz = cached_build(
        &art_dir,
        "main2.tar.gz",
        profile,
        1,
        "bench2",
        Format::TarGz,
    );
    let (delta_size, delta_sha, delta_shared) = cached_delta(
        &art_dir.join("main.tar.gz"),
        &art_dir.join("main2.tar.gz"),
        &art_dir.join("main2.delta.tar.zst"),
    );
    if small_gz.is_some() {
        // Served from the same root as the main build.
        fs::copy(
            artifacts_dir("small").join("main.tar.gz"),
            art_dir.join("small.tar.gz"),
        )
        .unwrap();
    }
    // Every build is published with its file index, as `release publish
    // --index-url` does: the records get their digests from it.
    let mut indexes = std::collections::HashMap::new();
    for (name, a) in [("main.tar.gz", &main_gz), ("main2.tar.gz", &main2_gz)]
        .into_iter()
        .chain(small_gz.as_ref().map(|s| ("small.tar.gz", s)))
    {
        indexes.insert(a.sha256.clone(), cached_index(&art_dir, name, a));
    }
    eprintln!(
        "build: {} entries, {} MB tar, {} MB tar.gz",
        main_gz.entries,
        main_tar.size / 1_000_000,
        main_gz.size / 1_000_000
    );

    // ---- served from ----
    let server = Server::start(&art_dir, &work);
    eprintln!("artifact server: {}", server.name());
    let url = server.url("/main.tar.gz");
    let (_s3, s3_url) = rt.block_on(start_s3(&art_dir, &work));
    let consul = rt
        .block_on(ConsulServer::start(ConsulServerConfig::default()))
        .unwrap();

    // ---- the agent ----
    let mut agent = Agent::start(&agent_bin, &work, &consul, 4);
    // A Cell, so the id of the last deploy can be read while the closure
    // that counts them lives.
    let deploy_no = std::cell::Cell::new(0usize);
    let mut deploy = |agent: &mut Agent, url: &str, a: &Artifact| {
        deploy_no.set(deploy_no.get() + 1);
        let id = format!("m{}", deploy_no.get());
        let m = buildgen::manifest_json(&id, url, a, Format::TarGz);
        let m = with_index(m, url, indexes.get(&a.sha256));
        agent.deploy(&consul, &id, m)
    };
    let url2 = server.url("/main2.tar.gz");
    let delta_json = json!({"base": main_gz.sha256, "url": server.url("/main2.delta.tar.zst"),
                            "sha256": delta_sha, "size": delta_size});
    // Warm-up: both slots hold a build afterwards, so every timed deploy
    // replaces an old slot as in production.
    deploy(&mut agent, &url, &main_gz);
    deploy(&mut agent, &url, &main_gz);
    // The baseline binary, on its own key and deploy root, idle while the
    // other agent works.
    let mut before = args.baseline.as_ref().map(|bin| {
        let launch = Launch {
            name: "agent-before".into(),
            prefix: vec![],
            quick_start: true,
            key: Some("deploy/bench/before".into()),
            no_store: true,
        };
        let w = work.join("before");
        fs::create_dir_all(&w).unwrap();
        Agent::start_with(bin, &w, &consul, 4, &launch)
    });
    if let Some(b) = before.as_mut() {
        deploy(b, &url, &main_gz);
        deploy(b, &url, &main_gz);
    }

    let diy = work.join("diy");
    fs::create_dir_all(&diy).unwrap();
    let gz_path = art_dir.join("main.tar.gz");
    let tar_path = art_dir.join("main.tar");
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("agent", vec![]),
        ("diy_sequential", vec![]),
        ("diy_pipelined", vec![]),
        ("floor_curl", vec![]),
        ("floor_sha256sum", vec![]),
        ("floor_gunzip", vec![]),
        ("floor_tar_xf_syncfs", vec![]),
        ("agent_delta", vec![]),
        ("agent_s3", vec![]),
        ("agent_baseline", vec![]),
        ("agent_rollback_full", vec![]),
    ];
    let mut agent_rss = vec![];
    let (mut delta_rss, mut delta_written, mut delta_sent) = (vec![], vec![], vec![]);
    // Every timed step starts alike: nothing dirty, the artifacts in the
    // page cache (they are served from it in production too).
    let prime = || {
        run(&format!(
            "sync && cat {} {} {} >/dev/null",
            art_dir.join("main.tar.gz").display(),
            art_dir.join("main.tar").display(),
            art_dir.join("main2.delta.tar.zst").display()
        ))
    };
    // Round-robin, so that load from other processes hits every row alike.
    for r in 0..args.runs {
        eprintln!("run {}/{}", r + 1, args.runs);
        prime();
        let (t, rss) = deploy(&mut agent, &url, &main_gz);
        rows[0].1.push(t.as_secs_f64());
        agent_rss.push(rss);
        if let Some(b) = before.as_mut() {
            prime();
            rows[9].1.push(deploy(b, &url, &main_gz).0.as_secs_f64());
        }
        // The same deploy from the S3-compatible server: signed ranged GETs.
        prime();
        rows[8]
            .1
            .push(deploy(&mut agent, &s3_url, &main_gz).0.as_secs_f64());
        // What a rollback to it after the delta deploy below publishes:
        // the same manifest again.
        let full_id = format!("m{}", deploy_no.get());
        let full_manifest = with_index(
            buildgen::manifest_json(&full_id, &s3_url, &main_gz, Format::TarGz),
            &s3_url,
            indexes.get(&main_gz.sha256),
        );
        // The delta deploy: main is live, main2 is published with its delta.
        prime();
        let sent_before = server.bytes_sent();
        let id = format!("d{r}");
        let mut m2: Value = serde_json::from_str(&with_index(
            buildgen::manifest_json(&id, &url2, &main2_gz, Format::TarGz),
            &url2,
            indexes.get(&main2_gz.sha256),
        ))
        .unwrap();
        m2["delta"] = delta_json.clone();
        let (t, rss) = agent.deploy(&consul, &id, m2.to_string());
        rows[7].1.push(t.as_secs_f64());
        delta_rss.push(rss);
        delta_sent.push(server.bytes_sent().saturating_sub(sent_before));
        delta_written.push(agent.log.last_field("written").unwrap_or(f64::NAN));
        // The rollback to the full build in the cold slot: the key set back,
        // the 40,000-file slot checked against its record, the flip.
        prime();
        let (t, _) = agent.deploy(&consul, &full_id, full_manifest);
        rows[10].1.push(t.as_secs_f64());
        prime();
        let slot = fresh(&diy.join("slot"));
        let seq = format!(
            "curl -sf -o {d}/a.tgz {url} && echo '{sha}  {d}/a.tgz' | sha256sum -c --quiet \
             && tar xzf {d}/a.tgz -C {slot} && sync && ln -sfn {slot} {d}/cur.tmp && mv -T {d}/cur.tmp {d}/current",
            d = diy.display(),
            sha = main_gz.sha256,
            slot = slot.display()
        );
        rows[1].1.push(timed(&seq));
        settle(&[&slot, &diy.join("a.tgz")]);
        prime();
        let slot = fresh(&diy.join("slot"));
        let pipe = format!(
            "set -o pipefail; curl -sf {url} | tee >(sha256sum > {d}/sum) | tar xz -C {slot} && wait $! && sync \
             && grep -q {sha} {d}/sum && ln -sfn {slot} {d}/cur.tmp && mv -T {d}/cur.tmp {d}/current",
            d = diy.display(),
            sha = main_gz.sha256,
            slot = slot.display()
        );
        rows[2].1.push(timed(&pipe));
        settle(&[&slot]);
        prime();
        rows[3]
            .1
            .push(timed(&format!("curl -sf -o /dev/null {url}")));
        rows[4].1.push(timed(&format!(
            "sha256sum {} >/dev/null",
            gz_path.display()
        )));
        rows[5]
            .1
            .push(timed(&format!("gzip -dc {} >/dev/null", gz_path.display())));
        prime();
        let slot = fresh(&diy.join("slot"));
        rows[6].1.push(timed(&format!(
            "tar -xf {} -C {s} && sync -f {s}",
            tar_path.display(),
            s = slot.display()
        )));
        settle(&[&slot]);
    }

    // ---- memory: does it stream? ----
    let small_rss = small_gz.as_ref().map(|s| {
        let u = server.url("/small.tar.gz");
        (0..args.runs)
            .map(|_| deploy(&mut agent, &u, s).1)
            .collect::<Vec<_>>()
    });

    // ---- 1 Gbit/s per connection: 4 ranges vs 1 stream ----
    let limited = server.limited_url("/main.tar.gz").map(|u| {
        let four: Vec<f64> = (0..args.runs)
            .map(|_| {
                deploy(&mut agent, &u, &main_gz);
                agent.log.last_field("download_ms").unwrap() / 1000.0
            })
            .collect();
        (u, four)
    });

    // ---- reaction: key write -> first artifact request ----
    let mut reaction = vec![];
    for (i, a) in tiny.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(250)); // let the watch's bucket refill
        agent.wait_idle();
        let before = server.requests_seen();
        let written = SystemTime::now();
        let t0 = Instant::now();
        agent.publish(
            &consul,
            &format!("r{i}"),
            &server.url(&format!("/tiny-{i}.tar.gz")),
            a,
        );
        let first = server.first_request_after(before, written, t0);
        agent.wait_build(&format!("r{i}"));
        reaction.push(first.as_secs_f64());
    }

    // ---- rollback: the build in the cold slot, by setting the key back ----
    let n = tiny.len();
    let mut rollback = vec![];
    let requests_before = server.requests_seen();
    for j in 0..args.publishes {
        std::thread::sleep(Duration::from_millis(250));
        agent.wait_idle();
        let i = if j % 2 == 0 { n - 2 } else { n - 1 };
        let old = fs::read_link(agent.root.join("current")).unwrap();
        let t0 = Instant::now();
        agent.publish(
            &consul,
            &format!("r{i}"),
            &server.url(&format!("/tiny-{i}.tar.gz")),
            &tiny[i],
        );
        while fs::read_link(agent.root.join("current")).unwrap() == old {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "rollback never flipped"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        rollback.push(t0.elapsed().as_secs_f64());
        agent.wait_build(&format!("r{i}"));
    }
    let rollback_downloads = server.requests_seen() - requests_before;

    // ---- flips, as the agent logged them ----
    let agent_flips = agent.log.flips();
    let swapper_flips = swapper_flips(&work.join("flips"), 200);

    // ---- idle cost ----
    std::thread::sleep(Duration::from_secs(2));
    let cpu0 = agent.cpu_ticks();
    let req0 = consul.request_count();
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let idle_cpu_ticks = agent.cpu_ticks() - cpu0;
    let idle_requests = consul.request_count() - req0;
    let idle_rss = agent.status_kib("VmRSS");
    agent.stop();

    let one_range = limited.as_ref().map(|(u, _)| {
        let mut a1 = Agent::start(&agent_bin, &work, &consul, 1);
        let v: Vec<f64> = (0..args.runs)
            .map(|_| {
                deploy(&mut a1, u, &main_gz);
                a1.log.last_field("download_ms").unwrap() / 1000.0
            })
            .collect();
        a1.stop();
        v
    });

    // ---- serving impact: nginx p99 during a deploy, with the unit's settings and without ----
    let serving = serving::measure(
        &serving::Ctx {
            bin: &agent_bin,
            work: &work,
            consul: &consul,
            builds: [
                (url.clone(), &main_gz, "bench"),
                (url2.clone(), &main2_gz, "bench2"),
            ],
            prime: &prime,
        },
        args.runs,
        &mut deploy,
    );

    // ---- report ----
    let med = |v: &[f64]| median(v);
    let m: Vec<(String, f64)> = rows.iter().map(|(n, v)| (n.to_string(), med(v))).collect();
    let get = |name: &str| m.iter().find(|(n, _)| n == name).unwrap().1;
    let floor = [
        "floor_curl",
        "floor_sha256sum",
        "floor_gunzip",
        "floor_tar_xf_syncfs",
    ]
    .iter()
    .map(|n| get(n))
    .fold(0.0, f64::max);
    let agent_t = get("agent");
    let peak_rss = agent_rss.iter().copied().max().unwrap_or(0);
    println!();
    println!(
        "deploy-agent comparison: {} entries, {:.0} MB tar, {:.0} MB tar.gz; server {}; {}; median of {} runs",
        main_gz.entries,
        main_tar.size as f64 / 1e6,
        main_gz.size as f64 / 1e6,
        server.name(),
        fs_info,
        args.runs
    );
    println!("| Path | Durable time (s, median) | all runs |");
    println!("|---|---|---|");
    for (name, v) in &rows {
        println!(
            "| {name} | {:.3} | {} |",
            med(v),
            v.iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!("| tool floor (slowest floor) | {floor:.3} | |");
    println!(
        "\nfull deploy from S3 (s3s test server, presigned ranged GETs) / from HTTP ({}): {:.2} {}",
        server.name(),
        get("agent_s3") / agent_t,
        spread(&row_of(&rows, "agent_s3"), &row_of(&rows, "agent"))
    );
    println!();
    let ratio = |x: f64| agent_t / x;
    println!("| Target | Measured | Goal | Met |");
    println!("|---|---|---|---|");
    let mut targets = vec![];
    let mut target = |name: &str, measured: String, goal: &str, met: bool| {
        println!(
            "| {name} | {measured} | {goal} | {} |",
            if met { "yes" } else { "NO" }
        );
        targets.push(json!({"target": name, "measured": measured, "goal": goal, "met": met}));
    };
    let r_seq = ratio(get("diy_sequential"));
    let r_pipe = ratio(get("diy_pipelined"));
    let r_floor = ratio(floor);
    let row = |name: &str| rows.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    // The floor of each run: its slowest tool, measured in the same round.
    let floor_runs: Vec<f64> = (0..args.runs)
        .map(|i| {
            [
                "floor_curl",
                "floor_sha256sum",
                "floor_gunzip",
                "floor_tar_xf_syncfs",
            ]
            .iter()
            .map(|n| row(n)[i])
            .fold(0.0, f64::max)
        })
        .collect();
    let agent_runs = row("agent");
    target(
        "agent / DIY sequential",
        format!("{r_seq:.2} {}", spread(&agent_runs, &row("diy_sequential"))),
        "<= 0.45",
        r_seq <= 0.45,
    );
    target(
        "agent / DIY pipelined",
        format!("{r_pipe:.2} {}", spread(&agent_runs, &row("diy_pipelined"))),
        "<= 0.55",
        r_pipe <= 0.55,
    );
    target(
        "agent / tool floor",
        format!("{r_floor:.2} {}", spread(&agent_runs, &floor_runs)),
        "<= 0.85",
        r_floor <= 0.85,
    );
    let delta_runs = row("agent_delta");
    let r_delta = med(&delta_runs) / agent_t;
    target(
        "delta deploy (1% of files changed) / full deploy",
        format!("{r_delta:.2} {}", spread(&delta_runs, &agent_runs)),
        "<= 0.15",
        r_delta <= 0.15,
    );
    let baseline_runs = row("agent_baseline");
    let r_today = med(&agent_runs) / med(&baseline_runs);
    if !baseline_runs.is_empty() {
        target(
            "full deploy / the --baseline-agent's full deploy",
            format!("{r_today:.2} {}", spread(&agent_runs, &baseline_runs)),
            "<= 1.03",
            r_today <= 1.03,
        );
    }
    let rollback_full = row("agent_rollback_full");
    let worst = rollback_full.iter().copied().fold(0.0, f64::max);
    target(
        &format!(
            "rollback to the full build in the cold slot, key write -> flipped (slowest of {})",
            rollback_full.len()
        ),
        format!(
            "{:.1} ms (median {:.1})",
            worst * 1e3,
            med(&rollback_full) * 1e3
        ),
        "<= 50 ms",
        worst <= 0.050,
    );
    let sent = med(&delta_sent.iter().map(|b| *b as f64).collect::<Vec<_>>());
    let r_bytes = sent / main2_gz.size as f64;
    target(
        "delta: bytes downloaded / full artifact",
        format!(
            "{r_bytes:.3} ({:.1} of {:.1} MB)",
            sent / 1e6,
            main2_gz.size as f64 / 1e6
        ),
        "<= 0.05",
        r_bytes <= 0.05,
    );
    let written = med(&delta_written);
    let r_written = written / main2_gz.entries as f64;
    target(
        "delta: files written (not reused from the base) / entries",
        format!(
            "{r_written:.3} ({written:.0} of {}; {delta_shared} reused)",
            main2_gz.entries
        ),
        "<= 0.03",
        r_written <= 0.03,
    );
    let peak_delta = delta_rss.iter().copied().max().unwrap_or(0);
    target(
        "peak RSS during a delta deploy",
        format!("{:.1} MiB", peak_delta as f64 / 1024.0),
        "<= 64 MiB",
        peak_delta <= 64 * 1024,
    );
    target(
        "peak RSS during a deploy",
        format!("{:.1} MiB", peak_rss as f64 / 1024.0),
        "<= 64 MiB",
        peak_rss <= 64 * 1024,
    );
    if let Some(s) = &small_rss {
        let sp = s.iter().copied().max().unwrap_or(0);
        let growth = peak_rss as f64 / sp.max(1) as f64;
        target(
            "peak RSS, full / small build",
            format!(
                "{:.2} ({:.1} / {:.1} MiB)",
                growth,
                peak_rss as f64 / 1024.0,
                sp as f64 / 1024.0
            ),
            "<= 1.10",
            growth <= 1.10,
        );
    }
    target(
        "idle RSS",
        format!("{:.1} MiB", idle_rss as f64 / 1024.0),
        "<= 16 MiB",
        idle_rss <= 16 * 1024,
    );
    let allowed_requests = args.idle_secs / 20 + 1;
    target(
        &format!("idle: Consul requests in {} s (wait 20s)", args.idle_secs),
        idle_requests.to_string(),
        &format!("<= {allowed_requests}"),
        (idle_requests as u64) <= allowed_requests,
    );
    target(
        &format!("idle: CPU ticks in {} s", args.idle_secs),
        format!(
            "{idle_cpu_ticks} ({} ms)",
            idle_cpu_ticks * 1000 / clk_tck()
        ),
        "~0 (<= 1 tick per request)",
        idle_cpu_ticks <= idle_requests as u64 + 1,
    );
    let p99r = percentile(&reaction, 0.99);
    target(
        &format!(
            "reaction p99, key write -> first artifact request ({} publishes)",
            reaction.len()
        ),
        format!(
            "{:.1} ms (p50 {:.1})",
            p99r * 1e3,
            percentile(&reaction, 0.5) * 1e3
        ),
        "<= 50 ms",
        p99r <= 0.050,
    );
    let p99f = percentile(&swapper_flips, 0.99);
    target(
        "flip p99 (swapper, dir fsync included, 200 flips 20 ms apart)",
        format!(
            "{:.3} ms (p50 {:.3})",
            p99f * 1e3,
            percentile(&swapper_flips, 0.5) * 1e3
        ),
        "<= 1 ms",
        p99f <= 0.001,
    );
    let p99af = percentile(&agent_flips, 0.99);
    target(
        &format!("flip p99 (agent log, {} flips)", agent_flips.len()),
        format!(
            "{:.3} ms (p50 {:.3})",
            p99af * 1e3,
            percentile(&agent_flips, 0.5) * 1e3
        ),
        "<= 1 ms",
        p99af <= 0.001,
    );
    let p99rb = percentile(&rollback, 0.99);
    target(
        &format!(
            "rollback p99, key write -> flipped ({} publishes)",
            rollback.len()
        ),
        format!(
            "{:.1} ms (p50 {:.1}), {} artifact requests",
            p99rb * 1e3,
            percentile(&rollback, 0.5) * 1e3,
            rollback_downloads
        ),
        "<= 100 ms, none",
        p99rb <= 0.100 && rollback_downloads == 0,
    );
    let mut limited_json = Value::Null;
    if let (Some((_, four)), Some(one)) = (&limited, &one_range) {
        let x = med(one) / med(four);
        target(
            "download at 1 Gbit/s per connection: 1 stream / 4 ranges",
            format!("{x:.2}x ({:.2} s / {:.2} s)", med(one), med(four)),
            ">= 2.5x",
            x >= 2.5,
        );
        limited_json = json!({"one_stream_s": one, "four_ranges_s": four, "speedup": x});
    } else {
        println!("| download at 1 Gbit/s per connection | not measured (needs nginx limit_rate) | >= 2.5x | - |");
    }
    let serving_json = match &serving {
        Some(s) => s.report(&mut target),
        None => {
            println!("| web p99 during deploy / idle | not measured (nginx did not start) | <= 2.0 | - |");
            Value::Null
        }
    };
    let out = json!({
        "build": {"entries": main_gz.entries, "tar_bytes": main_tar.size, "tar_gz_bytes": main_gz.size,
                  "profile": if args.small { "small" } else { "full" }},
        "server": server.name(),
        "filesystem": fs_info,
        "runs": args.runs,
        "seconds": rows.iter().map(|(n, v)| (n.to_string(), json!({"median": med(v), "runs": v}))).collect::<serde_json::Map<_, _>>(),
        "tool_floor_s": floor,
        "ratios": {"agent_over_diy_sequential": r_seq, "agent_over_diy_pipelined": r_pipe, "agent_over_tool_floor": r_floor,
                   "delta_over_full": r_delta, "delta_bytes_over_full": r_bytes, "delta_written_over_entries": r_written},
        "delta": {"size": delta_size, "shared": delta_shared, "bytes_sent": delta_sent, "written": delta_written, "peak_rss_kib": delta_rss},
        "agent_peak_rss_kib": agent_rss,
        "agent_peak_rss_small_kib": small_rss,
        "idle": {"seconds": args.idle_secs, "consul_requests": idle_requests, "cpu_ticks": idle_cpu_ticks, "rss_kib": idle_rss},
        "reaction_s": reaction,
        "rollback_s": rollback,
        "rollback_artifact_requests": rollback_downloads,
        "flip_swapper_s": {"p50": percentile(&swapper_flips, 0.5), "p99": p99f},
        "flip_agent_s": {"p50": percentile(&agent_flips, 0.5), "p99": p99af, "n": agent_flips.len()},
        "limited_download": limited_json,
        "serving": serving_json,
        "targets": targets,
    });
    if let Some(p) = &args.json {
        fs::write(p, serde_json::to_string_pretty(&out).unwrap()).unwrap();
        eprintln!("wrote {}", p.display());
    }
    drop(server);
    drop(cleanup);
}

// ---- helpers ----

/// The per-run ratios `num[i] / den[i]` (rows measured in the same round)
/// as `(min-max)`, printed next to the ratio of medians.
fn spread(num: &[f64], den: &[f64]) -> String {
    let r: Vec<f64> = num.iter().zip(den).map(|(a, b)| a / b).collect();
    let min = r.iter().copied().fold(f64::INFINITY, f64::min);
    let max = r.iter().copied().fold(0.0, f64::max);
    format!("({min:.2}-{max:.2} over {} runs)", r.len())
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// Nearest-rank percentile.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn run(cmd: &str) {
    let st = Command::new("bash").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "failed: {cmd}");
}

fn timed(cmd: &str) -> f64 {
    let t = Instant::now();
    run(cmd);
    t.elapsed().as_secs_f64()
}

/// An empty directory at `p` (deleting what was there, untimed).
fn fresh(p: &Path) -> PathBuf {
    if p.exists() {
        fs::remove_dir_all(p).unwrap();
    }
    fs::create_dir_all(p).unwrap();
    p.to_path_buf()
}

/// Deletes what a timed step left and lets the filesystem settle, so the
/// next step does not pay for it.
fn settle(paths: &[&Path]) {
    for p in paths {
        if p.is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else if p.exists() {
            fs::remove_file(p).unwrap();
        }
    }
    run("sync");
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn which(tool: &str) -> bool {
    Command::new("bash")
        .arg("-c")
        .arg(format!("command -v {tool} || test -x /usr/sbin/{tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Installs what the run needs from Debian's packages when missing (as
/// root); nginx is optional (the project's artifact server stands in).
fn ensure_tools(is_root: bool) {
    let wanted = [
        ("curl", "curl"),
        ("mkfs.ext4", "e2fsprogs"),
        ("nginx", "nginx-light"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(tool, _)| !which(tool))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return;
    }
    if is_root {
        eprintln!("installing {missing:?} with apt-get");
        let _ = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "(apt-get install -y -qq {m} || (apt-get update -qq && apt-get install -y -qq {m})) >/dev/null 2>&1",
                m = missing.join(" ")
            ))
            .status();
    }
    assert!(which("curl"), "curl is needed");
}

/// The release agent binary: the bench is a target of the agent package, so
/// Cargo built it for this run.
fn build_agent() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_deploy-agent"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| deploy_agent_tests::repo_root().join("target"))
}

fn artifacts_dir(profile: &str) -> PathBuf {
    let d = target_dir().join("bench-artifacts").join(profile);
    fs::create_dir_all(&d).unwrap();
    // nginx workers read it.
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Bumped when the build generator's output changes, so cached builds of
/// an older generator are made again.
const GENERATOR: u64 = 2;

/// The file index of `<art_dir>/<name>` (what `release index` writes),
/// made once per artifact: its sha256 and size for the manifest.
fn cached_index(art_dir: &Path, name: &str, a: &Artifact) -> (String, u64) {
    use deploy_agent::integrity::FileIndex;
    let out = art_dir.join(format!("{name}.index.json.zst"));
    let artifact_sha: deploy_agent::manifest::Sha256Sum = a.sha256.parse().unwrap();
    if FileIndex::load(&out, &artifact_sha).is_err() {
        eprintln!("generating {}", out.display());
        FileIndex::of_artifact(&art_dir.join(name), Format::TarGz)
            .unwrap()
            .write(&out)
            .unwrap();
    }
    let (sha, size) = deploy_agent::artifact::sha256::hash_file(&out).unwrap();
    (sha.to_string(), size)
}

/// `manifest` for an artifact at `url`, with its file index beside it at
/// `<url>.index.json.zst`, as `release publish --index-url` writes it.
fn with_index(manifest: String, url: &str, index: Option<&(String, u64)>) -> String {
    let Some((sha, size)) = index else {
        return manifest;
    };
    let mut v: Value = serde_json::from_str(&manifest).unwrap();
    v["index"] = json!({"url": format!("{url}.index.json.zst"), "sha256": sha, "size": size});
    v.to_string()
}

/// The delta from `base` to `target` (both tar.gz), made once.
fn cached_delta(base: &Path, target: &Path, out: &Path) -> (u64, String, u64) {
    let meta = out.with_extension("json");
    if let (true, Ok(m)) = (out.exists(), fs::read(&meta)) {
        let v: Value = serde_json::from_slice(&m).unwrap();
        if v["generator"] == GENERATOR {
            return (
                v["size"].as_u64().unwrap(),
                v["sha256"].as_str().unwrap().into(),
                v["shared"].as_u64().unwrap(),
            );
        }
    }
    eprintln!("generating {}", out.display());
    let info =
        deploy_agent::unpack::delta::write((base, Format::TarGz), (target, Format::TarGz), out)
            .unwrap();
    fs::write(
        &meta,
        json!({"size": info.size, "sha256": info.sha256.as_str(), "shared": info.shared,
               "generator": GENERATOR})
        .to_string(),
    )
    .unwrap();
    (info.size, info.sha256.to_string(), info.shared)
}

/// Generates a build once; later runs read its description back.
fn cached_build(
    dir: &Path,
    name: &str,
    profile: BuildProfile,
    seed: u64,
    id: &str,
    format: Format,
) -> Artifact {
    let path = dir.join(name);
    let meta = dir.join(format!("{name}.json"));
    if let (true, Ok(m)) = (path.exists(), fs::read(&meta)) {
        let v: Value = serde_json::from_slice(&m).unwrap();
        if v["profile"] == format!("{profile:?}") && v["generator"] == GENERATOR {
            return Artifact {
                sha256: v["sha256"].as_str().unwrap().into(),
                size: v["size"].as_u64().unwrap(),
                entries: v["entries"].as_u64().unwrap(),
                unpacked_bytes: v["unpacked_bytes"].as_u64().unwrap(),
            };
        }
    }
    eprintln!("generating {}", path.display());
    // Half a percent of the sources change per build id: two builds differ
    // in about 1% of their files, as consecutive deploys of a monolith.
    let a = buildgen::write_build_changing(profile, seed, id, format, &path, 0.005).unwrap();
    fs::write(
        &meta,
        json!({"profile": format!("{profile:?}"), "sha256": a.sha256, "size": a.size,
               "entries": a.entries, "unpacked_bytes": a.unpacked_bytes, "generator": GENERATOR})
        .to_string(),
    )
    .unwrap();
    a
}

/// "ext4 (journaled, /dev/loop0)" for the filesystem holding `p`.
fn filesystem_of(p: &Path) -> String {
    let p = fs::canonicalize(p).unwrap();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut best: Option<(usize, String, String)> = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let mnt = f[4];
        if p.starts_with(mnt) && best.as_ref().is_none_or(|b| mnt.len() > b.0) {
            best = Some((mnt.len(), f[dash + 1].to_string(), f[dash + 2].to_string()));
        }
    }
    let Some((_, fstype, dev)) = best else {
        return "unknown filesystem".into();
    };
    let journal = if fstype.starts_with("ext") {
        let out = Command::new("dumpe2fs")
            .args(["-h", &dev])
            .stderr(Stdio::null())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let jbd2 = Path::new(&dev)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .and_then(|n| {
                fs::read_dir("/proc/fs/jbd2").ok().map(|d| {
                    d.flatten().any(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{n}-"))
                    })
                })
            })
            .unwrap_or(false);
        if out.contains("has_journal") || jbd2 {
            "journaled"
        } else if out.contains("Filesystem features") {
            "NOT journaled"
        } else {
            "journal unknown"
        }
    } else if fstype == "tmpfs" {
        "memory, no journal"
    } else {
        "journal unknown"
    };
    format!("{fstype} ({journal}, {dev})")
}

/// Processes, mounts and directories to remove at the end: when `main`
/// returns, while a panic unwinds, and on SIGINT/SIGTERM.
#[derive(Default)]
struct Leftovers {
    pids: Vec<i32>,
    mount: Option<PathBuf>,
    remove: Vec<PathBuf>,
    /// cgroup v1 directories made for the serving-impact row.
    cgroups: Vec<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    pids: Vec::new(),
    mount: None,
    remove: Vec::new(),
    cgroups: Vec::new(),
});

fn leftovers() -> std::sync::MutexGuard<'static, Leftovers> {
    LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner())
}

fn clean_up_now() {
    let (pids, mount, remove, cgroups) = {
        let mut l = leftovers();
        (
            std::mem::take(&mut l.pids),
            l.mount.take(),
            std::mem::take(&mut l.remove),
            std::mem::take(&mut l.cgroups),
        )
    };
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if !pids.is_empty() {
        std::thread::sleep(Duration::from_millis(500));
    }
    for cg in cgroups {
        serving::remove_cgroup(&cg);
    }
    if let Some(m) = mount {
        let ok = Command::new("umount")
            .arg(&m)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
    for p in remove {
        let _ = fs::remove_dir_all(&p);
    }
}

/// Calls [`clean_up_now`] when dropped.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        clean_up_now();
    }
}

/// A child process stopped when dropped.
struct Proc(Child);

impl Proc {
    fn new(child: Child) -> Proc {
        leftovers().pids.push(child.id() as i32);
        Proc(child)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let raw = self.0.id() as i32;
        let pid = nix::unistd::Pid::from_raw(raw);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !exited {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
        leftovers().pids.retain(|p| *p != raw);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs nginx with `conf` (written to `dir/nginx.conf`, prefix `dir`) and
/// waits until it accepts on `port`; None when it does not start.
fn spawn_nginx(dir: &Path, conf: &str, port: u16) -> Option<Proc> {
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).unwrap();
    let nginx = if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    };
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(dir)
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let proc = Proc::new(child);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(proc);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

enum Server {
    Nginx {
        _proc: Proc,
        port: u16,
        log: PathBuf,
    },
    Own(ArtifactServer),
}

impl Server {
    fn start(art: &Path, work: &Path) -> Server {
        if which("nginx") {
            let dir = work.join("nginx");
            fs::create_dir_all(dir.join("tmp")).unwrap();
            let port = free_port();
            let log = dir.join("access.log");
            let conf = format!(
                r#"worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log;
daemon off;
events {{ worker_connections 256; }}
http {{
  log_format bench '$msec $request_time $status $request_uri $body_bytes_sent';
  access_log {log} bench;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  sendfile on; tcp_nopush on; keepalive_timeout 30;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {art};
    location /limited/ {{ alias {art}/; limit_rate 125m; }}
  }}
}}
"#,
                d = dir.display(),
                log = log.display(),
                art = art.display()
            );
            if let Some(proc) = spawn_nginx(&dir, &conf, port) {
                return Server::Nginx {
                    _proc: proc,
                    port,
                    log,
                };
            }
            eprintln!("nginx did not start; using the project's artifact server");
        }
        let s = futures_block(ArtifactServer::start_with_dir(art.to_path_buf())).unwrap();
        Server::Own(s)
    }

    fn name(&self) -> &'static str {
        match self {
            Server::Nginx { .. } => "nginx (Debian package), loopback",
            Server::Own(_) => "the project's artifact server (nginx not available), loopback",
        }
    }

    fn url(&self, path: &str) -> String {
        match self {
            Server::Nginx { port, .. } => format!("http://127.0.0.1:{port}{path}"),
            Server::Own(s) => s.url(path),
        }
    }

    fn limited_url(&self, path: &str) -> Option<String> {
        match self {
            Server::Nginx { port, .. } => Some(format!("http://127.0.0.1:{port}/limited{path}")),
            Server::Own(_) => None,
        }
    }

    /// Requests answered so far (nginx: access log lines).
    /// Body bytes sent so far.
    fn bytes_sent(&self) -> u64 {
        match self {
            Server::Nginx { log, .. } => fs::read_to_string(log)
                .map(|s| {
                    s.lines()
                        .filter_map(|l| l.split_whitespace().nth(4)?.parse::<u64>().ok())
                        .sum()
                })
                .unwrap_or(0),
            Server::Own(s) => s.stats().bytes_sent,
        }
    }

    fn requests_seen(&self) -> usize {
        match self {
            Server::Nginx { log, .. } => fs::read_to_string(log)
                .map(|s| s.lines().count())
                .unwrap_or(0),
            Server::Own(s) => s.stats().requests as usize,
        }
    }

    /// How long after the key write (`written` / `t0`) the first request
    /// after the first `before` ones arrived.
    fn first_request_after(&self, before: usize, written: SystemTime, t0: Instant) -> Duration {
        let deadline = Duration::from_secs(60);
        match self {
            Server::Nginx { log, .. } => loop {
                assert!(t0.elapsed() < deadline, "no artifact request after publish");
                let text = fs::read_to_string(log).unwrap_or_default();
                // nginx logs when a response ends: start = $msec - $request_time.
                let starts: Vec<f64> = text
                    .lines()
                    .skip(before)
                    .filter_map(|l| {
                        let mut f = l.split(' ');
                        let end: f64 = f.next()?.parse().ok()?;
                        let took: f64 = f.next()?.parse().ok()?;
                        Some(end - took)
                    })
                    .collect();
                if let Some(first) = starts.iter().copied().reduce(f64::min) {
                    let w = written.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
                    return Duration::from_secs_f64((first - w).max(0.0));
                }
                std::thread::sleep(Duration::from_millis(2));
            },
            Server::Own(s) => loop {
                assert!(t0.elapsed() < deadline, "no artifact request after publish");
                if s.stats().requests as usize > before {
                    return t0.elapsed();
                }
                std::thread::sleep(Duration::from_micros(200));
            },
        }
    }
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(f)
}

/// The agent's JSON log, read incrementally.
struct AgentLog {
    path: PathBuf,
    offset: u64,
    lines: Vec<Value>,
}

impl AgentLog {
    fn poll(&mut self) {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return;
        };
        f.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut buf = String::new();
        f.read_to_string(&mut buf).unwrap();
        // Only whole lines.
        let Some(end) = buf.rfind('\n') else {
            return;
        };
        self.offset += end as u64 + 1;
        for line in BufReader::new(&buf.as_bytes()[..end]).lines() {
            if let Ok(v) = serde_json::from_str::<Value>(&line.unwrap()) {
                self.lines.push(v);
            }
        }
    }

    fn all_fields(&mut self, field: &str) -> Vec<f64> {
        self.poll();
        self.lines
            .iter()
            .filter_map(|v| v[field].as_f64())
            .collect()
    }

    /// `took_us` of every "flip complete" line, in seconds.
    fn flips(&mut self) -> Vec<f64> {
        self.poll();
        self.lines
            .iter()
            .filter(|v| v["message"] == "flip complete")
            .filter_map(|v| v["took_us"].as_f64())
            .map(|us| us / 1e6)
            .collect()
    }

    fn last_field(&mut self, field: &str) -> Option<f64> {
        self.all_fields(field).last().copied()
    }
}

struct Agent {
    proc: Option<Proc>,
    pid: i32,
    root: PathBuf,
    cache: PathBuf,
    log: AgentLog,
    /// Key write and flip of the last [`Agent::deploy`].
    last_deploy: Option<(Instant, Instant)>,
    key: String,
}

/// How an agent process is started: its config and log name, and the
/// command it runs under (`nice`, a cgroup, ...; empty: as is).
struct Launch {
    name: String,
    prefix: Vec<String>,
    /// No first-request splay, for agents restarted many times in a row.
    quick_start: bool,
    /// The key it watches, when not [`KEY`] (a second agent beside the
    /// first, such as `--baseline-agent`'s).
    key: Option<String>,
    /// Without the `[store]` table (an older binary that predates it).
    no_store: bool,
}

impl Agent {
    fn start(bin: &Path, work: &Path, consul: &ConsulServer, ranges: usize) -> Agent {
        let launch = Launch {
            name: format!("agent-{ranges}"),
            prefix: vec![],
            quick_start: false,
            key: None,
            no_store: false,
        };
        Agent::start_with(bin, work, consul, ranges, &launch)
    }

    fn start_with(
        bin: &Path,
        work: &Path,
        consul: &ConsulServer,
        ranges: usize,
        launch: &Launch,
    ) -> Agent {
        let key = launch.key.clone().unwrap_or_else(|| KEY.to_string());
        let root = work.join("root");
        let cache = work.join("cache");
        let cfg = work.join(format!("{}.toml", launch.name));
        let splay = if launch.quick_start {
            "first-request-splay = \"0s\"\n"
        } else {
            ""
        };
        fs::write(
            &cfg,
            format!(
                r#"deploy-root = "{root}"
cache-dir = "{cache}"
[source]
key = "{key}"
[consul]
address = "{addr}"
ssl-verify = true
wait = "20s"
max-stale = "10s"
rate-burst = 2
rate-interval = "100ms"
{splay}[status]
socket = "{sock}"
[download]
parallel-ranges = {ranges}
{store}{extra}
"#,
                root = root.display(),
                cache = cache.display(),
                sock = work.join(format!("{}.sock", launch.name)).display(),
                addr = consul.url(),
                store = match launch.no_store {
                    true => "",
                    false => STORE_CONFIG.get().map(String::as_str).unwrap_or(""),
                },
                extra = AGENT_CONFIG.get().map(String::as_str).unwrap_or(""),
            ),
        )
        .unwrap();
        let log_path = work.join(format!("{}.log", launch.name));
        let log_file = fs::File::create(&log_path).unwrap();
        let requests_before = consul.requests_for(&key).len();
        let mut cmd = match launch.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(["--log-format", "json", "run", "--config"])
            .arg(&cfg)
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut a = Agent {
            proc: Some(Proc::new(child)),
            pid,
            root,
            cache,
            log: AgentLog {
                path: log_path,
                offset: 0,
                lines: vec![],
            },
            last_deploy: None,
            key,
        };
        // The first watch request comes after a random splay (< 5 s).
        let t = Instant::now();
        while consul.requests_for(&a.key).len() == requests_before {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "agent never asked Consul; see {}",
                a.log.path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        a.log.poll();
        a
    }

    fn stop(&mut self) {
        self.proc.take();
    }

    fn publish(&self, consul: &ConsulServer, id: &str, url: &str, a: &Artifact) {
        consul.put(
            &self.key,
            buildgen::manifest_json(id, url, a, Format::TarGz),
        );
    }

    /// Waits until the agent has nothing left to do off the critical path
    /// (the old slot's trash purged) and writes are on disk.
    fn wait_idle(&self) {
        let trash = self.root.join(".deploy/trash");
        let t = Instant::now();
        while fs::read_dir(&trash)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
        {
            assert!(t.elapsed() < Duration::from_secs(120), "trash never purged");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn served_build(&self) -> Option<String> {
        fs::read_to_string(self.root.join("current/BUILD")).ok()
    }

    fn wait_build(&mut self, id: &str) {
        let t = Instant::now();
        while self.served_build().as_deref() != Some(id) {
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "build {id} never went live; see {}",
                self.log.path.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// One timed deploy of a new build id: key write -> `current` flipped
    /// (the flip's directory fsync is inside swapper's flip, measured
    /// separately). Returns the time and the peak RSS (KiB) during it.
    fn deploy(&mut self, consul: &ConsulServer, id: &str, manifest: String) -> (Duration, u64) {
        self.wait_idle();
        // Same bytes, new build id: drop the cached artifact so it downloads.
        if let Ok(d) = fs::read_dir(&self.cache) {
            for e in d.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        run("sync");
        std::thread::sleep(Duration::from_millis(250)); // the watch's token bucket
                                                        // Reset VmHWM to the current RSS.
        fs::write(format!("/proc/{}/clear_refs", self.pid), "5").unwrap();
        let old = fs::read_link(self.root.join("current")).ok();
        let flips_before = self.log.flips().len();
        let t0 = Instant::now();
        consul.put(&self.key, manifest);
        loop {
            let now = fs::read_link(self.root.join("current")).ok();
            if now.is_some() && now != old {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "deploy of {id} never flipped; see {}",
                self.log.path.display()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let took = t0.elapsed();
        self.last_deploy = Some((t0, t0 + took));
        // The log line comes after the flip returned (durable).
        let t = Instant::now();
        while self.log.flips().len() == flips_before && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let rss = self.status_kib("VmHWM");
        eprintln!(
            "  agent deploy {id}: {:.3} s, peak RSS {} KiB",
            took.as_secs_f64(),
            rss
        );
        (took, rss)
    }

    fn status_kib(&self, field: &str) -> u64 {
        let s = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        s.lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// utime + stime in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let s = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        let rest = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        // Fields 14 and 15 of stat(5); `rest` starts at field 3.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

/// Times `n` flips of a deploy root on the benchmark filesystem through
/// swapper's API (rename + directory fsync + state file).
fn swapper_flips(root: &Path, n: usize) -> Vec<f64> {
    let (mut r, _) = swapper::DeployRoot::open(root).unwrap();
    for i in 0..2 {
        let (slot, dir) = r.claim_cold().unwrap();
        fs::write(dir.join("BUILD"), format!("f{i}")).unwrap();
        r.mark_ready(
            slot,
            swapper::BuildInfo {
                build_id: format!("f{i}"),
                sha256: None,
                entries: 1,
                bytes: 2,
            },
        )
        .unwrap();
        r.flip_to(slot).unwrap();
    }
    (0..n)
        .map(|_| {
            // Flips are rare: let the journal commit the last one first.
            std::thread::sleep(Duration::from_millis(20));
            let target = r.cold();
            let t = Instant::now();
            r.flip_to(target).unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect()
}
