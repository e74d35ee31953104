//! Integration tests for `deploy_agent::unpack`: round trips of generated
//! trees in every format, and hostile archives that must be refused without
//! anything landing outside the slot.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deploy_agent::progress::Progress;
use deploy_agent::unpack::{unpack, Format, UnpackLimits};
use deploy_agent::Error;
use deploy_agent_tests::archive::{compress, file, php_tree, raw_entry, symlink, tar_of};
use proptest::prelude::*;

/// A temp dir with `outside/` (holding a canary) and an empty `slot/`.
struct Sandbox {
    _dir: tempfile::TempDir,
    root: PathBuf,
    slot: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        fs::create_dir(root.join("outside")).unwrap();
        fs::write(root.join("outside/canary"), b"canary").unwrap();
        fs::create_dir(root.join("slot")).unwrap();
        let slot = root.join("slot");
        Sandbox {
            _dir: dir,
            root,
            slot,
        }
    }

    /// Nothing but `outside/canary` (unchanged) and `slot/` exists next to the slot.
    fn assert_nothing_escaped(&self) {
        let mut top: Vec<_> = fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(top, ["outside", "slot"]);
        let outside: Vec<_> = fs::read_dir(self.root.join("outside"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(outside, ["canary"]);
        assert_eq!(
            fs::read(self.root.join("outside/canary")).unwrap(),
            b"canary"
        );
        assert!(!Path::new("/etc/deploy-agent-test-escape").exists());
    }

    fn unpack(&self, archive: &[u8], format: Format) -> deploy_agent::Result<()> {
        self.unpack_with(archive, format, &UnpackLimits::default())
    }

    fn unpack_with(
        &self,
        archive: &[u8],
        format: Format,
        limits: &UnpackLimits,
    ) -> deploy_agent::Result<()> {
        let progress = Progress::default();
        unpack(archive, format, &self.slot, limits, &progress).map(|_| ())
    }
}

fn assert_refused(result: deploy_agent::Result<()>) {
    match result {
        Err(Error::UnsafeArchive { entry, reason, .. }) => {
            assert!(!entry.is_empty() && !reason.is_empty())
        }
        other => panic!("expected UnsafeArchive, got {other:?}"),
    }
}

// ---- round trip ----

/// Generates a tree with nested dirs, empty files, exec bits, symlinks
/// inside and odd mtimes; returns its root.
fn generate_tree(root: &Path) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for d in 0..6 {
        for s in 0..4 {
            let dir = root.join(format!("d{d}/sub{s}"));
            fs::create_dir_all(&dir).unwrap();
            for f in 0..8 {
                let len = match f {
                    0 => 0,
                    // Bigger than the unpacker's in-memory file limit: streamed.
                    1 if d == 0 && s == 0 => 3_000_000,
                    1 => rng.gen_range(50_000..300_000usize),
                    _ => rng.gen_range(1..5000),
                };
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                let path = dir.join(format!("f{f}.php"));
                fs::write(&path, &data).unwrap();
                let mode = if f == 3 { 0o755 } else { 0o644 };
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
                let mtime = std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000 + f * 1000);
                let file = fs::File::options().write(true).open(&path).unwrap();
                file.set_modified(mtime).unwrap();
            }
        }
    }
    std::os::unix::fs::symlink("d0/sub0/f2.php", root.join("top-link")).unwrap();
    std::os::unix::fs::symlink("../sub1", root.join("d1/sub0/up-link")).unwrap();
    std::os::unix::fs::symlink("..", root.join("d2/parent")).unwrap();
    for d in 0..6 {
        let dir = root.join(format!("d{d}"));
        let f = fs::File::open(&dir).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_400_000_000 + d))
            .unwrap();
    }
}

fn archive_tree(root: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", root).unwrap();
    // A hard link to a file archived above.
    raw_entry(
        &mut b,
        b"hard-link",
        tar::EntryType::Link,
        b"d0/sub0/f2.php",
        0o644,
        b"",
    );
    b.into_inner().unwrap()
}

