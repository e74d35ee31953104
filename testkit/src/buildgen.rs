//! Deterministic synthetic builds that look like a web monolith, for the
//! demo, the tests and the benchmarks: mostly 1-20 KB text sources, some
//! 100 KB-1 MB assets (half of them random bytes) and a few 5-20 MB mostly
//! random binaries. The same profile, seed and build id always give the
//! same bytes. Writes only the output file, via a temp name renamed into
//! place, so a crash leaves no half-written artifact under the final name.

use std::io::Write;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use deploy_agent::error::{Error, Result};
use deploy_agent::manifest::{BuildSpec, Format};

/// The shape of a synthetic build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildProfile {
    /// Text source files (1-20 KB).
    pub sources: usize,
    /// Assets of 100 KB-1 MB, half random.
    pub assets: usize,
    /// Binaries of 5-20 MB, mostly random.
    pub binaries: usize,
    /// Files per directory before a new directory is started.
    pub per_dir: usize,
}

impl BuildProfile {
    /// About 40,000 files and 400 MB: the benchmark default.
    pub const FULL: BuildProfile = BuildProfile {
        sources: 39_000,
        assets: 200,
        binaries: 4,
        per_dir: 40,
    };
    /// About 4,000 files and 40 MB (`--small`).
    pub const SMALL: BuildProfile = BuildProfile {
        sources: 3_900,
        assets: 20,
        binaries: 1,
        per_dir: 40,
    };
    /// About 1,500 files and 12 MB: the demo and end-to-end tests.
    pub const DEMO: BuildProfile = BuildProfile {
        sources: 1_500,
        assets: 10,
        binaries: 0,
        per_dir: 40,
    };
    /// A few dozen files: unit-sized tests.
    pub const TINY: BuildProfile = BuildProfile {
        sources: 60,
        assets: 2,
        binaries: 0,
        per_dir: 16,
    };
}

/// A generated artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub sha256: String,
    pub size: u64,
    pub entries: u64,
    pub unpacked_bytes: u64,
}

const WORDS: &[&str] = &[
    "function",
    "return",
    "$this",
    "->",
    "array",
    "public",
    "static",
    "class",
    "namespace",
    "use",
    "if",
    "else",
    "foreach",
    "as",
    "=>",
    "null",
    "true",
    "false",
    "new",
    "throw",
    "message",
    "channel",
    "team",
    "user",
    "workspace",
    "token",
    "cache",
    "query",
    "result",
    "(",
    ")",
    "{",
    "}",
    ";",
    "$id",
    "$ctx",
    "$rows",
    "count",
    "strlen",
    "isset",
    "\n",
    "\n    ",
];

fn text(rng: &mut StdRng, len: usize, build: &str, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(format!("<?php // build {build}\n").as_bytes());
    while out.len() < len {
        let w = WORDS[rng.gen_range(0..WORDS.len())];
        out.extend_from_slice(w.as_bytes());
        out.push(b' ');
    }
    out.truncate(len);
}

/// Writes the build `build_id` with `profile` as an archive in `format` to
/// `out`. `seed` fixes the content; builds with the same seed and different
/// ids share about 90% of their files, like consecutive releases.
pub fn write_build(
    profile: BuildProfile,
    seed: u64,
    build_id: &str,
    format: Format,
    out: &Path,
) -> Result<Artifact> {
    write_build_changing(profile, seed, build_id, format, out, 0.1)
}

/// [`write_build`] where `changed` (0 to 1) of the source files differ
/// between two build ids of the same seed (10% in `write_build`); assets
/// and binaries are the same in every build. Two builds of one seed thus
/// model consecutive deploys of a monolith (delta deploys).
pub fn write_build_changing(
    profile: BuildProfile,
    seed: u64,
    build_id: &str,
    format: Format,
    out: &Path,
    changed: f64,
) -> Result<Artifact> {
    let tmp = out.with_extension("partial-gen");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let hashing = HashWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        size: 0,
    };
    let io = |e: std::io::Error| Error::io(&tmp, e);
    let (entries, unpacked_bytes, hw) = match format {
        Format::Tar => {
            let (e, b, w) = fill(profile, seed, build_id, changed, hashing).map_err(io)?;
            (e, b, w)
        }
        Format::TarGz => {
            let enc = flate2::write::GzEncoder::new(hashing, flate2::Compression::new(6));
            let (e, b, enc) = fill(profile, seed, build_id, changed, enc).map_err(io)?;
            (e, b, enc.finish().map_err(io)?)
        }
        Format::TarZst => {
            let enc = zstd::Encoder::new(hashing, 3).map_err(io)?;
            let (e, b, enc) = fill(profile, seed, build_id, changed, enc).map_err(io)?;
            (e, b, enc.finish().map_err(io)?)
        }
    };
    let HashWriter {
        mut inner,
        hasher,
        size,
    } = hw;
    inner.flush().map_err(io)?;
    drop(inner);
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(Artifact {
        sha256: hex::encode(hasher.finalize()),
        size,
        entries,
        unpacked_bytes,
    })
}

