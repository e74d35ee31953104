//! The desired state: the JSON manifest a Consul key (or a local file) holds.
//!
//! ```json
//! {"build": "2026.11.26-3", "url": "https://artifacts/app-3.tar.gz",
//!  "sha256": "<64 hex>", "size": 123456, "format": "tar.gz",
//!  "mirrors": ["https://mirror/app-3.tar.gz"], "deploy_id": "r42",
//!  "max_unpacked_bytes": 2000000000, "max_entries": 200000}
//! ```
//!
//! Parsing is pure and total: any input yields a validated [`Manifest`] or
//! an error naming the field. Unknown fields are ignored so newer release
//! tooling can add fields. Nothing is persisted here, so a crash while
//! parsing loses nothing: the watch hands the value over again.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest manifest accepted (Consul refuses values over 512 KiB anyway).
pub const MAX_MANIFEST_BYTES: usize = 512 * 1024;
/// Most mirrors accepted, so a hostile manifest cannot make us try forever.
pub const MAX_URLS: usize = 16;

/// Archive formats the unpacker understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    #[serde(rename = "tar")]
    Tar,
    #[serde(rename = "tar.gz")]
    TarGz,
    #[serde(rename = "tar.zst")]
    TarZst,
}

impl Format {
    fn parse(s: &str) -> Option<Format> {
        match s {
            "tar" => Some(Format::Tar),
            "tar.gz" | "tgz" => Some(Format::TarGz),
            "tar.zst" | "tzst" => Some(Format::TarZst),
            _ => None,
        }
    }

    /// A generous guess of unpacked size / archive size, used only by the
    /// free-space check when no better number is known.
    pub fn expansion_estimate(self) -> u64 {
        match self {
            Format::Tar => 1,
            Format::TarGz => 5,
            Format::TarZst => 6,
        }
    }

    /// The format of an archive from its first bytes (gzip and zstd have
    /// magic numbers; anything else is read as a plain tar, whose parser
    /// then refuses what is not one). For files the agent stored without
    /// their manifest, such as a delta's base in the artifact cache.
    pub fn sniff(head: &[u8]) -> Format {
        if head.starts_with(&[0x1f, 0x8b]) {
            Format::TarGz
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Format::TarZst
        } else {
            Format::Tar
        }
    }

    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Tar => "tar",
            Format::TarGz => "tar.gz",
            Format::TarZst => "tar.zst",
        }
    }
}

/// A sha256 digest, 64 lowercase hex digits. Parsed and validated once,
/// where a digest enters the agent (the manifest, a cache file name, the
/// command line); everything downstream holds this type, so it never checks
/// again and two spellings of one digest compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Sum(String);

impl Sha256Sum {
    /// Accepts 64 hex digits in any case.
    pub fn parse(s: &str) -> Option<Sha256Sum> {
        (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Sha256Sum(s.to_ascii_lowercase()))
    }

    /// The digest of `bytes` already computed.
    pub fn from_bytes(bytes: [u8; 32]) -> Sha256Sum {
        Sha256Sum(hex::encode(bytes))
    }

    /// The 32 raw bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // Invariant: the constructor accepted exactly 64 hex digits.
        let _ = hex::decode_to_slice(&self.0, &mut out);
        out
    }

    /// The lowercase hex form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Sha256Sum {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sha256Sum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Sha256Sum {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Sha256Sum::parse(s).ok_or_else(|| format!("{s:?} is not a sha256 (64 hex digits)"))
    }
}

impl TryFrom<String> for Sha256Sum {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<Sha256Sum> for String {
    fn from(d: Sha256Sum) -> String {
        d.0
    }
}

impl PartialEq<str> for Sha256Sum {
    fn eq(&self, other: &str) -> bool {
        self.0.eq_ignore_ascii_case(other)
    }
}

/// One build's artifact: everything needed to fetch and verify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    pub build: String,
    /// The primary URL first, then mirrors.
    pub urls: Vec<String>,
    /// The sha256 of the artifact.
    pub sha256: Sha256Sum,
    pub size: u64,
    pub format: Format,
    /// The publisher's file index of the artifact (`integrity::index`):
    /// each file's digest, so hosts need not hash the slot they build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexSpec>,
}

/// Where a build's file index is and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSpec {
    /// The primary URL first, then mirrors.
    pub urls: Vec<String>,
    pub sha256: Sha256Sum,
    pub size: u64,
}