fn assert_same_tree(src: &Path, dst: &Path) {
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let (s, d) = (entry.path(), dst.join(entry.file_name()));
        let (sm, dm) = (
            fs::symlink_metadata(&s).unwrap(),
            fs::symlink_metadata(&d).unwrap(),
        );
        assert_eq!(sm.file_type(), dm.file_type(), "{}", d.display());
        if sm.file_type().is_symlink() {
            assert_eq!(fs::read_link(&s).unwrap(), fs::read_link(&d).unwrap());
            continue;
        }
        assert_eq!(sm.mode() & 0o777, dm.mode() & 0o777, "{}", d.display());
        assert_eq!(sm.mtime(), dm.mtime(), "mtime of {}", d.display());
        if sm.is_dir() {
            assert_same_tree(&s, &d);
        } else {
            assert_eq!(fs::read(&s).unwrap(), fs::read(&d).unwrap());
        }
    }
}

/// `writeback_every`: 0 (no early writeback), the default, or 1 (a
/// background syncfs asked for after every file, racing the writers).
fn round_trip(format: Format, writeback_every: u64) {
    let limits = UnpackLimits {
        writeback_every,
        ..UnpackLimits::default()
    };
    let src = tempfile::tempdir().unwrap();
    generate_tree(src.path());
    let archive = compress(&archive_tree(src.path()), format);
    let sandbox = Sandbox::new();
    let progress = Progress::default();
    let started = Instant::now();
    let stats = unpack(&archive[..], format, &sandbox.slot, &limits, &progress).unwrap();
    eprintln!("{format:?}: {stats:?} in {:?}", started.elapsed());
    assert_eq!(stats.files, 6 * 4 * 8);
    assert_eq!(stats.symlinks, 3);
    assert_eq!(stats.hardlinks, 1);
    assert_same_tree(src.path(), &sandbox.slot);
    let a = fs::metadata(sandbox.slot.join("hard-link")).unwrap();
    let b = fs::metadata(sandbox.slot.join("d0/sub0/f2.php")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(
        progress.snapshot().bytes_written,
        stats.bytes_written,
        "progress matches stats"
    );
    sandbox.assert_nothing_escaped();
}

#[test]
fn round_trip_tar() {
    round_trip(Format::Tar, 0);
}

#[test]
fn round_trip_tar_gz() {
    round_trip(Format::TarGz, 1);
}

#[test]
fn round_trip_tar_zst() {
    round_trip(Format::TarZst, UnpackLimits::default().writeback_every);
}

#[test]
fn dot_slash_prefixes_and_read_only_dirs_work() {
    let archive = tar_of(|b| {
        raw_entry(b, b"./", tar::EntryType::Directory, b"", 0o755, b"");
        raw_entry(b, b"./ro/", tar::EntryType::Directory, b"", 0o555, b"");
        file(b, "./ro/inside", b"x");
    });
    let sandbox = Sandbox::new();
    sandbox.unpack(&archive, Format::Tar).unwrap();
    assert_eq!(fs::read(sandbox.slot.join("ro/inside")).unwrap(), b"x");
    let mode = fs::metadata(sandbox.slot.join("ro")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o755, "owner keeps write access");
}

#[test]
fn setuid_setgid_sticky_and_world_write_are_stripped() {
    let archive = tar_of(|b| {
        raw_entry(
            b,
            b"suid",
            tar::EntryType::Regular,
            b"",
            0o6777,
            b"#!/bin/sh\n",
        );
        raw_entry(b, b"sticky/", tar::EntryType::Directory, b"", 0o1777, b"");
    });
    let sandbox = Sandbox::new();
    sandbox.unpack(&archive, Format::Tar).unwrap();
    let mode = fs::metadata(sandbox.slot.join("suid")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o755);
    let mode = fs::metadata(sandbox.slot.join("sticky")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o755);
}

// ---- hostile archives ----

fn assert_hostile(entries: impl FnOnce(&mut tar::Builder<Vec<u8>>)) {
    let archive = tar_of(entries);
    for format in [Format::Tar, Format::TarGz] {
        let sandbox = Sandbox::new();
        assert_refused(sandbox.unpack(&compress(&archive, format), format));
        sandbox.assert_nothing_escaped();
    }
}

#[test]
fn parent_dir_entry_is_refused() {
    assert_hostile(|b| file(b, "../x", b"evil"));
}

#[test]
fn absolute_entry_is_refused() {
    assert_hostile(|b| file(b, "/etc/deploy-agent-test-escape", b"evil"));
}

#[test]
fn dot_dot_in_the_middle_is_refused() {
    assert_hostile(|b| {
        file(b, "a/ok", b"fine");
        file(b, "a/../../x", b"evil");
    });
}

#[test]
fn symlink_to_outside_then_write_through_it_is_refused() {
    assert_hostile(|b| {
        symlink(b, "link", "/etc");
        file(b, "link/deploy-agent-test-escape", b"evil");
    });
    assert_hostile(|b| {
        symlink(b, "link", "../outside");
        file(b, "link/canary", b"evil");
    });
}

#[test]
fn symlink_inside_then_write_through_it_is_refused() {
    // Even a link that stays inside: writing through links is never needed.
    assert_hostile(|b| {
        file(b, "d/x", b"fine");
        symlink(b, "link", "d");
        file(b, "link/y", b"evil");
    });
}

#[test]
fn symlink_dot_dot_chain_is_refused() {
    assert_hostile(|b| {
        symlink(b, "up", "..");
        file(b, "up/x", b"evil");
    });
    assert_hostile(|b| {
        file(b, "a/b/keep", b"fine");
        symlink(b, "a/b/up", "../..");
        symlink(b, "a/b/up2", "up/..");
    });
    assert_hostile(|b| {
        symlink(b, "self", ".");
        symlink(b, "esc", "self/..");
    });
}

#[test]
fn hard_links_outside_are_refused() {
    assert_hostile(|b| {
        raw_entry(b, b"pw", tar::EntryType::Link, b"/etc/passwd", 0o644, b"");
    });
    assert_hostile(|b| {
        raw_entry(
            b,
            b"c",
            tar::EntryType::Link,
            b"../outside/canary",
            0o644,
            b"",
        );
    });
    // A hard link to a symlink the archive made (which points elsewhere).
    assert_hostile(|b| {
        symlink(b, "l", "x");
        raw_entry(b, b"h", tar::EntryType::Link, b"l", 0o644, b"");
    });
    // A hard link to a file not (yet) in the archive.
    assert_hostile(|b| {
        raw_entry(b, b"h", tar::EntryType::Link, b"later", 0o644, b"");
        file(b, "later", b"x");
    });
}

#[test]
fn devices_and_fifos_are_refused() {
    for kind in [
        tar::EntryType::Char,
        tar::EntryType::Block,
        tar::EntryType::Fifo,
    ] {
        assert_hostile(|b| raw_entry(b, b"dev", kind, b"", 0o666, b""));
    }
}

#[test]
fn duplicate_file_is_refused() {
    assert_hostile(|b| {
        file(b, "x", b"one");
        file(b, "x", b"two");
    });
}

#[test]
fn entry_count_bomb_stops_early() {
    let archive = tar_of(|b| {
        for i in 0..500 {
            file(b, &format!("f{i}"), b"");
        }
    });
    let sandbox = Sandbox::new();
    let limits = UnpackLimits {
        max_bytes: 1 << 30,
        max_entries: 100,
        ..UnpackLimits::default()
    };
    match sandbox.unpack_with(&archive, Format::Tar, &limits) {
        Err(Error::ArchiveTooLarge { limit: 100, .. }) => {}
        other => panic!("expected ArchiveTooLarge, got {other:?}"),
    }
    let written = fs::read_dir(&sandbox.slot).unwrap().count();
    assert!(written <= 100, "stopped at the limit, wrote {written}");
}

#[test]
fn byte_bomb_stops_early_and_fast() {
    // A gzip whose one entry claims 4 GiB of zeros: only the first 8 MiB are
    // even generated, the header alone must be enough to refuse.
    let mut header = tar::Header::new_gnu();
    header.set_path("bomb").unwrap();
    header.set_size(4 << 30);
    header.set_mode(0o644);
    header.set_cksum();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(header.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..8 {
        gz.write_all(&zeros).unwrap();
    }
    let archive = gz.finish().unwrap();
    let sandbox = Sandbox::new();
    let limits = UnpackLimits {
        max_bytes: 10 << 20,
        max_entries: 1000,
        ..UnpackLimits::default()
    };
    // The archive holds only 8 MiB of the claimed 4 GiB, under the 10 MiB
    // limit: refusing it for its size means the header alone did it.
    match sandbox.unpack_with(&archive, Format::TarGz, &limits) {
        Err(Error::ArchiveTooLarge { .. }) => {}
        other => panic!("expected ArchiveTooLarge, got {other:?}"),
    }
    let written = fs::metadata(sandbox.slot.join("bomb")).map_or(0, |m| m.len());
    assert_eq!(
        written, 0,
        "the bomb's bytes were written before the refusal"
    );
}

#[test]
fn long_name_bomb_is_refused_without_buffering_it() {
    // A GNU long-name record of 64 MiB: the tar crate would read it into memory.
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    header.set_entry_type(tar::EntryType::GNULongName);
    header.set_size(64 << 20);
    header.set_mode(0o644);
    header.set_cksum();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(header.as_bytes()).unwrap();
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..64 {
        gz.write_all(&chunk).unwrap();
    }
    let archive = gz.finish().unwrap();
    let sandbox = Sandbox::new();
    match sandbox.unpack(&archive, Format::TarGz) {
        Err(Error::ArchiveTooLarge { what, .. }) => assert!(what.contains("metadata"), "{what}"),
        other => panic!("expected ArchiveTooLarge, got {other:?}"),
    }
    sandbox.assert_nothing_escaped();
}

#[test]
fn many_small_files_within_byte_limit_but_over_it_in_total() {
    let archive = tar_of(|b| {
        for i in 0..50 {
            file(b, &format!("f{i}"), &[7u8; 100_000]);
        }
    });
    let sandbox = Sandbox::new();
    let limits = UnpackLimits {
        max_bytes: 1_000_000,
        max_entries: 1000,
        ..UnpackLimits::default()
    };
    match sandbox.unpack_with(&compress(&archive, Format::TarZst), Format::TarZst, &limits) {
        Err(Error::ArchiveTooLarge { what, .. }) => assert_eq!(what, "unpacked bytes"),
        other => panic!("expected ArchiveTooLarge, got {other:?}"),
    }
}

#[test]
fn corrupt_gzip_is_an_error() {
    let archive = tar_of(|b| file(b, "x", &[1u8; 10_000]));
    let mut gz = compress(&archive, Format::TarGz);
    let mid = gz.len() / 2;
    gz[mid] ^= 0xff;
    gz.truncate(gz.len() - 4);
    let sandbox = Sandbox::new();
    assert!(sandbox.unpack(&gz, Format::TarGz).is_err());
}

// ---- property: no archive writes outside its slot ----

#[derive(Debug, Clone)]
enum Spec {
    File(Vec<&'static str>),
    Dir(Vec<&'static str>),
    Symlink(Vec<&'static str>, Vec<&'static str>),
    Hardlink(Vec<&'static str>, Vec<&'static str>),
}

fn component() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "l", "..", ".", "", "outside", "canary"])
}

fn components() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(component(), 1..5)
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        components().prop_map(Spec::File),
        components().prop_map(Spec::Dir),
        (components(), components()).prop_map(|(a, b)| Spec::Symlink(a, b)),
        (components(), components()).prop_map(|(a, b)| Spec::Hardlink(a, b)),
    ]
}

