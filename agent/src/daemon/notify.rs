//! systemd readiness and watchdog notifications (sd_notify(3)), written by
//! hand: one datagram per call to the socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract socket written `@name`).
//!
//! Everything is a no-op when `$NOTIFY_SOCKET` is unset (not under systemd,
//! or `Type=simple`). Nothing is persisted; if the agent dies before
//! `READY=1`, systemd fails the start after `TimeoutStartSec=`, and if it
//! stops sending `WATCHDOG=1`, systemd restarts it after `WatchdogSec=`.

use std::ffi::{OsStr, OsString};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends notifications to one notify socket, or nowhere.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<OsString>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`; an unset or empty variable gives a no-op
    /// notifier.
    pub fn from_env() -> Self {
        Notifier::new(std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()))
    }

    /// A notifier for an explicit socket (`/path` or `@abstract`), or a
    /// no-op one for `None`.
    pub fn new(socket: Option<OsString>) -> Self {
        Notifier { socket }
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// `READY=1` plus a status line: startup finished, systemd may start
    /// units ordered after us.
    pub fn ready(&self, status: &str) -> std::io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `STATUS=...`: the line `systemctl status` shows.
    pub fn status(&self, status: &str) -> std::io::Result<()> {
        self.send(&format!("STATUS={}", one_line(status)))
    }

    /// `WATCHDOG=1`: still alive. Call every [`watchdog_interval`].
    pub fn watchdog(&self) -> std::io::Result<()> {
        self.send("WATCHDOG=1")
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) -> std::io::Result<()> {
        self.send("STOPPING=1")
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (required by `Type=notify-reload`
    /// and harmless otherwise); follow with [`Notifier::ready`] when done.
    pub fn reloading(&self) -> std::io::Result<()> {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()))
    }

    /// Sends one raw state string (`KEY=VALUE` lines). `Ok` and nothing sent
    /// when disabled.
    pub fn send(&self, state: &str) -> std::io::Result<()> {
        match &self.socket {
            Some(s) => notify_to(s, state),
            None => Ok(()),
        }
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

/// Sends `state` as one datagram to `socket` (`/path` or `@abstract`).
pub fn notify_to(socket: &OsStr, state: &str) -> std::io::Result<()> {
    let bytes = socket.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(socket)?,
    };
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(std::io::Error::other(format!(
            "notify datagram truncated: {sent} of {} bytes",
            state.len()
        )));
    }
    Ok(())
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when the
/// watchdog is meant for this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] on explicit values: pure, for tests.
pub fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    my_pid: u32,
) -> Option<Duration> {
    if let Some(pid) = pid {
        // A watchdog PID that is not ours (or unparseable) means the
        // variable was inherited from a parent; do not ping for it.
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// Status text must stay on one line: a newline would start a new
/// `KEY=VALUE` assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares
/// `MONOTONIC_USEC` against (std's `Instant` hides its raw value).
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes
    // into it and CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_and_respects_pid() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("junk"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
    }

    #[test]
    fn status_stays_on_one_line() {
        assert_eq!(one_line("a\nb\rc"), "a b c");
    }

    #[test]
    fn disabled_notifier_is_a_no_op() {
        let n = Notifier::new(None);
        assert!(!n.is_enabled());
        n.ready("x").unwrap();
        n.watchdog().unwrap();
    }

    #[test]
    fn monotonic_clock_moves() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_usec() > a);
    }
}