impl IndexSpec {
    /// The index as a file to download (its format is not a tar's; the
    /// download engine does not read it).
    pub fn download(&self, build: &str) -> BuildSpec {
        zstd_file(
            format!("{build}.index"),
            &self.urls,
            &self.sha256,
            self.size,
        )
    }

    /// The manifest's wire form: `url`, `mirrors`, `sha256`, `size`.
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        let mut m = self.download("x").to_json();
        m.remove("build");
        m.remove("format");
        m
    }

    fn from_object(
        obj: &Map<String, Value>,
        policy: UrlPolicy,
    ) -> Result<IndexSpec, ManifestError> {
        Ok(IndexSpec {
            urls: url_fields(obj, policy)?,
            sha256: digest_field(obj, "sha256")?,
            size: size_field(obj)?,
        })
    }
}

impl BuildSpec {
    /// The manifest's wire form of this spec (`build`, `url`, `mirrors`,
    /// `sha256`, `size`, `format`): the one writer, used by `release
    /// publish` and the test build generator, and read back by
    /// [`Manifest::parse`].
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("build".into(), Value::from(self.build.as_str()));
        if let Some(url) = self.urls.first() {
            m.insert("url".into(), Value::from(url.as_str()));
        }
        if self.urls.len() > 1 {
            m.insert("mirrors".into(), Value::from(self.urls[1..].to_vec()));
        }
        m.insert("sha256".into(), Value::from(self.sha256.as_str()));
        m.insert("size".into(), Value::from(self.size));
        m.insert("format".into(), Value::from(self.format.as_str()));
        if let Some(index) = &self.index {
            m.insert("index".into(), Value::Object(index.to_json()));
        }
        m
    }
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub spec: BuildSpec,
    pub deploy_id: Option<String>,
    pub max_unpacked_bytes: Option<u64>,
    pub max_entries: Option<u64>,
    /// Percentage rollout (0-100, fractions allowed): hosts whose bucket is
    /// below it run `spec`, the others `previous` (see `fleet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Rollout salt; the build id when absent (see `fleet::salt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    /// The build hosts outside the percentage stay on, or return to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<BuildSpec>,
    /// A delta from a base build to `spec`, used by hosts that hold the
    /// base (see `unpack::delta`); the others download the full artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaSpec>,
}

/// Where the delta to a build is and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaSpec {
    /// sha256 of the base build's full artifact: the delta applies only on
    /// top of that build.
    pub base: Sha256Sum,
    /// The primary URL first, then mirrors.
    pub urls: Vec<String>,
    pub sha256: Sha256Sum,
    pub size: u64,
}

impl DeltaSpec {
    /// The delta as an artifact to download (a zstd-compressed tar).
    pub fn artifact(&self, build: &str) -> BuildSpec {
        zstd_file(
            format!("{build}.delta"),
            &self.urls,
            &self.sha256,
            self.size,
        )
    }

    /// The manifest's wire form: `base`, `url`, `mirrors`, `sha256`, `size`.
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        let mut m = self.artifact("x").to_json();
        m.remove("build");
        m.remove("format");
        m.insert("base".into(), Value::from(self.base.as_str()));
        m
    }

    fn from_object(
        obj: &Map<String, Value>,
        policy: UrlPolicy,
    ) -> Result<DeltaSpec, ManifestError> {
        Ok(DeltaSpec {
            base: digest_field(obj, "base")?,
            urls: url_fields(obj, policy)?,
            sha256: digest_field(obj, "sha256")?,
            size: size_field(obj)?,
        })
    }
}

/// A zstd file a build comes with (its delta, its index), as a spec the
/// download engine fetches and verifies like an artifact.
fn zstd_file(build: String, urls: &[String], sha256: &Sha256Sum, size: u64) -> BuildSpec {
    BuildSpec {
        build,
        urls: urls.to_vec(),
        sha256: sha256.clone(),
        size,
        format: Format::TarZst,
        index: None,
    }
}

/// Why a manifest was rejected; always names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("manifest field `{field}`: {reason}")]
pub struct ManifestError {
    pub field: String,
    pub reason: String,
}

fn err(field: &str, reason: impl Into<String>) -> ManifestError {
    ManifestError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// What URL schemes a manifest may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UrlPolicy {
    /// `file://` URLs; off for manifests from Consul unless the config
    /// allows it, since a writer of the key could otherwise make the agent
    /// read any local file.
    pub allow_file: bool,
}

