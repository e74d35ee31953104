//! systemd readiness and watchdog notifications (sd_notify(3)) through the
//! `sd-notify` crate: one datagram per call to the socket named by
//! `$NOTIFY_SOCKET`. The crate connects to a path, which is what systemd,
//! systemd-nspawn and podman hand out; an abstract (`@name`) socket is
//! reported as an error in the log, never a crash.
//!
//! Everything is a no-op when `$NOTIFY_SOCKET` is unset (not under systemd,
//! or `Type=simple`). Nothing is persisted; if the agent dies before
//! `READY=1`, systemd fails the start after `TimeoutStartSec=`, and if it
//! stops sending `WATCHDOG=1`, systemd restarts it after `WatchdogSec=`.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends notifications to systemd, or nowhere.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// Notifies when `$NOTIFY_SOCKET` is set and not empty; a no-op
    /// notifier otherwise. The variable stays set: a reload builds a new
    /// notifier from it.
    pub fn from_env() -> Self {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Notifier { enabled: false }
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// `READY=1` plus a status line: startup finished, systemd may start
    /// units ordered after us.
    pub fn ready(&self, status: &str) -> std::io::Result<()> {
        self.send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))])
    }

    /// `STATUS=...`: the line `systemctl status` shows.
    pub fn status(&self, status: &str) -> std::io::Result<()> {
        self.send(&[NotifyState::Status(&one_line(status))])
    }

    /// `WATCHDOG=1`: still alive. Call every [`watchdog_interval`].
    pub fn watchdog(&self) -> std::io::Result<()> {
        self.send(&[NotifyState::Watchdog])
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) -> std::io::Result<()> {
        self.send(&[NotifyState::Stopping])
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (required by `Type=notify-reload`
    /// and harmless otherwise); follow with [`Notifier::ready`] when done.
    pub fn reloading(&self) -> std::io::Result<()> {
        self.send(&[NotifyState::Reloading, NotifyState::monotonic_usec_now()?])
    }

    /// `Ok` and nothing sent when disabled.
    fn send(&self, states: &[NotifyState]) -> std::io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        sd_notify::notify(false, states)
    }
}

/// Sends `WATCHDOG=1` every [`watchdog_interval`] on the current tokio
/// runtime until `shutdown`; `None` when no watchdog is configured. This
/// proves the runtime is alive; a daemon that wants the watchdog to cover
/// its deploy loop should ping from that loop instead.
pub fn spawn_watchdog(
    notifier: Notifier,
    shutdown: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let every = watchdog_interval().filter(|_| notifier.is_enabled())?;
    tracing::debug!(
        interval_ms = every.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = notifier.watchdog() {
                        tracing::warn!(error = %e, "cannot send WATCHDOG=1 to systemd");
                    }
                }
            }
        }
    }))
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when the
/// watchdog is meant for this process (`$WATCHDOG_PID` is ours, as systemd
/// sets it).
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
        .then(|| Duration::from_micros(usec / 2))
}

/// Status text must stay on one line: a newline would start a new
/// `KEY=VALUE` assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_stays_on_one_line() {
        assert_eq!(one_line("a\nb\rc"), "a b c");
    }

    #[test]
    fn disabled_notifier_is_a_no_op() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready("x").unwrap();
        n.watchdog().unwrap();
    }
}
