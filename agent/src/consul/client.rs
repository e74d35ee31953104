//! A small client for `/v1/kv` on the host's local Consul agent: one pooled
//! `reqwest` client (rustls) per process, the token in the `X-Consul-Token`
//! header only, validated and URL-encoded key names, bounded bodies, values
//! capped at Consul's 512 KiB, and errors that name what to check. Writes
//! are single HTTP requests (put, check-and-set, delete): a process that
//! dies mid-way leaves the key either as it was or as written.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::Deserialize;

/// Re-exported: [`watch_key`] takes one, and callers (the tests among
/// them) need not depend on tokio-util themselves.
pub use tokio_util::sync::CancellationToken;

use super::keys::{encode, validate_key};
use super::settings::{read_token_file, ConsulSettings};
use super::{CONNECT_TIMEOUT, MAX_LIST_BODY, MAX_SINGLE_BODY, MAX_VALUE_SIZE, MAX_WAIT};
use crate::error::{Error, Result};

/// Options of one read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryOptions {
    /// Blocking index; 0 sends none (a non-blocking read).
    pub index: u64,
    /// Blocking `wait`, sent only with a non-zero `index`.
    pub wait: Option<Duration>,
    /// `?stale`: any server may answer.
    pub stale: bool,
    /// `?consistent`: the leader confirms it is still the leader first.
    /// Never in the watch (rule 11); only for the one read that must be
    /// linearizable: the freeze check before acting on a tier change.
    pub consistent: bool,
}

/// One read of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvRead {
    /// `X-Consul-Index`, 0 if the header was missing.
    pub index: u64,
    /// `X-Consul-LastContact`: how stale a `?stale` answer may be.
    pub last_contact: Duration,
    /// `X-Consul-KnownLeader`.
    pub known_leader: bool,
    /// `None` on 404: nothing published.
    pub pair: Option<KvPair>,
}

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPair {
    pub key: String,
    pub value: Vec<u8>,
    pub modify_index: u64,
    pub create_index: u64,
    pub flags: u64,
}

/// The JSON of one pair as Consul sends it.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct JsonPair {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    create_index: u64,
    #[serde(default)]
    modify_index: u64,
}

/// The agent's Consul client. Build one per process and clone it: clones
/// share one connection pool (rule 16).
#[derive(Debug, Clone)]
pub struct ConsulClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    /// `scheme://host:port`, no trailing slash.
    base: String,
    settings: ConsulSettings,
    /// The token in use and the token file's (mtime, length) it was read
    /// at; re-read when the file changes.
    token: Mutex<TokenState>,
}

#[derive(Debug, Default)]
struct TokenState {
    value: Option<String>,
    stamp: Option<(SystemTime, u64)>,
}

