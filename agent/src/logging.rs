//! Tracing setup: one filter from `DEPLOY_AGENT_LOG` (default `info`) and
//! one of three output styles:
//!
//! - journal (auto-detected from `$JOURNAL_STREAM`): one event per line,
//!   no timestamps (journald adds them), no colours, a `<N>` syslog
//!   priority prefix so `journalctl -p warning` works, `key=value` fields;
//! - JSON lines (`--log-format json`), for log shippers;
//! - human text with timestamps, coloured only on a terminal.
//!
//! Logs go to stderr unbuffered, line by line, so a crash loses at most the
//! event being written.

use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::error::{Error, Result};

/// The environment variable holding the filter (`info`,
/// `deploy_agent=debug,hyper=warn`, ...).
pub const FILTER_ENV: &str = "DEPLOY_AGENT_LOG";

/// What the operator asked for with `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Journal style under systemd, human text otherwise.
    #[default]
    Auto,
    /// Human text (timestamps; colour on a terminal).
    Text,
    /// JSON lines.
    Json,
}

/// The style actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Plain lines with priority prefixes, for journald.
    Journal,
    Json,
    Text {
        color: bool,
    },
}

/// Picks the output style; pure so it can be tested.
///
/// `journal_stream`: `$JOURNAL_STREAM` is set (stderr goes to journald).
/// `is_terminal`: stderr is a terminal. `no_color`: `$NO_COLOR` is set and
/// non-empty.
pub fn decide(
    format: LogFormat,
    journal_stream: bool,
    is_terminal: bool,
    no_color: bool,
) -> Output {
    match format {
        LogFormat::Json => Output::Json,
        LogFormat::Auto if journal_stream && !is_terminal => Output::Journal,
        LogFormat::Auto | LogFormat::Text => Output::Text {
            color: is_terminal && !no_color,
        },
    }
}

/// Installs the global subscriber. Fails if one is already installed.
pub fn init(format: LogFormat) -> Result<Output> {
    let output = decide(
        format,
        std::env::var_os("JOURNAL_STREAM").is_some(),
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
    );
    let filter = EnvFilter::builder()
        .with_default_directive(Level::INFO.into())
        .with_env_var(FILTER_ENV)
        // A typo in the filter must not stop the agent; the bad directives
        // are dropped (and reported by tracing-subscriber on stderr).
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match output {
        Output::Journal => builder
            .with_ansi(false)
            .event_format(JournalFormat)
            .try_init(),
        Output::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        Output::Text { color } => builder.with_ansi(color).try_init(),
    };
    installed.map_err(|e| Error::Logging {
        detail: e.to_string(),
    })?;
    Ok(output)
}

/// `<6>INFO deploy_agent::fetch: span{f=1}: message key=value`: the
/// `<N>` prefix is read by journald as the syslog priority.
#[derive(Debug, Clone, Copy)]
struct JournalFormat;

/// syslog priority for a tracing level (sd-daemon(3)).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        write!(
            writer,
            "<{}>{} {}: ",
            priority(meta.level()),
            meta.level(),
            meta.target()
        )?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(writer, "{}", span.name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(writer, "{{{fields}}}")?;
                    }
                }
                write!(writer, ": ")?;
            }
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_output() {
        use LogFormat::*;
        assert_eq!(decide(Auto, true, false, false), Output::Journal);
        // A terminal wins over an inherited JOURNAL_STREAM (run by hand
        // from a shell started under systemd).
        assert_eq!(
            decide(Auto, true, true, false),
            Output::Text { color: true }
        );
        assert_eq!(
            decide(Auto, false, true, false),
            Output::Text { color: true }
        );
        assert_eq!(
            decide(Auto, false, true, true),
            Output::Text { color: false }
        );
        assert_eq!(
            decide(Auto, false, false, false),
            Output::Text { color: false }
        );
        assert_eq!(
            decide(Text, true, false, false),
            Output::Text { color: false }
        );
        assert_eq!(decide(Json, true, true, false), Output::Json);
    }

    #[test]
    fn priorities() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::TRACE), 7);
    }

    #[test]
    fn journal_format_writes_one_prefixed_line_per_event() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .event_format(JournalFormat)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("deploy", build = "web-1");
            let _g = span.enter();
            tracing::warn!(bytes = 42u64, "slow download");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "<4>WARN deploy_agent::logging::tests: deploy{build=\"web-1\"}: slow download bytes=42\n"
        );
    }
}
