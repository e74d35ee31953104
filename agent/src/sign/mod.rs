//! Signed manifests: ed25519 signatures over a canonical form of the
//! manifest, checked against the public keys in `[signing]`, plus the
//! `keygen` / `sign` helpers release engineers run.
//!
//! A signed manifest is the ordinary manifest with one more member:
//!
//! ```json
//! {"build": "b-3", "url": "...", "sha256": "...", "size": 1, "format": "tar.gz",
//!  "signatures": [{"key_id": "3f2a9c0e1b7d4a55", "sig": "<base64 of 64 bytes>"}]}
//! ```
//!
//! The signed message is `CONTEXT` followed by the canonical form of the
//! manifest object *without* its top-level `signatures` member: objects
//! with their keys sorted by their UTF-8 bytes, no whitespace, strings and
//! integers as `serde_json` writes them, floating-point numbers refused.
//! That is exactly `json.dumps(obj, sort_keys=True, separators=(",", ":"),
//! ensure_ascii=False)` in Python for the values a manifest holds, so other
//! release tooling can reproduce it. The agent verifies the same parsed
//! value it then deploys, so what was signed is what runs. Older agents
//! ignore the unknown `signatures` member, so signing can be rolled out
//! before it is enforced.
//!
//! The key id is the first 8 bytes (16 hex digits) of the sha256 of the
//! 32-byte public key: derived, so it cannot be mislabelled. Key files are
//! one line of base64: the 32-byte ed25519 seed (private, mode 0600) or the
//! 32-byte public key.
//!
//! Nothing here keeps state; `keygen` writes its private key with
//! `O_EXCL` and mode 0600 in one step, so a crash leaves no readable
//! partial key (at worst an empty file that the next run refuses to
//! overwrite).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand::RngCore as _;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::manifest::ManifestError;

/// Prepended to the canonical bytes before signing: a signature made for a
/// manifest can never be taken for a signature over anything else the same
/// key might sign, and a future format change gets a new context.
pub const CONTEXT: &[u8] = b"deploy-agent manifest v1\n";

/// The manifest member holding the signatures; never part of what is signed.
pub const FIELD: &str = "signatures";

/// The public keys this host trusts, by key id. Empty = signatures are not
/// required (and not checked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
}

impl TrustedKeys {
    /// Parses base64 public keys (the `[signing] public-keys` list).
    pub fn parse(public_keys: &[String]) -> std::result::Result<TrustedKeys, String> {
        let mut keys = BTreeMap::new();
        for (i, k) in public_keys.iter().enumerate() {
            let vk = parse_public_key(k).map_err(|e| format!("public-keys[{i}]: {e}"))?;
            keys.insert(key_id(&vk), vk);
        }
        Ok(TrustedKeys { keys })
    }

    /// True when no key is configured: manifests need no signature.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The configured key ids, for messages.
    pub fn ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }
}

/// The key id of a public key: 16 hex digits of its sha256.
pub fn key_id(vk: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(vk.as_bytes())[..8])
}

/// Parses one base64 public key (32 bytes).
pub fn parse_public_key(text: &str) -> std::result::Result<VerifyingKey, String> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{} bytes, an ed25519 public key has 32", b.len()))?;
    let vk =
        VerifyingKey::from_bytes(&arr).map_err(|e| format!("not an ed25519 public key: {e}"))?;
    if vk.is_weak() {
        // A small-order point: signatures under it prove nothing.
        return Err("a weak (small-order) ed25519 key; generate one with keygen".into());
    }
    Ok(vk)
}