impl ConsulClient {
    /// Builds the client: reads certificate files and, with
    /// `tls_server_name` and a host name in `address`, resolves it once
    /// (blocking; call at startup).
    pub fn new(settings: &ConsulSettings) -> Result<Self> {
        let mut settings = settings.clone();
        settings.wait = settings.wait.min(MAX_WAIT);
        let address = Address::parse(&settings.address)?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .http1_only()
            // Rule 16: one long-lived connection per host; a second one only
            // while a write overlaps the blocking read.
            .pool_max_idle_per_host(1)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Duration::from_secs(30))
            .user_agent(concat!("deploy-agent/", env!("CARGO_PKG_VERSION")));
        builder = add_ca_cert(builder, &settings)?;
        builder = add_client_identity(builder, &settings)?;
        if !settings.ssl_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let (builder, base) = pin_server_name(builder, &settings, &address)?;
        let http = builder
            .build()
            .map_err(|e| cfg_err("tls", format!("cannot build the HTTP client: {e}")))?;
        let token = Mutex::new(TokenState {
            value: settings.token.clone(),
            stamp: settings.token_file.as_deref().and_then(file_stamp),
        });
        Ok(ConsulClient {
            inner: Arc::new(Inner {
                http,
                base,
                settings,
                token,
            }),
        })
    }

    /// The token to send now: the token file is read again when its mtime
    /// or length changed since the last read (one `stat` per request, which
    /// is nothing next to the request). A file that became unreadable keeps
    /// the last good token and logs why.
    fn token(&self) -> Option<String> {
        let mut t = self.inner.token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.inner.settings.token_file {
            let stamp = file_stamp(path);
            if stamp != t.stamp {
                match read_token_file(path) {
                    Ok(v) => {
                        tracing::info!(path = %path.display(), "Consul token file changed; using the new token");
                        t.value = v;
                        t.stamp = stamp;
                    }
                    Err(e) => tracing::warn!(error = %e, "keeping the previous Consul token"),
                }
            }
        }
        t.value.clone()
    }

    /// Whether the token file changed since the token in use was read.
    pub fn token_file_changed(&self) -> bool {
        let Some(path) = &self.inner.settings.token_file else {
            return false;
        };
        let t = self.inner.token.lock().unwrap_or_else(|p| p.into_inner());
        file_stamp(path) != t.stamp
    }

    /// Sleeps `delay`, or less when the token file changes meanwhile
    /// (checked every second), so a fixed token applies at once instead of
    /// after a long retry delay; `false` if `shutdown` fired first.
    pub async fn sleep_until_token_changes(
        &self,
        delay: Duration,
        shutdown: &CancellationToken,
    ) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || self.token_file_changed() {
                return true;
            }
            if !crate::pacing::sleep_or_cancel(left.min(Duration::from_secs(1)), shutdown).await {
                return false;
            }
        }
    }

    /// The settings this client runs with (`wait` already capped).
    pub fn settings(&self) -> &ConsulSettings {
        &self.inner.settings
    }

    /// `scheme://host:port` requests go to.
    pub fn address(&self) -> &str {
        &self.inner.base
    }

    fn url(&self, key: &str, params: &[(&str, Option<String>)]) -> String {
        let s = &self.inner.settings;
        let mut url = format!("{}/v1/kv/{}", self.inner.base, encode(key, true));
        let extra = [
            ("dc", s.datacenter.clone()),
            ("ns", s.namespace.clone()),
            ("partition", s.partition.clone()),
        ];
        let mut sep = '?';
        for (name, value) in params.iter().cloned().chain(
            extra
                .into_iter()
                .filter_map(|(n, v)| v.map(|v| (n, Some(v)))),
        ) {
            url.push(sep);
            sep = '&';
            url.push_str(name);
            if let Some(v) = value {
                url.push('=');
                url.push_str(&encode(&v, false));
            }
        }
        url
    }

    /// Sends with the token header and a whole-exchange timeout, and reads
    /// at most `cap` bytes of body.
    async fn exchange(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
        timeout: Duration,
        cap: usize,
    ) -> Result<(reqwest::StatusCode, reqwest::header::HeaderMap, Vec<u8>)> {
        let mut req = req;
        if let Some(t) = self.token() {
            // Rule 13: header only, never `?token=` (URLs end up in logs).
            req = req.header("X-Consul-Token", t);
        }
        let fut = async {
            let mut resp = req.send().await.map_err(|e| transport_error(url, e))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(url, e))? {
                if body.len() + chunk.len() > cap {
                    return Err(Error::ConsulDecode {
                        url: url.to_string(),
                        message: format!("response body larger than {cap} bytes"),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok((status, headers, body))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::ConsulTimeout {
                url: url.to_string(),
                timeout,
            }),
        }
    }

    /// Reads one key. A 404 is `Ok` with `pair: None`.
    pub async fn get(&self, key: &str, opts: &QueryOptions) -> Result<KvRead> {
        validate_key(key, false)?;
        let mut params: Vec<(&str, Option<String>)> = Vec::new();
        let blocking = opts.index > 0;
        if blocking {
            params.push(("index", Some(opts.index.to_string())));
            if let Some(w) = opts.wait {
                params.push(("wait", Some(format!("{}ms", w.min(MAX_WAIT).as_millis()))));
            }
        }
        if opts.stale {
            params.push(("stale", None));
        } else if opts.consistent {
            params.push(("consistent", None));
        }
        let url = self.url(key, &params);
        let timeout = self.settings().request_timeout(blocking);
        let (status, headers, body) = self
            .exchange(self.inner.http.get(&url), &url, timeout, MAX_SINGLE_BODY)
            .await?;
        let index = consul_index(&url, status.as_u16(), &headers)?;
        let last_contact =
            Duration::from_millis(header_u64(&headers, "x-consul-lastcontact").unwrap_or(0));
        let known_leader = headers
            .get("x-consul-knownleader")
            .is_some_and(|v| v.as_bytes() == b"true");
        let pair = match status.as_u16() {
            200 => {
                let mut pairs = decode_pairs(&url, &body)?;
                match pairs.iter().position(|p| p.key == key) {
                    Some(i) => Some(pairs.swap_remove(i)),
                    None => {
                        return Err(Error::ConsulDecode {
                            url,
                            message: format!("200 without the key {key}"),
                        })
                    }
                }
            }
            404 => None,
            _ => return Err(status_error(&url, key, Needs::Read, status.as_u16(), &body)),
        };
        Ok(KvRead {
            index,
            last_contact,
            known_leader,
            pair,
        })
    }

    /// Writes `value` at `key`; with `cas`, only if the key's ModifyIndex
    /// is still `cas` (`Some(0)`: only if absent). Returns Consul's answer:
    /// `false` when the check-and-set lost (rule 19).
    pub async fn put(&self, key: &str, value: &[u8], cas: Option<u64>) -> Result<bool> {
        validate_key(key, false)?;
        if value.len() > MAX_VALUE_SIZE {
            return Err(Error::ConsulValueTooLarge {
                key: key.into(),
                size: value.len(),
            });
        }
        let params: Vec<(&str, Option<String>)> = cas
            .map(|c| ("cas", Some(c.to_string())))
            .into_iter()
            .collect();
        let url = self.url(key, &params);
        let req = self.inner.http.put(&url).body(value.to_vec());
        self.write(req, &url, key).await
    }

    /// Sends one write (put or delete) and decodes Consul's `true`/`false`.
    async fn write(&self, req: reqwest::RequestBuilder, url: &str, key: &str) -> Result<bool> {
        let (status, _, body) = self
            .exchange(req, url, self.settings().request_timeout(false), 1024)
            .await?;
        if status.as_u16() != 200 {
            return Err(status_error(url, key, Needs::Write, status.as_u16(), &body));
        }
        decode_bool(url, &body)
    }

    /// Deletes `key`; returns Consul's `true`/`false`.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.delete_with(key, None).await
    }

    /// Deletes `key` only if its ModifyIndex is still `cas`; `false` when
    /// the check-and-set lost.
    pub async fn delete_cas(&self, key: &str, cas: u64) -> Result<bool> {
        self.delete_with(key, Some(cas)).await
    }

    async fn delete_with(&self, key: &str, cas: Option<u64>) -> Result<bool> {
        validate_key(key, false)?;
        // A `None` value means a bare flag (`?raw`), so leave `cas` out
        // entirely for a plain delete.
        let params: Vec<(&str, Option<String>)> = cas
            .map(|c| ("cas", Some(c.to_string())))
            .into_iter()
            .collect();
        let url = self.url(key, &params);
        self.write(self.inner.http.delete(&url), &url, key).await
    }

    /// Every pair under `prefix` (`?recurse`); empty when there is none.
    pub async fn list(&self, prefix: &str) -> Result<Vec<KvPair>> {
        validate_key(prefix, true)?;
        let url = self.url(prefix, &[("recurse", None)]);
        let (status, headers, body) = self
            .exchange(
                self.inner.http.get(&url),
                &url,
                self.settings().request_timeout(false),
                MAX_LIST_BODY,
            )
            .await?;
        consul_index(&url, status.as_u16(), &headers)?;
        match status.as_u16() {
            200 => decode_pairs(&url, &body),
            404 => Ok(Vec::new()),
            s => Err(status_error(&url, prefix, Needs::List, s, &body)),
        }
    }

    /// [`ConsulClient::list`] as a blocking query: returns when the
    /// prefix's index passes `opts.index` (or `wait` runs out), with the
    /// `X-Consul-Index` to pass next time. The fleet page's one watch.
    pub async fn list_blocking(
        &self,
        prefix: &str,
        opts: &QueryOptions,
    ) -> Result<(u64, Vec<KvPair>)> {
        validate_key(prefix, true)?;
        let mut params: Vec<(&str, Option<String>)> = vec![("recurse", None)];
        let blocking = opts.index > 0;
        if blocking {
            params.push(("index", Some(opts.index.to_string())));
            if let Some(w) = opts.wait {
                params.push(("wait", Some(format!("{}ms", w.min(MAX_WAIT).as_millis()))));
            }
        }
        let url = self.url(prefix, &params);
        let timeout = self.settings().request_timeout(blocking);
        let (status, headers, body) = self
            .exchange(self.inner.http.get(&url), &url, timeout, MAX_LIST_BODY)
            .await?;
        let index = consul_index(&url, status.as_u16(), &headers)?;
        match status.as_u16() {
            200 => Ok((index, decode_pairs(&url, &body)?)),
            404 => Ok((index, Vec::new())),
            s => Err(status_error(&url, prefix, Needs::List, s, &body)),
        }
    }
}

