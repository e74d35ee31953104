//! Criterion micro-benchmarks of the data path's hot spots: sha256,
//! gzip inflate, unpacking a build into a slot (with and without the slot
//! record's per-file digests and stats), the check of a 40,000-file slot
//! against its record (what runs before a rollback), and the flip.
//! `cargo bench --bench hot_paths`. Scratch files live in /dev/shm (or the
//! temp dir) and are deleted when each benchmark ends.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly by design

use std::io::Read;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use deploy_agent::manifest::Format;
use deploy_agent::progress::Progress;
use deploy_agent::unpack::{unpack, unpack_recorded, UnpackLimits};
use sha2::{Digest, Sha256};
use testkit::buildgen::{self, BuildProfile};

fn scratch() -> tempfile::TempDir {
    deploy_agent_tests::fast_tempdir()
}

/// The DEMO build (about 1,500 files, 12 MB) as tar and tar.gz bytes.
fn build() -> (Vec<u8>, Vec<u8>) {
    let dir = scratch();
    let tar = dir.path().join("b.tar");
    let gz = dir.path().join("b.tar.gz");
    buildgen::write_build(BuildProfile::DEMO, 1, "bench", Format::Tar, &tar).unwrap();
    buildgen::write_build(BuildProfile::DEMO, 1, "bench", Format::TarGz, &gz).unwrap();
    (std::fs::read(tar).unwrap(), std::fs::read(gz).unwrap())
}

fn hashing(c: &mut Criterion) {
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut g = c.benchmark_group("sha256");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("16MiB", |b| b.iter(|| Sha256::digest(&data)));
    g.finish();
}

fn inflating(c: &mut Criterion) {
    let (tar, gz) = build();
    let mut g = c.benchmark_group("inflate");
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.bench_function("demo_build_gz", |b| {
        b.iter(|| {
            let mut d = flate2::read::GzDecoder::new(&gz[..]);
            let mut buf = vec![0u8; 256 << 10];
            let mut n = 0usize;
            loop {
                let k = d.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                n += k;
            }
            assert_eq!(n, tar.len());
        })
    });
    g.finish();
}

/// The DEMO build unpacked into a fresh tmpfs slot: plainly, and with the
/// slot record (sha256 of every file's bytes in the writer threads, one
/// fstat each): the record's cost on a full deploy (issue 20: at most 3%).
fn unpacking(c: &mut Criterion) {
    let (tar, _) = build();
    let mut g = c.benchmark_group("unpack");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(tar.len() as u64));
    for (name, record) in [
        ("demo_build_tar_tmpfs", false),
        ("demo_build_tar_tmpfs_recorded", true),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let dir = scratch();
                    let (limits, p) = (UnpackLimits::default(), Progress::default());
                    let t = Instant::now();
                    if record {
                        unpack_recorded(&tar[..], Format::Tar, dir.path(), &limits, &p).unwrap();
                    } else {
                        unpack(&tar[..], Format::Tar, dir.path(), &limits, &p).unwrap();
                    }
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

/// A 40,000-file slot checked against its record when nothing changed:
/// stat only, the work before every rollback (target: p99 <= 50 ms).
fn slot_check(c: &mut Criterion) {
    let dir = scratch();
    let tar = dir.path().join("b.tar");
    let profile = BuildProfile {
        sources: 40_000,
        assets: 0,
        binaries: 0,
        per_dir: 40,
    };
    buildgen::write_build(profile, 1, "check", Format::Tar, &tar).unwrap();
    let slot = dir.path().join("slot");
    std::fs::create_dir(&slot).unwrap();
    let f = std::fs::File::open(&tar).unwrap();
    let limits = UnpackLimits::default();
    let (_, entries) =
        unpack_recorded(f, Format::Tar, &slot, &limits, &Progress::default()).unwrap();
    let record = dir.path().join("slot.record");
    let sha = deploy_agent::manifest::Sha256Sum::from_bytes([0; 32]);
    deploy_agent::integrity::write_record(
        &record,
        ("check", &sha),
        deploy_agent::integrity::Mechanism::Written,
        entries,
    )
    .unwrap();
    let mut g = c.benchmark_group("slot_check");
    g.sample_size(30);
    g.bench_function("40k_files_unchanged_tmpfs", |b| {
        b.iter(|| {
            let v = deploy_agent::integrity::check(&slot, &record, ("check", None), false).unwrap();
            assert!(v.flippable());
        })
    });
    // Its two parts: reading the record, and the walk with its stats.
    g.bench_function("40k_record_load", |b| {
        b.iter(|| deploy_agent::integrity::SlotRecord::load(&record).unwrap())
    });
    let loaded = deploy_agent::integrity::SlotRecord::load(&record)
        .unwrap()
        .unwrap();
    g.bench_function("40k_walk_and_stat", |b| {
        b.iter(|| deploy_agent::integrity::verify(&slot, &loaded, false).unwrap())
    });
    g.finish();
}

fn flipping(c: &mut Criterion) {
    let dir = scratch();
    let (mut r, _) = swapper::DeployRoot::open(dir.path()).unwrap();
    for i in 0..2 {
        let (slot, d) = r.claim_cold().unwrap();
        std::fs::write(d.join("BUILD"), format!("f{i}")).unwrap();
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
    c.bench_function("flip_tmpfs", |b| {
        b.iter(|| {
            let target = r.cold();
            r.flip_to(target).unwrap()
        })
    });
}

criterion_group!(benches, hashing, inflating, unpacking, slot_check, flipping);
criterion_main!(benches);
