//! Tar archives built by hand for the unpack, fetch and fault tests:
//! entries with raw names (so `..`, `/abs` and odd link targets survive the
//! tar crate's own checks), and the compression of each format.
//!
//! Builds in memory only; nothing to clean up if the test dies.

use std::io::Write;

use deploy_agent::unpack::Format;

/// Appends one entry with raw name/link bytes (so `..` and `/abs` survive).
pub fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    name: &[u8],
    kind: tar::EntryType,
    link: &[u8],
    mode: u32,
    data: &[u8],
) {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_mtime(1_600_000_000);
    header.set_size(data.len() as u64);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

/// A regular file, mode 0644.
pub fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    raw_entry(
        b,
        name.as_bytes(),
        tar::EntryType::Regular,
        b"",
        0o644,
        data,
    );
}

/// A symlink `name` -> `target`.
pub fn symlink(b: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
    raw_entry(
        b,
        name.as_bytes(),
        tar::EntryType::Symlink,
        target.as_bytes(),
        0o777,
        b"",
    );
}

/// An uncompressed tar of the entries `entries` appends.
pub fn tar_of(entries: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    entries(&mut b);
    b.into_inner().unwrap()
}

/// `tar` as an archive of `format` (fast settings: the tests are about the
/// archive's entries, not its ratio).
pub fn compress(tar: &[u8], format: Format) -> Vec<u8> {
    match format {
        Format::Tar => tar.to_vec(),
        Format::TarGz => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Format::TarZst => zstd::encode_all(tar, 3).unwrap(),
    }
}

/// A tar of `files` PHP-like text files (200 B to 12 KB of keywords, from
/// `seed`) named by `name`: what the throughput figures unpack, close to a
/// real PHP tree in size spread and compressibility.
pub fn php_tree(seed: u64, files: usize, name: impl Fn(usize) -> String) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let words = [
        "function", "return", "$this->", "array(", "public", "static", "=>", ";\n",
    ];
    tar_of(|b| {
        for i in 0..files {
            let len = rng.gen_range(200..12_000);
            let mut text = String::with_capacity(len + 16);
            while text.len() < len {
                text.push_str(words[rng.gen_range(0..words.len())]);
                text.push(' ');
            }
            file(b, &name(i), text.as_bytes());
        }
    })
}