/// A setting the client cannot be built with, and why.
fn cfg_err(setting: &str, message: String) -> Error {
    Error::ConsulConfig {
        setting: setting.into(),
        message,
    }
}

/// `address` taken apart: `scheme://host:port`, the port defaulting to
/// Consul's (8500, or 8501 for https).
struct Address {
    scheme: String,
    /// As written, for the base URL.
    hostport: String,
    host: String,
    port: u16,
}

impl Address {
    fn parse(address: &str) -> Result<Address> {
        let (scheme, hostport) = address
            .trim_end_matches('/')
            .split_once("://")
            .map(|(s, h)| (s.to_ascii_lowercase(), h.to_string()))
            .unwrap_or_else(|| ("http".into(), address.to_string()));
        if scheme != "http" && scheme != "https" {
            return Err(cfg_err(
                "address",
                format!("{address:?}: only http:// and https:// are supported"),
            ));
        }
        if hostport.is_empty() || hostport.contains('/') {
            return Err(cfg_err(
                "address",
                format!("{address:?} is not scheme://host:port"),
            ));
        }
        let default_port = if scheme == "https" { 8501 } else { 8500 };
        let (host, port) = split_host_port(&hostport, default_port)
            .ok_or_else(|| cfg_err("address", format!("bad port in {address:?}")))?;
        Ok(Address {
            scheme,
            hostport,
            host,
            port,
        })
    }
}

