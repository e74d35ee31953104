//! How to reach Consul: address, TLS, ACL token (inline or re-read from a
//! file), datacenter and namespace, from the config file and the
//! `CONSUL_*` environment like Consul's own tools. Read-only: nothing here
//! writes, so a crash loses nothing.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Re-exported: [`watch_key`] takes one, and callers (the tests among
/// them) need not depend on tokio-util themselves.
pub use tokio_util::sync::CancellationToken;

use super::MAX_WAIT;
use crate::error::{Error, Result};
use crate::pacing::{Backoff, RateLimit};

/// How to reach Consul and how to pace the watch. Build one with
/// `ConsulSettings::default()` (or from config) and then
/// [`ConsulSettings::from_env`].
#[derive(Clone)]
pub struct ConsulSettings {
    /// `http://127.0.0.1:8500` by default (rule 1: the local agent). A bare
    /// `host:port` means http (https with `CONSUL_HTTP_SSL=true`).
    pub address: String,
    /// ACL token, sent as `X-Consul-Token` (rule 13).
    pub token: Option<String>,
    /// A file holding the token (config `token-file` or
    /// `CONSUL_HTTP_TOKEN_FILE`). Wins over `token`, and the client reads it
    /// again whenever it changes, so a fixed token applies without a
    /// restart (SIGHUP, a 403, or simply the next request).
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle to verify the agent's certificate.
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate, with `client_key`, for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Name to verify the agent's certificate against (and send as SNI)
    /// when it differs from the host in `address`.
    pub tls_server_name: Option<String>,
    /// `false` disables certificate verification (`CONSUL_HTTP_SSL_VERIFY`).
    pub ssl_verify: bool,
    /// `?dc=`.
    pub datacenter: Option<String>,
    /// `?ns=` (Consul Enterprise).
    pub namespace: Option<String>,
    /// `?partition=` (Consul Enterprise).
    pub partition: Option<String>,
    /// Blocking-query `wait`; capped at 10 min.
    pub wait: Duration,
    /// Largest acceptable `X-Consul-LastContact` of a `?stale` read before
    /// re-reading in default mode (rule 11).
    pub max_stale: Duration,
    /// Token bucket of the watch loop.
    pub rate: RateLimit,
    /// Backoff after errors.
    pub backoff: Backoff,
    /// Added to `wait * 17/16` for the per-request timeout, and the whole
    /// timeout of non-blocking requests (rule 7: about 7 s).
    pub timeout_margin: Duration,
    /// The first request waits a random delay below this, so a fleet-wide
    /// restart does not arrive in one burst (rule 9).
    pub first_request_splay: Duration,
    /// Delay (jittered) before retrying after a 403: a token problem needs
    /// an operator, hammering Consul will not fix it (rule 10).
    pub forbidden_retry: Duration,
}

