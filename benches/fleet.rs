//! Fleet benchmark: 50 real agents (each in its own network and mount
//! namespace, see `tests/support/fleet.rs`) pull a ~40 MB build from one
//! artifact server, with and without splay. Measures the time from the key
//! write to the last host flipped, p50/p99 of the per-host flip times, and
//! the artifact server's peak concurrent downloads. Beside it, the push
//! baseline: rsync of the unpacked build to 50 directories, sequentially
//! and 8-way parallel. The delta row (issue 15): the hosts run a build,
//! the next one (1% of its files changed) is published with its delta;
//! its push baselines are an 8-way rsync of the new build to 50 directories
//! that hold the old one (in place, not atomic), and the atomic push: an
//! 8-way `rsync --link-dest` into a fresh directory per host, then the
//! symlink flip (issue 20).
//!
//! `cargo bench --bench fleet` (root, iproute2 and rsync needed; prints a
//! message and exits 0 otherwise). `FLEET_HOSTS` and `FLEET_SPLAY_MS`
//! override 50 hosts and the 10 s splay.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly by design

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use deploy_agent::manifest::Format;
use deploy_agent_tests::fleet::{unsupported, Fleet, FleetOptions, APP, BUILD_SEED, TIER};
use testkit::buildgen::{self, Artifact, BuildProfile};

/// Consecutive builds of the delta row: half a percent of the sources
/// change per build id, so two of them differ in about 1% of their files
/// (as in the compare benchmark's delta row).
const DELTA_CHANGED: f64 = 0.005;
const DELTA_BASE: &str = "d1";
const DELTA_NEXT: &str = "d2";

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

/// Publishes `build` (generated and served here) and times it.
async fn pull(f: &mut Fleet, build: &str, label: &str) -> f64 {
    let (path, url, a) = f.build(build);
    publish_timed(f, build, &path, &url, &a, &[], label).await
}

/// Publishes `build` with `extra` arguments to `release publish` and
/// records when each host's `current` names it, from the key write.
/// Returns when the last host flipped.
async fn publish_timed(
    f: &Fleet,
    build: &str,
    path: &Path,
    url: &str,
    a: &Artifact,
    extra: &[&str],
    label: &str,
) -> f64 {
    f.artifacts().reset_stats();
    let mut flipped: Vec<Option<f64>> = vec![None; f.hosts.len()];
    let p = path.display().to_string();
    let mut args = vec![
        "release",
        "publish",
        "--build",
        build,
        "--artifact",
        &p,
        "--url",
        url,
    ];
    args.extend_from_slice(extra);
    let before = Instant::now();
    f.cli_ok(&args);
    // The clock starts at the key write, not at the command: `release
    // publish` first hashes the artifact (and writes the delta).
    let key = deploy_agent::fleet::tier_key(APP, TIER);
    let t0 = f
        .consul
        .requests_for(&key)
        .iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.at.into_std())
        .rfind(|at| *at >= before)
        .expect("release publish wrote the key");
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
    t[t.len() - 1]
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

/// Generates build `id` (`changed` as in `buildgen::write_build_changing`)
/// with the fleet's profile and seed, so it has the bytes the fleet's
/// build of that id has, and unpacks it into `dir/<id>`.
fn unpacked(dir: &Path, id: &str, changed: f64) -> (PathBuf, Artifact) {
    let art = dir.join(format!("{id}.tar.gz"));
    let a = buildgen::write_build_changing(
        BuildProfile::SMALL,
        BUILD_SEED,
        id,
        Format::TarGz,
        &art,
        changed,
    )
    .unwrap();
    let src = dir.join(id);
    std::fs::create_dir_all(&src).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(&art)
        .arg("-C")
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    (src, a)
}

fn host_dirs(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| dir.join(format!("host-{i:03}"))).collect()
}

/// rsync of `src` to every one of `dsts`, 8 at a time; the seconds it took.
fn rsync_8way(src: &Path, dsts: &[PathBuf]) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for chunk in dsts.chunks(dsts.len().div_ceil(8)) {
            s.spawn(move || {
                for d in chunk {
                    rsync_to(src, d);
                }
            });
        }
    });
    t.elapsed().as_secs_f64()
}

