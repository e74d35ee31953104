//! The `[health]` section: the gate run after a flip. Parsing and
//! validation only; the gate itself is `deploy::health`. Nothing is
//! written, so a crash loses nothing.

use std::time::Duration;

use serde::Deserialize;

/// `[health]` in the config. Without `url` and `command` there is no gate.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct HealthConfig {
    /// A local URL to GET, e.g. `http://127.0.0.1:8080/healthz`. Proxies
    /// and redirects are not followed: the answer is the app's own.
    pub url: Option<String>,
    /// The status the URL must answer.
    pub expect_status: u16,
    /// A command that must exit 0 (argv, no shell). It gets the hooks'
    /// environment (`DEPLOY_BUILD`, `DEPLOY_SLOT_DIR`, ...).
    pub command: Option<Vec<String>>,
    /// Bound of one attempt (the GET, or the command, which is killed with
    /// its process group at the bound).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long the build gets to pass; the verdict is "unhealthy" when no
    /// attempt passed within it.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Pause between attempts.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            url: None,
            expect_status: 200,
            command: None,
            timeout: Duration::from_secs(2),
            window: Duration::from_secs(30),
            interval: Duration::from_secs(1),
        }
    }
}

impl HealthConfig {
    /// Whether a gate is configured.
    pub fn is_enabled(&self) -> bool {
        self.url.is_some() || self.command.is_some()
    }

    /// The reason this config cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(u) = &self.url {
            let parsed = reqwest::Url::parse(u).map_err(|e| format!("health.url: {u:?}: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(format!(
                    "health.url: {u:?} must be an http(s) URL with a host"
                ));
            }
        }
        if self.command.as_ref().is_some_and(Vec::is_empty) {
            return Err("health.command: must name a command".into());
        }
        if !(100..=599).contains(&self.expect_status) {
            return Err("health.expect-status: must be an HTTP status, 100 to 599".into());
        }
        if self.timeout.is_zero() || self.window.is_zero() || self.interval.is_zero() {
            return Err("health: timeout, window and interval must be above zero".into());
        }
        Ok(())
    }
}
