//! The one exit-code table of the `deploy-agent` binary: host commands
//! (`status`, `hold`, ...), `run`/`check-config`, and the commander's
//! `release`/`fleet` commands all use it, so a code means the same thing
//! whichever command returned it (docs/operating.md, Exit codes).
//!
//! Also the one way commands print their report ([`say!`](crate::say)), so
//! that a reader that went away ends the command quietly.
//!
//! Constants and stdout writes only: nothing to lose in a crash.

/// Success.
pub const OK: u8 = 0;
/// Any other failure (bad answer, I/O error, agent or Consul error).
pub const FAILURE: u8 = 1;
/// Bad command line or bad config (clap uses 2 as well).
pub const USAGE: u8 = 2;
/// Nothing listens on the status socket: the agent is not running (or
/// went away during `status --watch`).
pub const NOT_RUNNING: u8 = 3;
/// The socket's mode or the agent (403) refused this user.
pub const PERMISSION_DENIED: u8 = 4;
/// The agent refused the command (e.g. nothing to roll back to).
pub const REFUSED: u8 = 5;
/// A release command's check-and-set lost: another commander wrote the
/// key first.
pub const CONFLICT: u8 = 6;
/// `release freeze` while the app is already frozen.
pub const FROZEN: u8 = 7;
/// The Consul address answered, but not like Consul.
pub const NOT_CONSUL: u8 = 8;

/// Every code, for the distinctness test and the README table check.
pub const ALL: [u8; 9] = [
    OK,
    FAILURE,
    USAGE,
    NOT_RUNNING,
    PERMISSION_DENIED,
    REFUSED,
    CONFLICT,
    FROZEN,
    NOT_CONSUL,
];

/// Writes a command's report to stdout, like `print!`; a failed write ends
/// the command ([`output_failed`]).
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        output_failed(e)
    }
}

/// Ends a command whose report could not be written. A reader that went
/// away (`deploy-agent fleet status --watch | head -3`) ends it with
/// [`OK`], quietly: what the command did is done, only the rest of its
/// report has nobody to read it. (Rust ignores SIGPIPE, so the write fails
/// with EPIPE, and `println!` would panic.) Any other error ends it with
/// [`FAILURE`]. Every command's output goes through here: the commander's
/// (`say!`) and the host commands' (`status::client`).
pub fn output_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(OK.into())
    }
    eprintln!("deploy-agent: cannot write to stdout: {e}");
    std::process::exit(FAILURE.into())
}

/// `println!` for a command's report, through [`write_stdout`](crate::exit::write_stdout).
#[macro_export]
macro_rules! say {
    () => { $crate::exit::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::exit::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}