fn joined(parts: &[&str], absolute: bool) -> Vec<u8> {
    let s = parts.join("/");
    if absolute {
        format!("/{s}").into_bytes()
    } else {
        s.into_bytes()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_archives_never_write_outside_the_slot(
        specs in prop::collection::vec((spec(), any::<bool>()), 1..12)
    ) {
        let sandbox = Sandbox::new();
        let outside = sandbox.root.join("outside");
        let archive = tar_of(|b| {
            for (spec, absolute) in &specs {
                match spec {
                    Spec::File(p) => raw_entry(b, &joined(p, *absolute), tar::EntryType::Regular, b"", 0o644, b"evil"),
                    Spec::Dir(p) => raw_entry(b, &joined(p, *absolute), tar::EntryType::Directory, b"", 0o755, b""),
                    Spec::Symlink(p, t) => {
                        // Point some links at the real outside dir.
                        let target = if *absolute { outside.to_str().unwrap().as_bytes().to_vec() } else { joined(t, false) };
                        raw_entry(b, &joined(p, false), tar::EntryType::Symlink, &target, 0o777, b"")
                    }
                    Spec::Hardlink(p, t) => raw_entry(b, &joined(p, false), tar::EntryType::Link, &joined(t, *absolute), 0o644, b""),
                }
            }
            // Then try to write through every name the archive might have made.
            for (spec, _) in &specs {
                if let Spec::Symlink(p, _) = spec {
                    raw_entry(b, &joined(&[&p.join("/"), "escaped"], false), tar::EntryType::Regular, b"", 0o644, b"evil");
                }
            }
        });
        let _ = sandbox.unpack(&archive, Format::Tar);
        sandbox.assert_nothing_escaped();
    }
}

/// Throughput figure, not a gate: `cargo test --release -p deploy-agent-tests
/// --test unpack -- --ignored --nocapture throughput`. Compares with GNU tar
/// (+ sync) on the same archive when `tar` is installed. Kept to a few
/// thousand files: the test filesystem is slow at recreating many files.
#[test]
#[ignore]
fn throughput() {
    let files = 3000;
    let archive = php_tree(99, files, |i| {
        format!("vendor/p{}/src/d{}/F{i}.php", i % 40, i % 7)
    });
    let gz = compress(&archive, Format::TarGz);
    let sandbox = Sandbox::new();
    let started = Instant::now();
    let stats = unpack(
        &gz[..],
        Format::TarGz,
        &sandbox.slot,
        &UnpackLimits::default(),
        &Progress::default(),
    )
    .unwrap();
    let unpack_only = started.elapsed().as_secs_f64();
    nix::unistd::sync();
    let ours = started.elapsed().as_secs_f64();
    eprintln!("deploy-agent unpack without sync: {unpack_only:.3}s");
    eprintln!(
        "deploy-agent unpack+sync: {} files, {:.1} MB unpacked, {:.1} MB gz in {ours:.3}s = {:.0} files/s, {:.1} MB/s",
        stats.files,
        stats.bytes_written as f64 / 1e6,
        gz.len() as f64 / 1e6,
        stats.files as f64 / ours,
        stats.bytes_written as f64 / 1e6 / ours
    );
    let gz_path = sandbox.root.join("outside/../a.tar.gz");
    fs::write(&gz_path, &gz).unwrap();
    let gnu = sandbox.root.join("gnu");
    fs::create_dir(&gnu).unwrap();
    let started = Instant::now();
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&gz_path)
        .arg("-C")
        .arg(&gnu)
        .status();
    let gnu_only = started.elapsed().as_secs_f64();
    nix::unistd::sync();
    if let Ok(status) = status {
        assert!(status.success());
        eprintln!(
            "GNU tar -xzf: {gnu_only:.3}s, + sync: {:.3}s",
            started.elapsed().as_secs_f64()
        );
    }
}