/// The push baseline: one unpacked build rsynced to `n` directories.
fn push_baseline(n: usize) {
    let tmp = deploy_agent_tests::fast_tempdir();
    let (src, a) = unpacked(tmp.path(), "push", 0.1);
    let dsts = host_dirs(tmp.path(), n);
    let t = Instant::now();
    for d in &dsts {
        rsync_to(&src, d);
    }
    let seq = t.elapsed().as_secs_f64();
    for d in &dsts {
        std::fs::remove_dir_all(d).unwrap();
    }
    let par = rsync_8way(&src, &dsts);
    println!(
        "push: rsync of {} files, {:.1} MB unpacked, to {n} dirs: sequential {seq:.2} s ({:.2} s/host), 8-way parallel {par:.2} s",
        a.entries,
        a.unpacked_bytes as f64 / 1e6,
        seq / n as f64
    );
}

/// The delta row's push baseline: `n` directories hold the base build
/// (copied untimed), then the next build is rsynced to them 8-way; the
/// seconds that took. rsync skips files of equal size and mtime, and the
/// generator gives every file one mtime, so the files whose bytes changed
/// get a new mtime first, as from a build that rewrites only what changed:
/// rsync then sends only those.
fn push_delta_baseline(n: usize) -> f64 {
    let tmp = deploy_agent_tests::fast_tempdir();
    let (base, _) = unpacked(tmp.path(), DELTA_BASE, DELTA_CHANGED);
    let (next, a) = unpacked(tmp.path(), DELTA_NEXT, DELTA_CHANGED);
    let changed = touch_changed(&base, &next);
    let dsts = host_dirs(tmp.path(), n);
    rsync_8way(&base, &dsts);
    let par = rsync_8way(&next, &dsts);
    for d in &dsts {
        let build = std::fs::read_to_string(d.join("BUILD")).unwrap();
        assert_eq!(
            build,
            DELTA_NEXT,
            "rsync left {} on the old build",
            d.display()
        );
    }
    println!(
        "push, delta: 8-way rsync of {} files ({changed} changed) to {n} dirs holding {DELTA_BASE}: {par:.2} s",
        a.entries
    );
    par
}

/// The delta row's atomic push baseline, the push that gives the agent's
/// guarantee (a host serves the old build or the new one, never a mix):
/// `n` hosts serve the base build from `releases/<base>` through a
/// `current` symlink (set up untimed); then, 8 at a time, each gets the
/// next build by `rsync --link-dest` of it into a fresh
/// `releases/<next>` (unchanged files hard-linked from the base, only the
/// changed ones sent) and its symlink flipped. The seconds that took.
fn push_delta_atomic_baseline(n: usize) -> f64 {
    let tmp = deploy_agent_tests::fast_tempdir();
    let (base, _) = unpacked(tmp.path(), DELTA_BASE, DELTA_CHANGED);
    let (next, a) = unpacked(tmp.path(), DELTA_NEXT, DELTA_CHANGED);
    let changed = touch_changed(&base, &next);
    let hosts = host_dirs(tmp.path(), n);
    let releases: Vec<PathBuf> = hosts.iter().map(|h| h.join("releases")).collect();
    rsync_8way(
        &base,
        &releases
            .iter()
            .map(|r| r.join(DELTA_BASE))
            .collect::<Vec<_>>(),
    );
    for h in &hosts {
        std::os::unix::fs::symlink(format!("releases/{DELTA_BASE}"), h.join("current")).unwrap();
    }
    let t = Instant::now();
    std::thread::scope(|s| {
        for chunk in hosts.chunks(hosts.len().div_ceil(8)) {
            let next = &next;
            s.spawn(move || {
                for h in chunk {
                    let st = Command::new("rsync")
                        .args(["-a", "--delete"])
                        .arg(format!(
                            "--link-dest={}",
                            h.join("releases").join(DELTA_BASE).display()
                        ))
                        .arg(format!("{}/", next.display()))
                        .arg(h.join("releases").join(DELTA_NEXT))
                        .status()
                        .unwrap();
                    assert!(st.success(), "rsync --link-dest to {}", h.display());
                    let tmp_link = h.join("current.tmp");
                    std::os::unix::fs::symlink(format!("releases/{DELTA_NEXT}"), &tmp_link)
                        .unwrap();
                    std::fs::rename(&tmp_link, h.join("current")).unwrap();
                }
            });
        }
    });
    let par = t.elapsed().as_secs_f64();
    for h in &hosts {
        let build = std::fs::read_to_string(h.join("current/BUILD")).unwrap();
        assert_eq!(build, DELTA_NEXT, "{} serves the old build", h.display());
    }
    println!(
        "push, delta, atomic: 8-way rsync --link-dest of {} files ({changed} changed) into a fresh directory on {n} hosts, then the symlink flip: {par:.2} s",
        a.entries
    );
    par
}

