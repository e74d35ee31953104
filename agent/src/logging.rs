//! Tracing setup: one filter from `DEPLOY_AGENT_LOG` (default `info`) and
//! one of three output styles:
//!
//! - journal (auto-detected from `$JOURNAL_STREAM`): one event per line,
//!   no timestamps (journald adds them), no colours, a `<N>` syslog
//!   priority prefix so `journalctl -p warning` works, `key=value` fields;
//! - JSON lines (`--log-format json`), for log shippers: fields are JSON
//!   values (numbers, booleans, strings, `null` for an absent `Option`),
//!   never Rust Debug text such as `"None"` or `"Some(\"a\")"`;
//! - human text with timestamps, coloured only on a terminal.
//!
//! Logs go to stderr unbuffered, line by line, so a crash loses at most the
//! event being written.

use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
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
            .with_ansi(false)
            .fmt_fields(JsonFields)
            .event_format(JsonFormat)
            .try_init(),
        Output::Text { color } => builder.with_ansi(color).try_init(),
    };
    installed.map_err(|e| Error::Logging {
        detail: e.to_string(),
    })?;
    Ok(output)
}

/// `<6>INFO deploy_agent::artifact::fetch: span{f=1}: message key=value`: the
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

/// One JSON object per event: `timestamp`, `level`, `target`, the event's
/// fields (with `message`) at the top level, `span` (the innermost span's
/// name and fields) and `spans` (root first). Replaces tracing-subscriber's
/// JSON output, which writes every `?field` as its Debug string.
#[derive(Debug, Clone, Copy)]
pub struct JsonFormat;

/// Span fields stored as a JSON object, for [`JsonFormat`].
#[derive(Debug, Clone, Copy)]
pub struct JsonFields;

/// Records tracing fields as JSON values.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.insert(field.name().into(), v);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        let v = i64::try_from(value).map_or_else(|_| value.to_string().into(), Value::from);
        self.0.insert(field.name().into(), v);
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        let v = u64::try_from(value).map_or_else(|_| value.to_string().into(), Value::from);
        self.0.insert(field.name().into(), v);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        // `message` is format_args!: its Debug is the text itself.
        let v = if field.name() == "message" {
            Value::String(text)
        } else {
            debug_value(&text)
        };
        self.0.insert(field.name().into(), v);
    }
}

/// The value a `?field` meant: `None` is null, `Some(x)` is `x`, a quoted
/// string is the string; anything else (a struct's Debug) stays text, and
/// such call sites should log their fields one by one instead.
pub fn debug_value(text: &str) -> Value {
    if text == "None" {
        return Value::Null;
    }
    if let Some(inner) = text.strip_prefix("Some(").and_then(|t| t.strip_suffix(')')) {
        return debug_value(inner);
    }
    if text.starts_with('"') {
        if let Ok(Value::String(s)) = serde_json::from_str(text) {
            return Value::String(s);
        }
    }
    Value::String(text.to_owned())
}

fn record_json(fields: impl RecordFields, map: &mut Map<String, Value>) {
    fields.record(&mut JsonVisitor(map));
}

impl<'w> FormatFields<'w> for JsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut map = Map::new();
        record_json(fields, &mut map);
        write!(writer, "{}", Value::Object(map))
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        let mut map = match serde_json::from_str(&current.fields) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        record_json(fields, &mut map);
        current.fields = Value::Object(map).to_string();
        Ok(())
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        line.insert("timestamp".into(), time.into());
        line.insert("level".into(), meta.level().as_str().into());
        let mut fields = Map::new();
        record_json(event, &mut fields);
        // Event fields sit at the top level, as with tracing-subscriber's
        // flattened JSON; the fixed keys win a name clash.
        for (k, v) in fields {
            line.entry(k).or_insert(v);
        }
        line.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let mut spans = Vec::new();
            for span in scope.from_root() {
                let mut obj = match span
                    .extensions()
                    .get::<FormattedFields<JsonFields>>()
                    .map(|f| serde_json::from_str(&f.fields))
                {
                    Some(Ok(Value::Object(m))) => m,
                    _ => Map::new(),
                };
                obj.insert("name".into(), span.name().into());
                spans.push(Value::Object(obj));
            }
            if let Some(last) = spans.last() {
                line.insert("span".into(), last.clone());
            }
            line.insert("spans".into(), Value::Array(spans));
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the tests read back: what the formatter wrote.
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

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
    fn json_lines_carry_values_not_debug_strings() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(JsonFields)
            .event_format(JsonFormat)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("deploy", build = "web-1", attempt = 2u64);
            let _g = span.enter();
            let none: Option<&str> = None;
            tracing::info!(
                hot = ?Some("A"),
                cold = ?none,
                name = ?"b",
                bytes = 42u64,
                ok = true,
                path = %"/srv/app",
                "deploy root ready"
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["message"], "deploy root ready");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["hot"], "A", "{text}");
        assert_eq!(v["cold"], Value::Null, "{text}");
        assert_eq!(v["name"], "b", "{text}");
        assert_eq!(v["bytes"], 42);
        assert_eq!(v["ok"], true);
        assert_eq!(v["path"], "/srv/app");
        assert_eq!(v["span"]["name"], "deploy");
        assert_eq!(v["span"]["build"], "web-1");
        assert_eq!(v["span"]["attempt"], 2);
        assert!(v["timestamp"].as_str().is_some_and(|t| !t.is_empty()));
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
