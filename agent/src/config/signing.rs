//! The `[signing]` section: the public keys a manifest must be signed
//! with. Parsing only; checking signatures is `sign`. Nothing is written.

/// `[signing]` in the config.
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SigningConfig {
    /// Base64 ed25519 public keys (the `.pub` files `keygen` writes). With
    /// more than one, a manifest signed by any of them is accepted (key
    /// rotation).
    pub public_keys: Vec<String>,
}
