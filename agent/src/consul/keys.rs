//! Consul key rules (docs/consul-watch-rules.md rule 15): the one validator
//! the client, the config check and `check-config` use, and the URL
//! encoding of key names, and the fleet's key layout (tier, freeze and
//! report keys). Pure functions.

/// Re-exported: [`watch_key`] takes one, and callers (the tests among
/// them) need not depend on tokio-util themselves.
pub use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Rule 15: `[A-Za-z0-9._/-]`, no leading `/`, no `..`. A prefix may be
/// empty.
pub fn validate_key(key: &str, prefix: bool) -> Result<()> {
    let bad = |reason| {
        Err(Error::ConsulKey {
            key: key.into(),
            reason,
        })
    };
    if key.is_empty() && !prefix {
        return bad("empty");
    }
    if key.starts_with('/') {
        return bad("leading /");
    }
    if key.contains("..") {
        return bad("contains ..");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
    {
        return bad("character outside A-Z a-z 0-9 . _ / -");
    }
    Ok(())
}

/// Percent-encodes everything but unreserved characters (and `/` in a
/// path).
pub(crate) fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'.' | b'_' | b'-' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The default key of a tier: `deploy/<app>/<tier>`.
pub fn tier_key(app: &str, tier: &str) -> String {
    format!("deploy/{app}/{tier}")
}

/// The default fleet-wide freeze key of an app: `deploy/<app>/freeze`.
pub fn freeze_key(app: &str) -> String {
    format!("deploy/{app}/freeze")
}

/// The default prefix of per-host reports: `deploy-hosts/<app>/`. Outside
/// `deploy/<app>/` on purpose: real Consul wakes a blocking query on a
/// missing key (the freeze key, a tier key before its first publish) for
/// every write in the key's radix subtree, and reports are the fleet's most
/// frequent writes (see `fleet/host/hostreport.rs`).
pub fn report_prefix(app: &str) -> String {
    format!("deploy-hosts/{app}/")
}

#[cfg(test)]
// Tests may panic on the unexpected: that is how they fail.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated_and_encoded() {
        assert!(validate_key("deploy/web/prod", false).is_ok());
        assert!(validate_key("a-b_c.d", false).is_ok());
        assert!(validate_key("", false).is_err());
        assert!(validate_key("", true).is_ok());
        assert!(validate_key("/deploy", false).is_err());
        assert!(validate_key("deploy/../x", false).is_err());
        assert!(validate_key("deploy web", false).is_err());
        assert!(validate_key("deploy?raw", false).is_err());
        assert_eq!(encode("a/b c?", true), "a/b%20c%3F");
        assert_eq!(encode("a/b", false), "a%2Fb");
    }
}
