//! Test servers that the tests and the demo (`cargo run -p testkit --bin demo`) run in-process.
//! They keep everything in memory: when the process dies, they are gone,
//! and nothing of the agent's depends on them.

pub mod artifact;
pub mod consul;
pub mod imds;
pub mod s3;

/// Decodes `%XX`; `plus_is_space` for query strings only: Go's URL parser
/// leaves a `+` in the path alone (`PUT /v1/kv/plus/a+b` stores `plus/a+b`).
pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
