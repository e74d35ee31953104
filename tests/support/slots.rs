//! Builds served with their deltas, and what a slot holds, for the tests
//! of delta deploys (tests/delta.rs) and of slot integrity
//! (tests/slot_integrity.rs): generate and serve a build, write and serve a
//! delta, the manifest naming both, a tree's every path with type, mode,
//! mtime and content digest, and a full unpack to compare with; small
//! loop-mounted filesystems (ext4, XFS, btrfs) for per-filesystem tests.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::Digest;

use deploy_agent::config::UnpackLimits;
use deploy_agent::fleet::commander::release::delta_spec;
use deploy_agent::manifest::{DeltaSpec, Format};
use deploy_agent::progress::Progress;
use deploy_agent::unpack::unpack;
use testkit::buildgen::{self, Artifact, BuildProfile};

pub const FORMAT: Format = Format::TarGz;

/// One published build: its artifact on disk and what the server serves.
#[derive(Debug)]
pub struct Build {
    pub id: String,
    pub path: PathBuf,
    pub artifact: Artifact,
    pub url_path: String,
}

/// Generates build `id` (1% of its sources differ from every other build
/// of the seed) and serves it.
pub fn build(
    dir: &Path,
    server: &testkit::testserver::artifact::ArtifactServer,
    id: &str,
    profile: BuildProfile,
) -> Build {
    let path = dir.join(format!("{id}.tar.gz"));
    let artifact = buildgen::write_build_changing(profile, 7, id, FORMAT, &path, 0.01).unwrap();
    let url_path = format!("/b/{id}.tar.gz");
    server.add(&url_path, std::fs::read(&path).unwrap());
    Build {
        id: id.into(),
        path,
        artifact,
        url_path,
    }
}

/// Writes and serves the delta from `base` to `target`.
pub fn delta(
    dir: &Path,
    server: &testkit::testserver::artifact::ArtifactServer,
    base: &Build,
    target: &Build,
) -> (DeltaSpec, String) {
    let out = dir.join(format!("{}-from-{}.delta.tar.zst", target.id, base.id));
    let url_path = format!("/d/{}-from-{}.tar.zst", target.id, base.id);
    let (spec, _) = delta_spec(
        (&base.path, FORMAT),
        (&target.path, FORMAT),
        &out,
        &server.url(&url_path),
    )
    .unwrap();
    server.add(&url_path, std::fs::read(&out).unwrap());
    (spec, url_path)
}

pub fn manifest(
    server: &testkit::testserver::artifact::ArtifactServer,
    b: &Build,
    delta: Option<&DeltaSpec>,
) -> String {
    let m = buildgen::manifest_json(&b.id, &server.url(&b.url_path), &b.artifact, FORMAT);
    let mut v: serde_json::Value = serde_json::from_str(&m).unwrap();
    if let Some(d) = delta {
        v["delta"] = serde_json::Value::Object(d.to_json());
    }
    v.to_string()
}

/// Everything a full unpack determines about a tree, by relative path.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let what = if m.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).unwrap())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o} {}", m.mode() & 0o7777, m.mtime())
            } else {
                let digest = hex::encode(sha2::Sha256::digest(std::fs::read(&p).unwrap()));
                format!("file {:o} {} {digest}", m.mode() & 0o7777, m.mtime())
            };
            out.insert(rel, what);
        }
    }
    out
}

/// A full unpack of `b` into a fresh directory, the reference a delta must match.
pub fn full_unpack(dir: &Path, b: &Build) -> PathBuf {
    let slot = dir.join(format!("reference-{}", b.id));
    std::fs::create_dir(&slot).unwrap();
    let f = std::fs::File::open(&b.path).unwrap();
    unpack(
        f,
        FORMAT,
        &slot,
        &UnpackLimits::default(),
        &Progress::default(),
    )
    .unwrap();
    slot
}

/// The live slot's directory (`current` resolved).
pub fn live_slot(root: &Path) -> PathBuf {
    root.join(std::fs::read_link(root.join("current")).unwrap())
}

/// A filesystem image loop-mounted for a test; unmounted (lazily) and its
/// loop device freed on drop, so a panicking test leaves no mount.
#[derive(Debug)]
pub struct LoopFs {
    pub mount: PathBuf,
}

impl LoopFs {
    /// Makes a `size_mb` image of `fs` (`ext4`, `xfs`, `btrfs`, or
    /// `ext4-coarse`: 128-byte inodes, so timestamps have whole seconds
    /// only) in `dir` and mounts it at `mount`. `Err` says why it cannot (not root, mkfs
    /// missing): the caller prints `SKIPPED: ...`.
    pub fn mount(dir: &Path, fs: &str, size_mb: u64, mount: &Path) -> Result<LoopFs, String> {
        if !crate::disk::is_root() {
            return Err("needs root to loop-mount".into());
        }
        let mkfs = format!("mkfs.{}", fs.trim_end_matches("-coarse"));
        let image = dir.join(format!("{fs}.img"));
        let f = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        f.set_len(size_mb << 20).map_err(|e| e.to_string())?;
        let args: &[&str] = match fs {
            "xfs" => &["-q", "-f", "-m", "reflink=1"],
            "btrfs" => &["-q", "-f"],
            "ext4-coarse" => &["-q", "-F", "-I", "128"],
            _ => &["-q", "-F"],
        };
        let made = std::process::Command::new(&mkfs)
            .args(args)
            .arg(&image)
            .output()
            .map_err(|e| format!("{mkfs}: {e} (install its package)"))?;
        if !made.status.success() {
            return Err(format!("{mkfs}: {}", String::from_utf8_lossy(&made.stderr)));
        }
        std::fs::create_dir_all(mount).map_err(|e| e.to_string())?;
        let mounted = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(mount)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !mounted.status.success() {
            return Err(format!(
                "mount: {}",
                String::from_utf8_lossy(&mounted.stderr)
            ));
        }
        Ok(LoopFs {
            mount: mount.to_path_buf(),
        })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // -d frees the loop device once the lazy unmount completes.
        let _ = std::process::Command::new("umount")
            .args(["-l", "-d"])
            .arg(&self.mount)
            .status();
    }
}

/// Every regular file of `slot` with its inode, by relative path.
pub fn inodes(slot: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    for rel in tree(slot).keys() {
        let m = std::fs::symlink_metadata(slot.join(rel)).unwrap();
        if m.is_file() {
            out.insert(rel.clone(), m.ino());
        }
    }
    out
}