/// Trusts the certificates of `ca_cert` (a PEM bundle), if set.
fn add_ca_cert(
    mut builder: reqwest::ClientBuilder,
    settings: &ConsulSettings,
) -> Result<reqwest::ClientBuilder> {
    if let Some(path) = &settings.ca_cert {
        let pem = std::fs::read(path)
            .map_err(|e| cfg_err("ca_cert", format!("cannot read {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| cfg_err("ca_cert", format!("{}: {e}", path.display())))?;
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    Ok(builder)
}

/// Presents `client_cert` with `client_key` (both or neither) for mTLS.
fn add_client_identity(
    builder: reqwest::ClientBuilder,
    settings: &ConsulSettings,
) -> Result<reqwest::ClientBuilder> {
    match (&settings.client_cert, &settings.client_key) {
        (Some(cert), Some(key)) => {
            let mut pem = std::fs::read(cert).map_err(|e| {
                cfg_err(
                    "client_cert",
                    format!("cannot read {}: {e}", cert.display()),
                )
            })?;
            pem.push(b'\n');
            pem.extend(std::fs::read(key).map_err(|e| {
                cfg_err("client_key", format!("cannot read {}: {e}", key.display()))
            })?);
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| cfg_err("client_cert", format!("{e}")))?;
            Ok(builder.identity(id))
        }
        (None, None) => Ok(builder),
        _ => Err(cfg_err(
            "client_cert",
            "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY go together".into(),
        )),
    }
}

/// The base URL, and with `tls_server_name` over https the builder pinned
/// to it: reqwest verifies against the URL's host, so talk to `name` and
/// pin its resolution to the configured address.
fn pin_server_name(
    builder: reqwest::ClientBuilder,
    settings: &ConsulSettings,
    address: &Address,
) -> Result<(reqwest::ClientBuilder, String)> {
    let (Some(name), true) = (&settings.tls_server_name, address.scheme == "https") else {
        return Ok((
            builder,
            format!("{}://{}", address.scheme, address.hostport),
        ));
    };
    let (host, port) = (&address.host, address.port);
    let ip = match host
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
    {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| cfg_err("address", format!("cannot resolve {host}")))?,
    };
    Ok((builder.resolve(name, ip), format!("https://{name}:{port}")))
}

fn split_host_port(hostport: &str, default_port: u16) -> Option<(String, u16)> {
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    if let Some(rest) = hostport.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if tail.is_empty() => default_port,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((hostport.to_string(), default_port)),
    }
}

/// What identifies a version of the token file without reading it.
fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// `X-Consul-Index` of a read's answer. Consul sends it with every 200 and
/// 404 of the KV read endpoint; an answer without it comes from something
/// that is not Consul (a web server answering 404 at the configured
/// address), which must be an error, not "nothing published".
fn consul_index(url: &str, status: u16, h: &reqwest::header::HeaderMap) -> Result<u64> {
    match (status, header_u64(h, "x-consul-index")) {
        (200 | 404, Some(i)) => Ok(i),
        (200 | 404, None) => Err(Error::NotConsul {
            url: url.to_string(),
            detail: format!(
                "a {status} without the X-Consul-Index header every Consul KV read carries"
            ),
        }),
        _ => Ok(0),
    }
}

fn header_u64(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn transport_error(url: &str, e: reqwest::Error) -> Error {
    // reqwest's own timeouts are not set (we bound the whole exchange
    // ourselves), but a connect timeout can still surface here.
    if e.is_timeout() {
        return Error::ConsulTimeout {
            url: url.to_string(),
            timeout: CONNECT_TIMEOUT,
        };
    }
    let mut message = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        message.push_str(": ");
        message.push_str(&s.to_string());
        src = s.source();
    }
    Error::ConsulConnect {
        url: url.to_string(),
        message,
    }
}

/// The ACL permission a request needs, named in 403 errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Read,
    List,
    Write,
}