/// The canonical bytes of a manifest object without its `signatures`
/// member, prefixed with [`CONTEXT`]: the message that is signed.
pub fn signed_message(obj: &Map<String, Value>) -> std::result::Result<Vec<u8>, String> {
    let mut out = CONTEXT.to_vec();
    let mut keys: Vec<&String> = obj.keys().filter(|k| k.as_str() != FIELD).collect();
    // Sorted here, not by the map: serde_json's map keeps insertion order
    // when any crate in the build enables `preserve_order`.
    keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    out.push(b'{');
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(k, &mut out);
        out.push(b':');
        write_canonical(&obj[k.as_str()], &mut out)?;
    }
    out.push(b'}');
    Ok(out)
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) -> std::result::Result<(), String> {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) if n.is_f64() => {
            // Float spellings differ between JSON libraries (1.0, 1e0, 1):
            // refusing them keeps the canonical form reproducible.
            return Err(format!(
                "number {n} is not an integer; signed manifests may hold only integers"
            ));
        }
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_string(s, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_canonical(&m[k.as_str()], out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn reject(reason: impl Into<String>) -> ManifestError {
    ManifestError {
        field: FIELD.into(),
        reason: reason.into(),
    }
}

/// Checks the signatures of manifest `bytes` against `trust`. With no
/// trusted keys every manifest passes (the sha256 still protects the
/// artifact). Otherwise at least one signature by a trusted key must
/// verify, and a signature by a trusted key that does not verify rejects
/// the manifest even if another one does (it means the content changed).
pub fn verify(bytes: &[u8], trust: &TrustedKeys) -> std::result::Result<(), ManifestError> {
    if trust.is_empty() {
        return Ok(());
    }
    let doc = |reason: String| ManifestError {
        field: "(document)".into(),
        reason,
    };
    if bytes.len() > crate::manifest::MAX_MANIFEST_BYTES {
        return Err(doc(format!("{} bytes, too large", bytes.len())));
    }
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| doc(format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(doc("must be a JSON object".into()));
    };
    let trusted = trust.ids().join(", ");
    let sigs = match obj.get(FIELD) {
        None | Some(Value::Null) => {
            return Err(reject(format!(
                "missing: this host requires a signature by one of the keys [{trusted}]; \
                 sign the manifest with `deploy-agent sign`"
            )))
        }
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(_) => {
            return Err(reject(
                "must be a non-empty list of {\"key_id\": ..., \"sig\": ...} objects",
            ))
        }
    };
    let message = signed_message(&obj).map_err(reject)?;
    let mut good = None;
    let mut unknown = Vec::new();
    for (i, s) in sigs.iter().enumerate() {
        let (Some(id), Some(sig)) = (
            s.get("key_id").and_then(Value::as_str),
            s.get("sig").and_then(Value::as_str),
        ) else {
            return Err(reject(format!(
                "entry {i} must be an object with string members key_id and sig"
            )));
        };
        let Some(vk) = trust.keys.get(id) else {
            unknown.push(id.to_string());
            continue;
        };
        let raw = B64
            .decode(sig)
            .map_err(|e| reject(format!("signature by key {id} is not base64: {e}")))?;
        let sig = Signature::from_slice(&raw)
            .map_err(|_| reject(format!("signature by key {id} is not 64 bytes")))?;
        if vk.verify_strict(&message, &sig).is_err() {
            return Err(reject(format!(
                "signature by key {id} does not match the manifest: it was changed after \
                 signing (or signed over other content); republish a correctly signed manifest"
            )));
        }
        good = Some(id.to_string());
    }
    match good {
        Some(_) => Ok(()),
        None => Err(reject(format!(
            "signed only by unknown key(s) [{}]; this host trusts [{trusted}]",
            unknown.join(", ")
        ))),
    }
}

/// A fresh key pair from the OS random generator.
pub fn generate() -> SigningKey {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

/// Writes a new private key to `path` (mode 0600, never overwriting) and
/// its public key to `<path>.pub`. Returns (public key base64, key id).
pub fn keygen(path: &Path) -> Result<(String, String)> {
    let key = generate();
    let public = B64.encode(key.verifying_key().as_bytes());
    let id = key_id(&key.verifying_key());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::SigningKey {
            path: path.to_path_buf(),
            reason: format!("cannot create: {e} (an existing key is never overwritten)"),
        })?;
    writeln!(f, "{}", B64.encode(key.to_bytes()))
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))?;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    std::fs::write(&pub_path, format!("{public}\n")).map_err(|e| Error::io(&pub_path, e))?;
    Ok((public, id))
}

