//! The bodies of the cargo-fuzz targets in `fuzz/`: one function per
//! target, taking the fuzzer's bytes and panicking only when an invariant
//! breaks. They live in the library so a stable `#[test]`
//! (`tests/operator/fuzz_smoke.rs`) runs them over seeds and random inputs and
//! keeps them compiling without nightly.
//!
//! Each call works in its own temp directory (tmpfs when there is one) and
//! removes it; a crash mid-call leaves at most that directory behind.

use std::path::{Path, PathBuf};

use deploy_agent::manifest::{Manifest, UrlPolicy, MAX_URLS};
use deploy_agent::progress::Progress;
use deploy_agent::unpack::{Format, UnpackLimits};

/// Manifest parser and signature check: never panic; whatever parses obeys
/// the manifest's validated invariants; nothing random passes a signature
/// check against a configured key.
pub fn manifest(data: &[u8]) {
    for allow_file in [false, true] {
        if let Ok(m) = Manifest::parse(data, UrlPolicy { allow_file }) {
            assert!(
                swapper::validate_build_id(&m.spec.build),
                "bad build id accepted"
            );
            assert!(!m.spec.urls.is_empty() && m.spec.urls.len() <= MAX_URLS);
            assert!(
                m.spec.sha256.len() == 64
                    && m.spec
                        .sha256
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "digest not normalised"
            );
            assert!(m.spec.size > 0);
            if !allow_file {
                assert!(m.spec.urls.iter().all(|u| !u.starts_with("file:")));
            }
        }
    }
    // A fixed, well-known key: random input cannot carry its signature.
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let public = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        key.verifying_key().as_bytes(),
    );
    if let Ok(trust) = deploy_agent::sign::TrustedKeys::parse(&[public]) {
        assert!(
            deploy_agent::sign::verify(data, &trust).is_err(),
            "an unsigned input passed the signature check"
        );
    }
}

/// Unpacker: the first byte picks the format, the rest is the archive.
/// Never panics, and never writes outside the slot, whatever it accepts.
pub fn unpack(data: &[u8]) {
    let Some((&sel, archive)) = data.split_first() else {
        return;
    };
    let format = match sel % 3 {
        0 => Format::Tar,
        1 => Format::TarGz,
        _ => Format::TarZst,
    };
    let Ok(tmp) = tempdir() else { return };
    let slot = tmp.path().join("slot");
    let outside = tmp.path().join("outside");
    if std::fs::create_dir(&slot).is_err() || std::fs::create_dir(&outside).is_err() {
        return;
    }
    let limits = UnpackLimits {
        max_bytes: 16 << 20,
        max_entries: 10_000,
        ..UnpackLimits::default()
    };
    let _ = deploy_agent::unpack::unpack(archive, format, &slot, &limits, &Progress::default());
    let mut siblings: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    siblings.sort();
    assert_eq!(
        siblings,
        vec![outside.clone(), slot],
        "wrote next to the slot"
    );
    assert!(is_empty(&outside), "wrote outside the slot");
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

fn tempdir() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("da-fuzz-").tempdir_in(shm) {
            return Ok(d);
        }
    }
    tempfile::Builder::new().prefix("da-fuzz-").tempdir()
}