impl Manifest {
    /// Parses and validates manifest bytes.
    pub fn parse(bytes: &[u8], policy: UrlPolicy) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(err(
                "(document)",
                format!("{} bytes, more than {MAX_MANIFEST_BYTES}", bytes.len()),
            ));
        }
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| err("(document)", format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(err("(document)", "must be a JSON object"));
        };
        Self::from_object(&obj, policy)
    }

    fn from_object(obj: &Map<String, Value>, policy: UrlPolicy) -> Result<Manifest, ManifestError> {
        let spec = BuildSpec::from_object(obj, policy)?;
        let deploy_id = match obj.get("deploy_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() <= 256 => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(_) => return Err(err("deploy_id", "must be a string of at most 256 bytes")),
        };
        Ok(Manifest {
            spec,
            deploy_id,
            max_unpacked_bytes: opt_u64(obj, "max_unpacked_bytes")?,
            max_entries: opt_u64(obj, "max_entries")?,
            percent: opt_percent(obj)?,
            salt: match obj.get("salt") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
                Some(_) => return Err(err("salt", "must be a string of 1 to 256 bytes")),
            },
            previous: match obj.get("previous") {
                None | Some(Value::Null) => None,
                Some(Value::Object(p)) => Some(
                    BuildSpec::from_object(p, policy)
                        .map_err(|e| err(&format!("previous.{}", e.field), e.reason))?,
                ),
                Some(_) => return Err(err("previous", "must be an object like the manifest")),
            },
            delta: match obj.get("delta") {
                None | Some(Value::Null) => None,
                Some(Value::Object(d)) => Some(
                    DeltaSpec::from_object(d, policy)
                        .map_err(|e| err(&format!("delta.{}", e.field), e.reason))?,
                ),
                Some(_) => return Err(err("delta", "must be an object")),
            },
        })
    }

    /// The identity of this desired state: a new deploy happens when it
    /// changes (build, artifact or deploy id).
    pub fn identity(&self) -> String {
        format!(
            "{}@{}#{}",
            self.spec.build,
            self.spec.sha256,
            self.deploy_id.as_deref().unwrap_or("")
        )
    }
}

impl BuildSpec {
    /// Parses one build's fields (`build`, `url`, `mirrors`, `sha256`,
    /// `size`, `format`) from a JSON object.
    pub fn from_object(
        obj: &Map<String, Value>,
        policy: UrlPolicy,
    ) -> Result<BuildSpec, ManifestError> {
        let build = build_field(obj)?;
        let urls = url_fields(obj, policy)?;
        let sha256 = digest_field(obj, "sha256")?;
        let size = size_field(obj)?;
        let format = match obj.get("format") {
            Some(Value::String(s)) => Format::parse(s).ok_or_else(|| {
                err(
                    "format",
                    format!("{s:?} is not one of tar, tar.gz, tar.zst"),
                )
            })?,
            Some(_) => return Err(err("format", "must be a string")),
            None => return Err(err("format", "missing")),
        };
        let index = match obj.get("index") {
            None | Some(Value::Null) => None,
            Some(Value::Object(i)) => Some(
                IndexSpec::from_object(i, policy)
                    .map_err(|e| err(&format!("index.{}", e.field), e.reason))?,
            ),
            Some(_) => return Err(err("index", "must be an object")),
        };
        Ok(BuildSpec {
            build,
            urls,
            sha256,
            size,
            format,
            index,
        })
    }
}

/// A required sha256 field: 64 hex digits.
fn digest_field(obj: &Map<String, Value>, field: &str) -> Result<Sha256Sum, ManifestError> {
    match obj.get(field) {
        Some(Value::String(s)) => {
            Sha256Sum::parse(s).ok_or_else(|| err(field, "must be 64 hex digits"))
        }
        Some(_) => Err(err(field, "must be a string of 64 hex digits")),
        None => Err(err(field, "missing")),
    }
}

/// The required `size`: 1 byte to 16 TiB.
fn size_field(obj: &Map<String, Value>) -> Result<u64, ManifestError> {
    match obj.get("size") {
        Some(v) => v
            .as_u64()
            .filter(|n| *n > 0 && *n <= 1 << 44)
            .ok_or_else(|| err("size", "must be a whole number of bytes, 1 to 16 TiB")),
        None => Err(err("size", "missing")),
    }
}