/// Gives every regular file under `next` whose bytes differ from the same
/// path under `base` a new mtime; returns how many did.
fn touch_changed(base: &Path, next: &Path) -> usize {
    let mut changed = 0;
    for e in std::fs::read_dir(next).unwrap() {
        let e = e.unwrap();
        let (b, p) = (base.join(e.file_name()), e.path());
        if e.file_type().unwrap().is_dir() {
            changed += touch_changed(&b, &p);
        } else if std::fs::read(&b).ok() != Some(std::fs::read(&p).unwrap()) {
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(SystemTime::now()).unwrap();
            changed += 1;
        }
    }
    changed
}

/// The delta row: every host runs DELTA_BASE (a full pull, printed too),
/// then DELTA_NEXT is published with its delta. Returns the seconds from
/// the key write to the last host flipped.
async fn delta_pull(f: &mut Fleet) -> f64 {
    let (base, base_url, base_a) = f.build_changing(DELTA_BASE, DELTA_CHANGED);
    let label = "pull, delta base";
    publish_timed(f, DELTA_BASE, &base, &base_url, &base_a, &[], label).await;
    let (next, url, a) = f.build_changing(DELTA_NEXT, DELTA_CHANGED);
    // `release publish --delta-from` writes the delta beside the artifact
    // and publishes at once, and the hosts ask for it at once: the same
    // delta (the writer is deterministic, checked below) is written and
    // served here first, as an operator would upload it first.
    let delta = PathBuf::from(format!("{}.delta.tar.zst", next.display()));
    let info =
        deploy_agent::unpack::delta::write((&base, Format::TarGz), (&next, Format::TarGz), &delta)
            .unwrap();
    let served = std::fs::read(&delta).unwrap();
    let delta_url = f.serve(&format!("/b/{DELTA_NEXT}.tar.gz.delta.tar.zst"), &delta);
    let b = base.display().to_string();
    let extra = ["--delta-from", &b, "--delta-url", &delta_url];
    let label = "pull, delta (1%)";
    let last = publish_timed(f, DELTA_NEXT, &next, &url, &a, &extra, label).await;
    assert!(
        std::fs::read(&delta).unwrap() == served,
        "release publish wrote another delta than the one served"
    );
    let sent = f.artifacts().stats().bytes_sent;
    let hosts = f.hosts.len() as u64;
    println!(
        "delta: {:.2} MB ({} files shared), {:.1} MB sent to {hosts} hosts{}",
        info.size as f64 / 1e6,
        info.shared,
        sent as f64 / 1e6,
        if sent > 2 * hosts * info.size {
            ": more than the deltas, some hosts downloaded the full artifact"
        } else {
            ""
        }
    );
    last
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
    let push_delta = push_delta_baseline(hosts);
    let push_atomic = push_delta_atomic_baseline(hosts);
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
        let delta = delta_pull(&mut f).await;
        println!(
            "fleet delta: last flipped / 8-way atomic rsync push (--link-dest, then the flip) = {:.2} ({delta:.2} s / {push_atomic:.2} s; target <= 0.5)",
            delta / push_atomic
        );
        println!(
            "fleet delta: last flipped / 8-way in-place rsync push (not atomic) = {:.2} ({delta:.2} s / {push_delta:.2} s)",
            delta / push_delta
        );
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
