//! The cargo-fuzz targets' bodies (`testkit::fuzzing`) on stable: each
//! runs over its seed corpus in `fuzz/seeds/<target>`, over mutations of
//! those seeds (byte flips, truncations, splices) and over random bytes,
//! from a fixed RNG seed so a failure reproduces. This keeps the targets
//! compiling and catches the shallow bugs without nightly; the real fuzzing
//! is `cargo +nightly fuzz run <target>` (docs/reliability.md, Fuzzing).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = deploy_agent_tests::repo_root()
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out.sort();
    out
}

fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seeds[rng.gen_range(0..seeds.len())].clone();
    match rng.gen_range(0..4) {
        0 => {
            for _ in 0..rng.gen_range(1..8) {
                if !d.is_empty() {
                    let i = rng.gen_range(0..d.len());
                    d[i] = rng.gen();
                }
            }
        }
        1 => d.truncate(rng.gen_range(0..=d.len())),
        2 => {
            let other = &seeds[rng.gen_range(0..seeds.len())];
            let cut = rng.gen_range(0..=d.len());
            d.truncate(cut);
            d.extend_from_slice(&other[rng.gen_range(0..=other.len())..]);
        }
        _ => {
            let n = rng.gen_range(0..64);
            d = (0..n).map(|_| rng.gen()).collect();
        }
    }
    d
}

fn run(target: &str, f: fn(&[u8]), rounds: usize) {
    let seeds = seeds(target);
    for s in &seeds {
        f(s);
    }
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for _ in 0..rounds {
        let input = mutate(&mut rng, &seeds);
        f(&input);
    }
}

#[test]
fn manifest_target_over_seeds_and_mutations() {
    run("manifest", testkit::fuzzing::manifest, 3000);
}

#[test]
fn unpack_target_over_seeds_and_mutations() {
    run("unpack", testkit::fuzzing::unpack, 400);
}

#[test]
fn unpack_seeds_mean_what_their_names_say() {
    use deploy_agent::progress::Progress;
    use deploy_agent::unpack::{unpack, Format, UnpackLimits};
    let dir = deploy_agent_tests::repo_root().join("fuzz/seeds/unpack");
    for (name, format, ok) in [
        ("tar-good", Format::Tar, true),
        ("gz-good", Format::TarGz, true),
        ("zst-good", Format::TarZst, true),
        ("tar-evil", Format::Tar, false),
    ] {
        let data = std::fs::read(dir.join(name)).unwrap();
        let tmp = deploy_agent_tests::fast_tempdir();
        let r = unpack(
            &data[1..],
            format,
            tmp.path(),
            &UnpackLimits::default(),
            &Progress::default(),
        );
        assert_eq!(r.is_ok(), ok, "{name}: {r:?}");
        if ok {
            assert_eq!(
                std::fs::read_to_string(tmp.path().join("app/BUILD")).unwrap(),
                "b-1"
            );
        }
    }
}
