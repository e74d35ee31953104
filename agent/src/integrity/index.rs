//! The publisher's file index of a build: every regular file of the
//! artifact with its size and sha256, computed once by `release publish`
//! instead of on every host.
//!
//! The index is a zstd-compressed JSON [`FileIndex`] published beside the
//! artifact. The manifest commits to it (`index: {url, sha256, size}` in the
//! build's spec), so it is covered by the manifest's signature as the
//! artifact is, and it names the artifact's sha256, so an index is never
//! applied to another build. A host that unpacked the artifact takes each
//! file's digest from the index ([`FileIndex::fill`]) when the path and
//! size match what it wrote; whatever the index does not account for stays
//! "not known" and is hashed after the deploy, off its path, as without an
//! index. A missing or broken index therefore costs time, never a deploy.
//!
//! Crash guarantees: [`FileIndex::write`] writes a temp name and renames it
//! into place, so a crash of `release publish` leaves the old index or none;
//! reading only reads.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::record::{Entry, Kind};
use crate::error::{Error, Result};
use crate::manifest::{Format, Sha256Sum};

const VERSION: u32 = 1;
/// Largest index accepted, decompressed: about 2 M files.
const MAX_INDEX_BYTES: u64 = 512 << 20;

/// Every regular file of one artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIndex {
    pub version: u32,
    /// The artifact this index describes.
    pub artifact: Sha256Sum,
    pub files: Vec<IndexedFile>,
}

/// One regular file of the artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedFile {
    /// Relative to the slot, as the unpack writes it (`./` and `//` gone).
    pub path: String,
    pub size: u64,
    pub sha256: Sha256Sum,
}

/// What [`FileIndex::fill`] did with a slot's record entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filled {
    /// Files whose digest now comes from the index.
    pub filled: usize,
    /// Files the index lists with another size, or not at all: left to be
    /// hashed (a publisher whose index does not match its artifact).
    pub unmatched: usize,
}

impl FileIndex {
    /// Reads the artifact at `path` once: its files' digests and its own.
    pub fn of_artifact(path: &Path, format: Format) -> Result<FileIndex> {
        let mut files = Vec::new();
        let artifact = crate::unpack::delta::read_artifact(path, format, |entry| {
            let header = entry.header();
            if matches!(
                header.entry_type(),
                tar::EntryType::Regular | tar::EntryType::Continuous
            ) {
                let name = normal(&String::from_utf8_lossy(&entry.path_bytes()));
                let mut hasher = Sha256::new();
                let size = std::io::copy(entry, &mut hasher)?;
                files.push(IndexedFile {
                    path: name,
                    size,
                    sha256: Sha256Sum::from_bytes(hasher.finalize().into()),
                });
            }
            Ok(())
        })?;
        Ok(FileIndex {
            version: VERSION,
            artifact,
            files,
        })
    }

    /// Writes the index, compressed, to `out` (a temp name renamed into
    /// place) and returns its sha256 and size for the manifest.
    pub fn write(&self, out: &Path) -> Result<(Sha256Sum, u64)> {
        let io = |e: std::io::Error| Error::io(out, e);
        let tmp = PathBuf::from(format!("{}.tmp", out.display()));
        {
            let file = std::fs::File::create(&tmp).map_err(io)?;
            let mut z = zstd::Encoder::new(BufWriter::new(file), 9).map_err(io)?;
            serde_json::to_writer(&mut z, self)
                .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            let mut w = z.finish().map_err(io)?;
            w.flush().map_err(io)?;
            w.get_ref().sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, out).map_err(io)?;
        crate::artifact::sha256::hash_file(out)
    }

    /// Reads a downloaded (already size- and sha256-verified) index and
    /// checks that it describes `artifact`.
    pub fn load(path: &Path, artifact: &Sha256Sum) -> Result<FileIndex> {
        let refuse = |reason: String| Error::FileIndexRefused {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let z = zstd::Decoder::new(BufReader::new(file))
            .map_err(|e| refuse(format!("not zstd: {e}")))?;
        let mut json = Vec::new();
        z.take(MAX_INDEX_BYTES + 1)
            .read_to_end(&mut json)
            .map_err(|e| refuse(format!("cannot decompress: {e}")))?;
        if json.len() as u64 > MAX_INDEX_BYTES {
            return Err(refuse(format!("more than {MAX_INDEX_BYTES} bytes")));
        }
        let index: FileIndex =
            serde_json::from_slice(&json).map_err(|e| refuse(format!("not an index: {e}")))?;
        if index.version != VERSION {
            return Err(refuse(format!(
                "version {} (this agent reads {VERSION})",
                index.version
            )));
        }
        if index.artifact != *artifact {
            return Err(refuse(format!(
                "it describes artifact {}, not {artifact}",
                index.artifact
            )));
        }
        Ok(index)
    }

    /// Gives every regular file of `entries` (a slot just unpacked from
    /// this index's artifact) the index's digest, where the index lists the
    /// same path with the same size. The artifact's sha256 was verified, and
    /// the manifest commits to both, so the index speaks for what was
    /// written.
    pub fn fill(&self, entries: &mut [Entry]) -> Filled {
        let by_path: HashMap<&str, &IndexedFile> =
            self.files.iter().map(|f| (f.path.as_str(), f)).collect();
        let mut out = Filled::default();
        for e in entries
            .iter_mut()
            .filter(|e| e.stat.kind == Kind::File && !e.known)
        {
            let listed = e.path.to_str().and_then(|p| by_path.get(p));
            match listed {
                Some(f) if f.size == e.stat.size => {
                    e.digest = f.sha256.to_bytes();
                    e.known = true;
                    out.filled += 1;
                }
                _ => out.unmatched += 1,
            }
        }
        out
    }
}

/// A tar path as the slot holds it: its normal components only.
fn normal(path: &str) -> String {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tar_paths_are_the_slots_relative_paths() {
        assert_eq!(normal("./app/x.php"), "app/x.php");
        assert_eq!(normal("app//x.php"), "app/x.php");
        assert_eq!(normal("app/"), "app");
    }
}