/// `build`: a build id the swapper accepts as a slot's build.
fn build_field(obj: &Map<String, Value>) -> Result<String, ManifestError> {
    match obj.get("build") {
        Some(Value::String(s)) if swapper::validate_build_id(s) => Ok(s.clone()),
        Some(Value::String(s)) => Err(err(
            "build",
            format!(
                "{:?} must be 1-128 characters of [A-Za-z0-9._-], starting with a letter or digit",
                crate::redact::truncate(s, 64)
            ),
        )),
        Some(_) => Err(err("build", "must be a string")),
        None => Err(err("build", "missing")),
    }
}

/// `url` (one or a list) then `mirrors`, in the order they are tried: at
/// least one, at most [`MAX_URLS`], each allowed by `policy`.
fn url_fields(obj: &Map<String, Value>, policy: UrlPolicy) -> Result<Vec<String>, ManifestError> {
    let mut urls = match obj.get("url") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|u| u.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| err("url", "must be a string or a list of strings"))?,
        Some(_) => return Err(err("url", "must be a string or a list of strings")),
        None => return Err(err("url", "missing")),
    };
    match obj.get("mirrors") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for m in a {
                urls.push(
                    m.as_str()
                        .ok_or_else(|| err("mirrors", "must be a list of strings"))?
                        .to_owned(),
                );
            }
        }
        Some(_) => return Err(err("mirrors", "must be a list of strings")),
    }
    if urls.is_empty() {
        return Err(err("url", "no URL given"));
    }
    if urls.len() > MAX_URLS {
        return Err(err("url", format!("more than {MAX_URLS} URLs")));
    }
    for u in &urls {
        check_url(u, policy)?;
    }
    Ok(urls)
}

fn opt_percent(obj: &Map<String, Value>) -> Result<Option<f64>, ManifestError> {
    match obj.get("percent") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|p| (0.0..=100.0).contains(p))
            .map(Some)
            .ok_or_else(|| err("percent", "must be a number from 0 to 100")),
    }
}

fn opt_u64(obj: &Map<String, Value>, field: &str) -> Result<Option<u64>, ManifestError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| err(field, "must be a positive whole number")),
    }
}

