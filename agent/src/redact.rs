//! Keeping secrets and huge values out of everything the agent prints:
//! status, history, host reports and logs. Pure string functions; nothing
//! is stored, so a crash loses nothing.
//!
//! Artifact URLs may carry credentials (`https://user:pass@host/…`) or
//! signed query parameters (`…?X-Amz-Signature=…`); the agent uses them to
//! download but never shows them. Values that come from outside (build
//! ids, error bodies) are cut to a bounded length in messages.

use std::borrow::Cow;

/// Longest message kept in `last_error`, history and reports.
pub const MAX_MESSAGE: usize = 2048;

/// Query parameters whose values are secrets (matched case-insensitively
/// as a substring of the parameter name).
const SECRET_PARAMS: [&str; 6] = [
    "signature",
    "sig",
    "token",
    "password",
    "secret",
    "credential",
];

/// `text` with every URL's userinfo and secret query values replaced by
/// `***`, and cut to [`MAX_MESSAGE`] bytes.
pub fn message(text: &str) -> String {
    let r = secrets(text);
    truncate(&r, MAX_MESSAGE).into_owned()
}

/// `text` with every URL's userinfo (`user:pass@`) and the values of
/// secret-looking query parameters replaced by `***`.
pub fn secrets(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The URL runs to the next character that cannot be in one.
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | ')' | ','))
            .unwrap_or(tail.len());
        out.push_str(&redact_url(&tail[..end]));
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// One URL after its `scheme://`.
fn redact_url(url: &str) -> String {
    let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
    let (authority, path) = url.split_at(authority_end);
    let mut out = match authority.rfind('@') {
        Some(at) => format!("***@{}", &authority[at + 1..]),
        None => authority.to_string(),
    };
    match path.split_once('?') {
        None => out.push_str(path),
        Some((p, query)) => {
            out.push_str(p);
            out.push('?');
            let parts: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if is_secret(k) => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&parts.join("&"));
        }
    }
    out
}

fn is_secret(param: &str) -> bool {
    let p = param.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|s| p.contains(s))
}

/// `s` cut to at most `max` bytes (on a character boundary), with how much
/// was cut said at the end.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes in all)", &s[..cut], s.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_and_signed_queries_are_hidden() {
        let m = "download of https://bob:hunter2@art.example/b.tar.gz?X-Amz-Signature=abc&part=1 failed";
        let r = secrets(m);
        assert!(!r.contains("hunter2") && !r.contains("abc"), "{r}");
        assert!(
            r.contains("https://***@art.example/b.tar.gz?X-Amz-Signature=***&part=1"),
            "{r}"
        );
        assert_eq!(secrets("no urls here"), "no urls here");
        assert_eq!(
            secrets("\"http://h/x\" and http://u@h2/y"),
            "\"http://h/x\" and http://***@h2/y"
        );
    }

    #[test]
    fn long_values_are_cut_on_a_char_boundary() {
        let long = "é".repeat(100_000);
        let t = message(&long);
        assert!(t.len() < MAX_MESSAGE + 40, "{}", t.len());
        assert!(t.ends_with("(200000 bytes in all)"));
    }
}
