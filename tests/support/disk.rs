//! Small filesystems for the disk-full tests: a tmpfs mounted for a test
//! (lazily unmounted on drop, so a panicking test leaves no mount), and a
//! filler that takes all of a filesystem's space from outside the agent.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Whether the tests run as root (mounting, other uids, sockets of other
/// modes need it): the tests that do print why they skip otherwise.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A tmpfs mounted for the test; lazily unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size_mb: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}M,mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `dir/filler` until the filesystem is full; returns its path.
pub fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("filler: {e}"));
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filler: {e}"),
        }
    }
    let _ = f.sync_all();
    path
}