fn fill<W: Write>(
    p: BuildProfile,
    seed: u64,
    build_id: &str,
    changed_fraction: f64,
    w: W,
) -> std::io::Result<(u64, u64, W)> {
    let mut tar = tar::Builder::new(w);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut content_rng = StdRng::seed_from_u64(seed);
    // Which files differ between builds depends on the build id.
    let mut change_rng = StdRng::seed_from_u64(
        seed ^ u64::from_le_bytes(
            Sha256::digest(build_id.as_bytes())[..8]
                .try_into()
                .unwrap_or([0; 8]),
        ),
    );
    let mut entries = 0u64;
    let mut bytes = 0u64;
    let mut buf = Vec::with_capacity(1 << 20);
    let dir_header = |tar: &mut tar::Builder<W>, path: &str| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        tar.append_data(&mut h, path, std::io::empty())
    };
    let add =
        |tar: &mut tar::Builder<W>, path: &str, data: &[u8], mode: u32| -> std::io::Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            tar.append_data(&mut h, path, data)
        };
    dir_header(&mut tar, "app")?;
    entries += 1;
    let mut dir = String::new();
    for i in 0..p.sources {
        if i % p.per_dir == 0 {
            dir = format!("app/src/m{:04}", i / p.per_dir);
            if i == 0 {
                dir_header(&mut tar, "app/src")?;
                entries += 1;
            }
            dir_header(&mut tar, &dir)?;
            entries += 1;
        }
        // 1-20 KB, most of them small (mean about 5.8 KB), as in a real
        // source tree.
        let u: f64 = content_rng.gen();
        let len = 1024 + (u * u * u * (19.0 * 1024.0)) as usize;
        let changed = change_rng.gen_bool(changed_fraction.clamp(0.0, 1.0));
        let tag = if changed { build_id } else { "base" };
        // Each file's words come from its own generator, so a changed file
        // (a longer or shorter header) does not shift every later file.
        let mut file_rng = StdRng::seed_from_u64(content_rng.gen());
        text(&mut file_rng, len, tag, &mut buf);
        add(&mut tar, &format!("{dir}/f{i:05}.php"), &buf, 0o644)?;
        entries += 1;
        bytes += len as u64;
    }
    if p.assets > 0 {
        dir_header(&mut tar, "app/assets")?;
        entries += 1;
    }
    for i in 0..p.assets {
        let len = content_rng.gen_range(100 * 1024..1024 * 1024);
        buf.clear();
        if i % 2 == 0 {
            buf.resize(len, 0);
            content_rng.fill(&mut buf[..]);
        } else {
            text(&mut content_rng, len, "asset", &mut buf);
        }
        add(&mut tar, &format!("app/assets/a{i:04}.bin"), &buf, 0o644)?;
        entries += 1;
        bytes += len as u64;
    }
    if p.binaries > 0 {
        dir_header(&mut tar, "app/bin")?;
        entries += 1;
    }
    for i in 0..p.binaries {
        let len = content_rng.gen_range(5 << 20..20 << 20);
        buf.clear();
        buf.resize(len, 0);
        // Mostly random: the last eighth compresses, like real binaries' tables.
        let rnd = len - len / 8;
        content_rng.fill(&mut buf[..rnd]);
        add(&mut tar, &format!("app/bin/tool{i}"), &buf, 0o755)?;
        entries += 1;
        bytes += len as u64;
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(build_id.len() as u64);
    h.set_mtime(1_700_000_000);
    tar.append_data(&mut h, "BUILD", build_id.as_bytes())?;
    entries += 1;
    bytes += build_id.len() as u64;
    let w = tar.into_inner()?;
    Ok((entries, bytes, w))
}

struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The manifest JSON for an artifact served at `url`.
pub fn manifest_json(build_id: &str, url: &str, a: &Artifact, format: Format) -> String {
    let spec = BuildSpec {
        build: build_id.into(),
        urls: vec![url.into()],
        sha256: a
            .sha256
            .parse()
            .unwrap_or_else(|e| panic!("generated artifact: {e}")),
        size: a.size,
        format,
        index: None,
    };
    serde_json::Value::Object(spec.to_json()).to_string()
}