impl Needs {
    fn as_str(self) -> &'static str {
        match self {
            Needs::Read => "key:read",
            Needs::List => "key:list (key_prefix ... policy = \"list\" or \"read\")",
            Needs::Write => "key:write",
        }
    }
}

fn status_error(url: &str, key: &str, needs: Needs, status: u16, body: &[u8]) -> Error {
    let mut body = String::from_utf8_lossy(body).trim().to_string();
    if body.len() > 200 {
        let mut cut = 200;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
    }
    match status {
        403 => Error::ConsulForbidden {
            url: url.into(),
            key: key.into(),
            body,
            permission: needs.as_str(),
        },
        429 => Error::ConsulRateLimited { url: url.into() },
        _ => Error::ConsulStatus {
            url: url.into(),
            status,
            body,
        },
    }
}

fn decode_pairs(url: &str, body: &[u8]) -> Result<Vec<KvPair>> {
    let raw: Vec<JsonPair> = serde_json::from_slice(body).map_err(|e| Error::ConsulDecode {
        url: url.into(),
        message: format!("bad JSON: {e}"),
    })?;
    raw.into_iter()
        .map(|p| {
            let value = match p.value {
                None => Vec::new(),
                Some(v) => base64::engine::general_purpose::STANDARD
                    .decode(v.as_bytes())
                    .map_err(|e| Error::ConsulDecode {
                        url: url.into(),
                        message: format!("bad base64 in the value of {}: {e}", p.key),
                    })?,
            };
            if value.len() > MAX_VALUE_SIZE {
                return Err(Error::ConsulValueTooLarge {
                    key: p.key,
                    size: value.len(),
                });
            }
            Ok(KvPair {
                key: p.key,
                value,
                modify_index: p.modify_index,
                create_index: p.create_index,
                flags: p.flags,
            })
        })
        .collect()
}

fn decode_bool(url: &str, body: &[u8]) -> Result<bool> {
    match String::from_utf8_lossy(body).trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(Error::ConsulDecode {
            url: url.into(),
            message: format!("expected true or false, got {other:?}"),
        }),
    }
}

#[cfg(test)]
// Tests may panic on the unexpected: that is how they fail.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn client_builds_urls_with_params() {
        let s = ConsulSettings {
            address: "http://127.0.0.1:8500/".into(),
            datacenter: Some("dc2".into()),
            namespace: Some("ns a".into()),
            ..Default::default()
        };
        let c = ConsulClient::new(&s).unwrap();
        assert_eq!(
            c.url(
                "deploy/web/prod",
                &[("index", Some("5".into())), ("stale", None)]
            ),
            "http://127.0.0.1:8500/v1/kv/deploy/web/prod?index=5&stale&dc=dc2&ns=ns%20a"
        );
        assert!(ConsulClient::new(&ConsulSettings {
            address: "unix:///tmp/consul.sock".into(),
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn tls_settings_are_checked_at_construction() {
        let c = ConsulClient::new(&ConsulSettings {
            address: "https://127.0.0.1:8501".into(),
            tls_server_name: Some("consul.service.internal".into()),
            ..Default::default()
        })
        .unwrap();
        // Certificates are verified against the configured name, while the
        // connection still goes to 127.0.0.1 (pinned resolution).
        assert_eq!(c.address(), "https://consul.service.internal:8501");
        let missing_ca = ConsulClient::new(&ConsulSettings {
            address: "https://127.0.0.1:8501".into(),
            ca_cert: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            missing_ca.to_string().contains("/nonexistent/ca.pem"),
            "{missing_ca}"
        );
        let half_identity = ConsulClient::new(&ConsulSettings {
            client_cert: Some("/tmp/cert.pem".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            half_identity.to_string().contains("CONSUL_CLIENT_KEY"),
            "{half_identity}"
        );
        let insecure = ConsulClient::new(&ConsulSettings {
            address: "https://10.1.2.3".into(),
            ssl_verify: false,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(insecure.address(), "https://10.1.2.3");
        assert_eq!(
            ConsulClient::new(&ConsulSettings {
                wait: Duration::from_secs(3600),
                ..Default::default()
            })
            .unwrap()
            .settings()
            .wait,
            MAX_WAIT
        );
    }
}