fn check_url(u: &str, policy: UrlPolicy) -> Result<(), ManifestError> {
    if u.len() > 4096 {
        return Err(err("url", "longer than 4096 bytes"));
    }
    let shown = crate::redact::secrets(u);
    let parsed = reqwest::Url::parse(u).map_err(|e| err("url", format!("{shown:?}: {e}")))?;
    match parsed.scheme() {
        "http" | "https" => {
            // `http:///x` parses with host `x`: the authority must not be
            // empty as written.
            let written = u.split_once("://").map(|(_, r)| r).unwrap_or("");
            if parsed.host_str().is_none() || written.starts_with('/') {
                return Err(err("url", format!("{shown:?} has no host")));
            }
            Ok(())
        }
        "s3" => crate::store::ObjectUrl::parse(u)
            .map(|_| ())
            .map_err(|e| err("url", format!("{shown:?}: {e}"))),
        "file" if policy.allow_file => Ok(()),
        "file" => Err(err(
            "url",
            format!(
                "{shown:?}: file:// URLs are refused unless the config sets download.allow-file-urls"
            ),
        )),
        other => Err(err(
            "url",
            format!("{shown:?}: scheme {other} is not http, https or s3"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn good() -> Value {
        serde_json::json!({"build": "b-1", "url": "http://h/a.tar.gz", "sha256": SHA, "size": 10, "format": "tar.gz"})
    }

    fn parse(v: &Value) -> Result<Manifest, ManifestError> {
        Manifest::parse(v.to_string().as_bytes(), UrlPolicy::default())
    }

    #[test]
    fn accepts_minimal_and_ignores_unknown_fields() {
        let mut v = good();
        v["future_field"] = serde_json::json!({"x": 1});
        let m = parse(&v).unwrap();
        assert_eq!(m.spec.build, "b-1");
        assert_eq!(m.spec.format, Format::TarGz);
        assert_eq!(m.spec.urls, vec!["http://h/a.tar.gz"]);
    }

    #[test]
    fn each_required_field_is_named_when_missing_or_bad() {
        for (field, bad) in [
            ("build", serde_json::json!("../x")),
            ("url", serde_json::json!(5)),
            ("sha256", serde_json::json!("zz")),
            ("size", serde_json::json!(-1)),
            ("format", serde_json::json!("zip")),
        ] {
            let mut v = good();
            v.as_object_mut().unwrap().remove(field);
            assert_eq!(parse(&v).unwrap_err().field, field, "missing {field}");
            v[field] = bad;
            assert_eq!(parse(&v).unwrap_err().field, field, "bad {field}");
        }
    }

    #[test]
    fn a_builds_index_round_trips_and_its_fields_are_named() {
        let mut v = good();
        v["index"] =
            serde_json::json!({"url": "s3://builds/a.index.json.zst", "sha256": SHA, "size": 7});
        let m = parse(&v).unwrap();
        let index = m.spec.index.clone().unwrap();
        assert_eq!(index.urls, vec!["s3://builds/a.index.json.zst"]);
        assert_eq!((index.sha256.as_str(), index.size), (SHA, 7));
        let again = Value::Object(m.spec.to_json());
        assert_eq!(again["index"], v["index"]);
        v["index"]["sha256"] = serde_json::json!("zz");
        assert_eq!(parse(&v).unwrap_err().field, "index.sha256");
        v["index"] = serde_json::json!("x");
        assert_eq!(parse(&v).unwrap_err().field, "index");
    }

    #[test]
    fn url_schemes_and_mirrors() {
        let mut v = good();
        v["url"] = serde_json::json!(["http://a/x", "https://b/x"]);
        v["mirrors"] = serde_json::json!(["http://c/x"]);
        assert_eq!(parse(&v).unwrap().spec.urls.len(), 3);
        v["url"] = serde_json::json!("file:///etc/passwd");
        assert!(parse(&v).unwrap_err().reason.contains("file://"));
        let m = Manifest::parse(v.to_string().as_bytes(), UrlPolicy { allow_file: true });
        assert!(m.is_ok());
        v["url"] = serde_json::json!("ftp://h/x");
        assert_eq!(parse(&v).unwrap_err().field, "url");
        v["url"] = serde_json::json!("s3://builds/app/a.tar.gz");
        v["mirrors"] = serde_json::json!(["https://c/x", "s3://mirror-bucket/a.tar.gz"]);
        assert_eq!(parse(&v).unwrap().spec.urls.len(), 3);
        v["url"] = serde_json::json!("s3://Not_A_Bucket/a.tar.gz");
        assert!(parse(&v).unwrap_err().reason.contains("bucket"));
    }

    #[test]
    fn rollout_fields() {
        let mut v = good();
        v["percent"] = serde_json::json!(12.5);
        v["previous"] = good();
        v["previous"]["build"] = serde_json::json!("b-0");
        let m = parse(&v).unwrap();
        assert_eq!(m.percent, Some(12.5));
        assert_eq!(m.previous.as_ref().unwrap().build, "b-0");
        v["percent"] = serde_json::json!(100.5);
        assert_eq!(parse(&v).unwrap_err().field, "percent");
        v["percent"] = serde_json::json!(50);
        v["previous"]["sha256"] = serde_json::json!("zz");
        assert_eq!(parse(&v).unwrap_err().field, "previous.sha256");
        v["previous"] = serde_json::json!("b-0");
        assert_eq!(parse(&v).unwrap_err().field, "previous");
    }

    #[test]
    fn build_ids_are_safe_as_paths_and_arguments() {
        for bad in [".", "..", "--help", "-x", ".hidden", "", "a/b", "a b"] {
            let mut v = good();
            v["build"] = serde_json::json!(bad);
            assert!(parse(&v).is_err(), "{bad:?} accepted");
        }
        let mut v = good();
        v["build"] = serde_json::json!("x".repeat(100_000));
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.len() < 400, "the whole id is quoted: {} bytes", e.len());
        for ok in ["b-1", "2026.11.26-3", "A_b.c"] {
            let mut v = good();
            v["build"] = serde_json::json!(ok);
            assert!(parse(&v).is_ok(), "{ok:?} refused");
        }
    }

    #[test]
    fn urls_need_a_host_and_hide_credentials_in_errors() {
        let mut v = good();
        v["url"] = serde_json::json!("http:///x");
        assert!(parse(&v).unwrap_err().to_string().contains("no host"));
        v["url"] = serde_json::json!("ftp://bob:hunter2@h/x");
        let e = parse(&v).unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [&b"{"[..], b"[]", b"null", b"\xff\xfe"] {
            assert_eq!(
                Manifest::parse(bad, UrlPolicy::default())
                    .unwrap_err()
                    .field,
                "(document)"
            );
        }
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(Manifest::parse(&huge, UrlPolicy::default()).is_err());
    }
}