impl Default for ConsulSettings {
    fn default() -> Self {
        ConsulSettings {
            address: "http://127.0.0.1:8500".into(),
            token_file: None,
            token: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            tls_server_name: None,
            ssl_verify: true,
            datacenter: None,
            namespace: None,
            partition: None,
            wait: Duration::from_secs(300),
            // The `[consul] max-stale` default (docs/configuration.md).
            max_stale: Duration::from_secs(10),
            rate: RateLimit::default(),
            backoff: Backoff::default(),
            timeout_margin: Duration::from_secs(7),
            first_request_splay: Duration::from_secs(5),
            forbidden_retry: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for ConsulSettings {
    // Hand-written so the token never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulSettings")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("tls_server_name", &self.tls_server_name)
            .field("ssl_verify", &self.ssl_verify)
            .field("datacenter", &self.datacenter)
            .field("namespace", &self.namespace)
            .field("partition", &self.partition)
            .field("wait", &self.wait)
            .field("max_stale", &self.max_stale)
            .field("rate", &self.rate)
            .field("backoff", &self.backoff)
            .field("timeout_margin", &self.timeout_margin)
            .field("first_request_splay", &self.first_request_splay)
            .field("forbidden_retry", &self.forbidden_retry)
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl ConsulSettings {
    /// Overrides `self` with the `CONSUL_*` environment variables of
    /// Consul's own tools (rules 1, 13, 14).
    pub fn from_env(self) -> Result<Self> {
        self.from_env_with(|name| std::env::var(name).ok())
    }

    /// [`ConsulSettings::from_env`] with an injectable lookup, for tests.
    /// Reads `CONSUL_HTTP_TOKEN_FILE` synchronously: call it at startup.
    pub fn from_env_with(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let ssl = match get("CONSUL_HTTP_SSL") {
            Some(v) => parse_bool("CONSUL_HTTP_SSL", &v)?,
            None => false,
        };
        if let Some(addr) = get("CONSUL_HTTP_ADDR") {
            self.address = if addr.contains("://") {
                addr
            } else if ssl {
                format!("https://{addr}")
            } else {
                format!("http://{addr}")
            };
        } else if ssl {
            if let Some(rest) = self.address.strip_prefix("http://") {
                self.address = format!("https://{rest}");
            }
        }
        if let Some(t) = get("CONSUL_HTTP_TOKEN") {
            self.token = Some(t);
        }
        // Like Consul's api package, a token file wins over the variable.
        if let Some(path) = get("CONSUL_HTTP_TOKEN_FILE") {
            self.token_file = Some(path.into());
        }
        if let Some(path) = &self.token_file {
            // Read once here so a missing file is a start-up error; the
            // client reads it again whenever it changes.
            if let Some(t) = read_token_file(path)? {
                self.token = Some(t);
            }
        }
        if let Some(v) = get("CONSUL_CACERT") {
            self.ca_cert = Some(v.into());
        }
        if let Some(v) = get("CONSUL_CLIENT_CERT") {
            self.client_cert = Some(v.into());
        }
        if let Some(v) = get("CONSUL_CLIENT_KEY") {
            self.client_key = Some(v.into());
        }
        if let Some(v) = get("CONSUL_TLS_SERVER_NAME") {
            self.tls_server_name = Some(v);
        }
        if let Some(v) = get("CONSUL_HTTP_SSL_VERIFY") {
            self.ssl_verify = parse_bool("CONSUL_HTTP_SSL_VERIFY", &v)?;
        }
        if let Some(v) = get("CONSUL_NAMESPACE") {
            self.namespace = Some(v);
        }
        if let Some(v) = get("CONSUL_PARTITION") {
            self.partition = Some(v);
        }
        Ok(self)
    }

    /// Per-request timeout (rule 7): above the longest a blocking query may
    /// legitimately take (`wait` plus Consul's wait/16 jitter) plus a margin.
    pub fn request_timeout(&self, blocking: bool) -> Duration {
        if blocking {
            let wait = self.wait.min(MAX_WAIT);
            wait + wait / 16 + self.timeout_margin
        } else {
            self.timeout_margin
        }
    }
}

/// The token in `path`, trimmed; `None` when the file is empty.
pub(super) fn read_token_file(path: &std::path::Path) -> Result<Option<String>> {
    let t = std::fs::read_to_string(path).map_err(|e| Error::ConsulConfig {
        setting: "token-file".into(),
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    let t = t.trim();
    Ok((!t.is_empty()).then(|| t.to_string()))
}

/// Go's `strconv.ParseBool`, which Consul uses for its variables.
fn parse_bool(setting: &str, v: &str) -> Result<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(Error::ConsulConfig {
            setting: setting.into(),
            message: format!("{v:?} is not a boolean (use true or false)"),
        }),
    }
}

#[cfg(test)]
// Tests may panic on the unexpected: that is how they fail.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "from-file\n").unwrap();
        let env = |k: &str| -> Option<String> {
            match k {
                "CONSUL_HTTP_ADDR" => Some("10.0.0.1:8501".into()),
                "CONSUL_HTTP_SSL" => Some("true".into()),
                "CONSUL_HTTP_TOKEN" => Some("from-env".into()),
                "CONSUL_HTTP_TOKEN_FILE" => Some(token_file.display().to_string()),
                "CONSUL_HTTP_SSL_VERIFY" => Some("false".into()),
                "CONSUL_TLS_SERVER_NAME" => Some("consul.local".into()),
                "CONSUL_NAMESPACE" => Some("team".into()),
                "CONSUL_PARTITION" => Some("p1".into()),
                "CONSUL_CACERT" => Some("/etc/ca.pem".into()),
                _ => None,
            }
        };
        let s = ConsulSettings::default().from_env_with(env).unwrap();
        assert_eq!(s.address, "https://10.0.0.1:8501");
        assert_eq!(s.token.as_deref(), Some("from-file"));
        assert!(!s.ssl_verify);
        assert_eq!(s.tls_server_name.as_deref(), Some("consul.local"));
        assert_eq!(s.namespace.as_deref(), Some("team"));
        assert_eq!(s.partition.as_deref(), Some("p1"));
        assert_eq!(s.ca_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert!(!format!("{s:?}").contains("from-file"), "token redacted");
        let bad = ConsulSettings::default()
            .from_env_with(|k| (k == "CONSUL_HTTP_SSL_VERIFY").then(|| "maybe".to_string()));
        assert!(bad.is_err());
        let none = ConsulSettings::default().from_env_with(|_| None).unwrap();
        assert_eq!(none.address, "http://127.0.0.1:8500");
    }

    #[test]
    fn timeout_covers_wait_and_jitter() {
        let s = ConsulSettings::default();
        assert_eq!(
            s.request_timeout(true),
            Duration::from_secs(300) + Duration::from_millis(18750) + Duration::from_secs(7)
        );
        assert_eq!(s.request_timeout(false), Duration::from_secs(7));
    }
}
