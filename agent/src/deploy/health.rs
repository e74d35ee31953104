//! The health gate: after a flip, decides whether the new build is good.
//!
//! A check is an HTTP GET to a local URL that must answer a given status,
//! and/or a command (argv, run like the hooks: own process group, timeout,
//! capped output) that must exit 0. An attempt passes when every configured
//! check passes; attempts repeat every `interval` until one passes or the
//! `window` is over. The deploy acts on the verdict (`deploy.rs`: flip
//! back and quarantine the build).
//!
//! Nothing is persisted here. If the process dies during a check the new
//! build stays live unjudged; the deploy record on disk shows the phase
//! `verifying`, and the operator decides (`deploy-agent rollback`).

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::HealthConfig;

/// A passed gate.
#[derive(Debug, Clone)]
pub struct Passed {
    pub attempts: u32,
    pub took: Duration,
}

/// A failed gate: no attempt passed within the window.
#[derive(Debug, Clone)]
pub struct Unhealthy {
    pub attempts: u32,
    /// Rounded to a tenth of a second (see [`tenths`]).
    pub took: Duration,
    /// Why the last attempt failed.
    pub last_failure: String,
}

/// The verdict as the deploy's error and history show it:
/// `GET ... answered 500, expected 200 after 3 attempt(s) in 2.5s`.
impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} after {} attempt(s) in {}",
            self.last_failure,
            self.attempts,
            crate::clock::human_duration(self.took)
        )
    }
}

/// `d` rounded to a tenth of a second. The gate's durations end up in
/// operator messages, where `2.521672156s` is noise; callers that format
/// with `{:?}` then print `2.5s`.
pub fn tenths(d: Duration) -> Duration {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(ms.saturating_add(50) / 100 * 100)
}

/// Runs the gate for the build just flipped in; returns the verdict.
/// `env` is the hooks' environment, `output_limit` caps command output.
pub async fn check(
    cfg: &HealthConfig,
    env: &[(String, String)],
    output_limit: usize,
) -> Result<Passed, Unhealthy> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + cfg.window;
    // Local checks must not go through a proxy from the environment, and a
    // redirect is an answer to judge, not to follow.
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(cfg.timeout)
        .build();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let failure = match &client {
            Ok(client) => attempt(cfg, client, env, output_limit).await,
            Err(e) => Some(format!("cannot build the HTTP client: {e}")),
        };
        match failure {
            None => {
                info!(
                    attempts,
                    took_ms = start.elapsed().as_millis() as u64,
                    "health check passed"
                );
                return Ok(Passed {
                    attempts,
                    took: tenths(start.elapsed()),
                });
            }
            Some(why) => {
                let next = tokio::time::Instant::now() + cfg.interval;
                if next >= deadline {
                    warn!(attempts, last_failure = %why, window_ms = cfg.window.as_millis() as u64, "health check failed for the whole window");
                    return Err(Unhealthy {
                        attempts,
                        took: tenths(start.elapsed()),
                        last_failure: why,
                    });
                }
                info!(attempt = attempts, failure = %why, "health check attempt failed; retrying");
                tokio::time::sleep_until(next).await;
            }
        }
    }
}

/// One attempt: `None` if every configured check passed, else why not.
async fn attempt(
    cfg: &HealthConfig,
    client: &reqwest::Client,
    env: &[(String, String)],
    output_limit: usize,
) -> Option<String> {
    if let Some(url) = &cfg.url {
        match client.get(url).send().await {
            Ok(resp) if resp.status().as_u16() == cfg.expect_status => {}
            Ok(resp) => {
                return Some(format!(
                    "GET {url} answered {}, expected {}",
                    resp.status().as_u16(),
                    cfg.expect_status
                ))
            }
            Err(e) if e.is_timeout() => {
                return Some(format!(
                    "GET {url} timed out after {}",
                    crate::clock::human_duration(cfg.timeout)
                ))
            }
            Err(e) => return Some(format!("GET {url} failed: {e}")),
        }
    }
    if let Some(argv) = &cfg.command {
        if let Err(e) =
            crate::deploy::hooks::run_hook("health-check", argv, env, cfg.timeout, output_limit)
                .await
        {
            return Some(e.to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_durations_read_like_a_person_wrote_them() {
        let bad = Unhealthy {
            attempts: 3,
            took: tenths(Duration::from_nanos(2_521_672_156)),
            last_failure: "GET http://127.0.0.1:1/h answered 500, expected 200".into(),
        };
        // `{:?}` is what deploy.rs formats the reason with today.
        assert_eq!(format!("{:?}", bad.took), "2.5s");
        assert!(
            bad.to_string().ends_with("after 3 attempt(s) in 2.5s"),
            "{bad}"
        );
    }
}
