//! Size and sha256 verification of an artifact while its bytes stream past.
//!
//! [`HashingReader`] sits between the in-order reader of the (possibly still
//! downloading) artifact and the unpacker, so hashing costs no extra pass
//! over the data. The digest of the whole artifact is compared only after the
//! last byte was read; until then nothing unpacked may be trusted.
//!
//! Pure computation in memory: a crash loses only the running digest, and
//! the next attempt hashes again from the first byte.

use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::Ordering;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::manifest::Sha256Sum;
use crate::progress::Progress;

/// A reader that hashes and counts everything read through it, and reports
/// the count as `bytes_unpacked_input`.
#[derive(Debug)]
pub struct HashingReader<'p, R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    progress: &'p Progress,
}

impl<'p, R: Read> HashingReader<'p, R> {
    /// Wraps `inner`; nothing is read yet.
    pub fn new(inner: R, progress: &'p Progress) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            progress,
        }
    }

    /// Reads the rest of the stream through the hasher (the unpacker stops at
    /// the tar end marker; the digest covers every byte).
    pub fn drain(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 256 << 10];
        while self.read(&mut buf)? > 0 {}
        Ok(())
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The digest of everything read, and the byte count.
    pub fn finish(self) -> ([u8; 32], u64) {
        (self.hasher.finalize().into(), self.bytes)
    }
}

/// The sha256 and size of the file at `path`, in one read.
pub fn hash_file(path: &Path) -> Result<(Sha256Sum, u64)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Nothing watches this read.
    let progress = Progress::default();
    let mut reader = HashingReader::new(file, &progress);
    reader.drain().map_err(|e| Error::io(path, e))?;
    let (digest, size) = reader.finish();
    Ok((Sha256Sum::from_bytes(digest), size))
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.progress
            .bytes_unpacked_input
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Checks a finished digest and size against the manifest; `source` names
/// the URL or cache path for the error.
pub fn check(
    source: &str,
    expected: &[u8; 32],
    expected_size: u64,
    actual: &[u8; 32],
    actual_size: u64,
) -> Result<()> {
    if actual_size != expected_size {
        return Err(Error::SizeMismatch {
            url: source.to_string(),
            expected: expected_size,
            actual: actual_size,
        });
    }
    if actual != expected {
        return Err(Error::ChecksumFailed {
            url: source.to_string(),
            expected: hex::encode(expected),
            calculated: hex::encode(actual),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_what_it_reads() {
        let progress = Progress::default();
        let mut reader = HashingReader::new(&b"abc"[..], &progress);
        reader.drain().unwrap_or_default();
        let (digest, n) = reader.finish();
        assert_eq!(n, 3);
        assert_eq!(
            hex::encode(digest),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(check("x", &digest, 3, &digest, 3).is_ok());
        assert!(matches!(
            check("x", &[0; 32], 3, &digest, 3),
            Err(Error::ChecksumFailed { .. })
        ));
    }
}