/// Reads a private key file written by [`keygen`].
pub fn load_private_key(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::SigningKey {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = B64
        .decode(text.trim())
        .map_err(|e| bad(format!("not base64: {e}")))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| bad(format!("{} bytes, a private key file holds 32", b.len())))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Signs manifest `bytes` with `key`: validates the manifest, then adds (or
/// replaces) this key's entry in `signatures`, keeping other keys' entries
/// so a manifest can carry the old and the new key's signature during a
/// rotation. Returns the signed manifest as pretty JSON.
pub fn sign(bytes: &[u8], key: &SigningKey) -> Result<String> {
    let invalid = |reason: String| Error::Sign { reason };
    // Refuse to sign what no agent would deploy.
    crate::manifest::Manifest::parse(bytes, crate::manifest::UrlPolicy { allow_file: true })
        .map_err(|e| invalid(e.to_string()))?;
    let v: Value = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    let Value::Object(mut obj) = v else {
        return Err(invalid("the manifest must be a JSON object".into()));
    };
    let message = signed_message(&obj).map_err(invalid)?;
    let id = key_id(&key.verifying_key());
    let entry = serde_json::json!({"key_id": id, "sig": B64.encode(key.sign(&message).to_bytes())});
    let mut sigs: Vec<Value> = match obj.remove(FIELD) {
        Some(Value::Array(a)) => a
            .into_iter()
            .filter(|s| s.get("key_id").and_then(Value::as_str) != Some(id.as_str()))
            .collect(),
        _ => Vec::new(),
    };
    sigs.push(entry);
    obj.insert(FIELD.into(), Value::Array(sigs));
    serde_json::to_string_pretty(&Value::Object(obj)).map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn manifest() -> String {
        serde_json::json!({"build": "b-1", "url": "http://h/a.tar.gz", "sha256": SHA,
            "size": 10, "format": "tar.gz", "deploy_id": "r1", "extra": {"z": 1, "a": [true, null]}})
        .to_string()
    }

    fn trust(keys: &[&SigningKey]) -> TrustedKeys {
        let list: Vec<String> = keys
            .iter()
            .map(|k| B64.encode(k.verifying_key().as_bytes()))
            .collect();
        TrustedKeys::parse(&list).unwrap()
    }

    #[test]
    fn valid_signature_is_accepted_and_no_keys_accepts_anything() {
        let k = generate();
        let signed = sign(manifest().as_bytes(), &k).unwrap();
        verify(signed.as_bytes(), &trust(&[&k])).unwrap();
        verify(manifest().as_bytes(), &TrustedKeys::default()).unwrap();
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter_but_content_does() {
        let k = generate();
        let signed: Value =
            serde_json::from_str(&sign(manifest().as_bytes(), &k).unwrap()).unwrap();
        // Re-serialised compactly (a different byte form): still valid.
        verify(signed.to_string().as_bytes(), &trust(&[&k])).unwrap();
        for (field, value) in [
            ("build", serde_json::json!("b-2")),
            ("sha256", serde_json::json!(SHA.replace('e', "f"))),
            ("url", serde_json::json!("http://evil/a.tar.gz")),
            ("new_field", serde_json::json!(1)),
        ] {
            let mut t = signed.clone();
            t[field] = value;
            let e = verify(t.to_string().as_bytes(), &trust(&[&k])).unwrap_err();
            assert_eq!(e.field, FIELD, "{field}");
            assert!(e.reason.contains("does not match"), "{field}: {e}");
        }
    }

    #[test]
    fn unknown_key_and_unsigned_are_rejected() {
        let (k, other) = (generate(), generate());
        let signed = sign(manifest().as_bytes(), &other).unwrap();
        let e = verify(signed.as_bytes(), &trust(&[&k])).unwrap_err();
        assert!(e.reason.contains("unknown key"), "{e}");
        assert!(e.reason.contains(&key_id(&k.verifying_key())), "{e}");
        let e = verify(manifest().as_bytes(), &trust(&[&k])).unwrap_err();
        assert!(e.reason.starts_with("missing"), "{e}");
    }

    #[test]
    fn rotation_accepts_either_key_and_double_signed_manifests() {
        let (old, new) = (generate(), generate());
        let both = trust(&[&old, &new]);
        for k in [&old, &new] {
            verify(sign(manifest().as_bytes(), k).unwrap().as_bytes(), &both).unwrap();
        }
        // Signed by both: hosts trusting only one of them accept it too.
        let twice = sign(sign(manifest().as_bytes(), &old).unwrap().as_bytes(), &new).unwrap();
        verify(twice.as_bytes(), &trust(&[&old])).unwrap();
        verify(twice.as_bytes(), &trust(&[&new])).unwrap();
        let v: Value = serde_json::from_str(&twice).unwrap();
        assert_eq!(v[FIELD].as_array().unwrap().len(), 2);
    }

    #[test]
    fn canonical_form_is_sorted_compact_and_refuses_floats() {
        let obj: Value =
            serde_json::from_str(r#"{"b": 1, "a": {"y": "é\n", "x": [2, -3]}, "signatures": []}"#)
                .unwrap();
        let m = signed_message(obj.as_object().unwrap()).unwrap();
        assert_eq!(
            &m[CONTEXT.len()..],
            "{\"a\":{\"x\":[2,-3],\"y\":\"é\\n\"},\"b\":1}".as_bytes()
        );
        let f: Value = serde_json::from_str(r#"{"a": 1.5}"#).unwrap();
        assert!(signed_message(f.as_object().unwrap()).is_err());
    }

    #[test]
    fn bad_public_keys_are_named() {
        assert!(TrustedKeys::parse(&["!!".into()])
            .unwrap_err()
            .contains("public-keys[0]"));
        assert!(TrustedKeys::parse(&[B64.encode([1u8; 31])])
            .unwrap_err()
            .contains("31 bytes"));
        assert!(TrustedKeys::parse(&[B64.encode([0u8; 32])])
            .unwrap_err()
            .contains("weak"));
    }
}
