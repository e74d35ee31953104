//! How a delta reuses an unchanged file of the base slot without letting
//! the two slots share an inode (issue 20): a reflink where the filesystem
//! shares extents copy-on-write, an in-kernel copy everywhere else.
//!
//! | filesystem | mechanism | cost of a reused file |
//! |---|---|---|
//! | XFS (`reflink=1`, the mkfs default), btrfs | `FICLONE` reflink | metadata only |
//! | ext4, tmpfs, others | `copy_file_range` (through `std::io::copy`) | the bytes, copied in the kernel |
//!
//! Hard links (what deltas used before) are never used: a write through one
//! name changed both slots, so a rollback served the edit.
//!
//! Crash guarantees: writes only new files in the claimed (unmarked) cold
//! slot, and a probe file in `.deploy/` under a temp name that recovery
//! removes; a crash leaves garbage that is cleared before the slot's next
//! use.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use tracing::info;

use crate::integrity::Mechanism;

/// Whether files in `dir` (the deploy root's `.deploy/`, on the slots'
/// filesystem) can be reflinked: one FICLONE between two probe files.
/// Checked once per deploy root; the answer is logged.
pub fn probe(dir: &Path) -> Mechanism {
    let (a, b) = (
        dir.join(format!(".reflink-probe-a.tmp.{}", std::process::id())),
        dir.join(format!(".reflink-probe-b.tmp.{}", std::process::id())),
    );
    let result = (|| -> io::Result<()> {
        std::fs::write(&a, b"probe")?;
        let src = File::open(&a)?;
        let dst = File::create(&b)?;
        swapper::fsutil::reflink(&src, &dst)
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    let how = match &result {
        Ok(()) => Mechanism::Reflink,
        Err(_) => Mechanism::Copy,
    };
    info!(dir = %dir.display(), how = how.as_str(), why = ?result.err().map(|e| e.to_string()), "slot file reuse mechanism");
    how
}

/// Fills the empty `dst` with the `len` bytes of `src`: a reflink when
/// `how` is [`Mechanism::Reflink`] (falling back to a copy if this file
/// cannot be cloned), else `copy_file_range` from offset 0 (a read/write
/// loop where the kernel refuses that). Returns what was done.
pub fn clone_or_copy(src: &File, dst: &File, len: u64, how: Mechanism) -> io::Result<Mechanism> {
    if how == Mechanism::Reflink {
        match swapper::fsutil::reflink(src, dst) {
            Ok(()) => return Ok(Mechanism::Reflink),
            Err(e) if cannot_clone(&e) => {}
            Err(e) => return Err(e),
        }
    }
    copy(src, dst, len)?;
    Ok(Mechanism::Copy)
}

fn cannot_clone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EOPNOTSUPP | Errno::EINVAL | Errno::EXDEV | Errno::ENOTTY | Errno::EPERM)
    )
}

/// Copies from offset 0: `io::copy` between two `File`s (through `Take`)
/// is `copy_file_range(2)` in the standard library on Linux, falling back
/// to sendfile or a read/write loop where the kernel refuses it.
fn copy(src: &File, mut dst: &File, len: u64) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut r = src;
    // Hashing the source may have moved its offset.
    r.seek(SeekFrom::Start(0))?;
    let n = io::copy(&mut r.take(len), &mut dst)?;
    if n != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file shrank while it was copied",
        ));
    }
    Ok(())
}
