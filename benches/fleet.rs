//! Fleet benchmark: 50 real agents (each in its own network and mount
//! namespace, see `tests/support/fleet.rs`) pull a ~40 MB build from one
//! artifact server, with and without splay. Measures the time from the key
//! write to the last host flipped, p50/p99 of the per-host flip times, and
//! the artifact server's peak concurrent downloads. Beside it, the push
//! baseline: rsync of the unpacked build to 50 directories, sequentially
//! and 8-way parallel.
//!
//! `cargo bench --bench fleet` (root, iproute2 and rsync needed; prints a
//! message and exits 0 otherwise). `FLEET_HOSTS` and `FLEET_SPLAY_MS`
//! override 50 hosts and the 10 s splay.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly by design

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use deploy_agent_tests::fleet::{unsupported, Fleet, FleetOptions};
use testkit::buildgen::BuildProfile;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Publishes `build` and records when each host's `current` names it.
async fn pull(f: &mut Fleet, build: &str, label: &str) {
    let (path, url, a) = f.build(build);
    f.artifacts().reset_stats();
    let mut flipped: Vec<Option<f64>> = vec![None; f.hosts.len()];
    let p = path.display().to_string();
    let t0 = Instant::now();
    f.cli_ok(&[
        "release",
        "publish",
        "--build",
        build,
        "--artifact",
        &p,
        "--url",
        &url,
    ]);
    let limit = Duration::from_secs(900);
    while flipped.iter().any(Option::is_none) {
        for (i, h) in f.hosts.iter().enumerate() {
            if flipped[i].is_none() && h.served() == build {
                flipped[i] = Some(t0.elapsed().as_secs_f64());
            }
        }
        assert!(
            t0.elapsed() < limit,
            "{label}: not every host flipped in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut t: Vec<f64> = flipped.into_iter().flatten().collect();
    t.sort_by(f64::total_cmp);
    let s = f.artifacts().stats();
    println!(
        "{label:<22} hosts {:>3}  artifact {:>5.1} MB  last flip {:>6.2} s  p50 {:>6.2} s  p99 {:>6.2} s  peak concurrent downloads {:>3} (requests {}, {:.0} MB sent)",
        t.len(),
        a.size as f64 / 1e6,
        t[t.len() - 1],
        pct(&t, 0.5),
        pct(&t, 0.99),
        s.peak_concurrent,
        s.requests,
        s.bytes_sent as f64 / 1e6
    );
}

fn rsync_to(src: &Path, dst: &Path) {
    let st = Command::new("rsync")
        .args(["-a", "--delete"])
        .arg(format!("{}/", src.display()))
        .arg(dst)
        .status()
        .unwrap();
    assert!(st.success(), "rsync to {}", dst.display());
}

/// The push baseline: one unpacked build rsynced to `n` directories.
fn push_baseline(n: usize) {
    let tmp = deploy_agent_tests::fast_tempdir();
    let art = tmp.path().join("build.tar.gz");
    let a = testkit::buildgen::write_build(
        BuildProfile::SMALL,
        11,
        "push",
        deploy_agent::manifest::Format::TarGz,
        &art,
    )
    .unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(&art)
        .arg("-C")
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let dsts: Vec<_> = (0..n)
        .map(|i| tmp.path().join(format!("host-{i:03}")))
        .collect();
    let t = Instant::now();
    for d in &dsts {
        rsync_to(&src, d);
    }
    let seq = t.elapsed().as_secs_f64();
    for d in &dsts {
        std::fs::remove_dir_all(d).unwrap();
    }
    let t = Instant::now();
    std::thread::scope(|s| {
        for chunk in dsts.chunks(n.div_ceil(8)) {
            let src = &src;
            s.spawn(move || {
                for d in chunk {
                    rsync_to(src, d);
                }
            });
        }
    });
    let par = t.elapsed().as_secs_f64();
    println!(
        "push: rsync of {} files, {:.1} MB unpacked, to {n} dirs: sequential {seq:.2} s ({:.2} s/host), 8-way parallel {par:.2} s",
        a.entries,
        a.unpacked_bytes as f64 / 1e6,
        seq / n as f64
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Some(why) = unsupported() {
        println!("fleet benchmark skipped: {why}");
        return;
    }
    if Command::new("rsync").arg("--version").output().is_err() {
        println!("fleet benchmark skipped: rsync is missing (apt-get install rsync)");
        return;
    }
    let hosts = env_or("FLEET_HOSTS", 50) as usize;
    let splay = Duration::from_millis(env_or("FLEET_SPLAY_MS", 10_000));
    push_baseline(hosts);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut f = Fleet::start(FleetOptions {
            hosts,
            splay_max: Duration::ZERO,
            small_disks: Vec::new(),
            profile: BuildProfile::SMALL,
        })
        .await;
        // Let every agent's first Consul request (splayed up to 5 s) land.
        tokio::time::sleep(Duration::from_secs(6)).await;
        pull(&mut f, "b1", "pull, no splay").await;
        // Reconfigure: the agents reload their config file on change.
        for h in &f.hosts {
            let p = h.dir.join("config.toml");
            let c = std::fs::read_to_string(&p).unwrap();
            let c = c.replace(
                "splay-max = \"0ms\"",
                &format!("splay-max = \"{}ms\"", splay.as_millis()),
            );
            std::fs::write(&p, c).unwrap();
        }
        tokio::time::sleep(Duration::from_secs(8)).await;
        pull(&mut f, "b2", &format!("pull, splay {} s", splay.as_secs())).await;
    });
}
