//! S3-compatible object stores: `s3://bucket/key` URLs in manifests (and
//! delta URLs and mirrors), signed per request with the host's own
//! credentials (`credentials`), for AWS S3 and for self-hosted stores
//! (MinIO, Ceph, R2, Garage) through `[store] endpoint` and `path-style`.
//!
//! Each request the download engine makes gets its own SigV4-presigned URL
//! (rusty-s3's sans-IO signer, valid [`PRESIGN_FOR`]); the engine's ranges,
//! retries, resume, bandwidth cap and cache are the same as for https. A
//! store's error answers are turned into errors that name the object and
//! say what to fix ([`Store::classify`]).
//!
//! Crash guarantees: this module keeps nothing on disk; a download's bytes
//! and progress are the artifact cache's (`artifact::partial`), and an
//! upload's are the store's (see `upload`).

pub mod credentials;
pub mod upload;

use std::time::Duration;

use rusty_s3::{Bucket, UrlStyle};

use crate::config::StoreConfig;
use crate::error::{Error, Result};
use credentials::{Env, Keys, Provider, Source};

/// A signed URL's lifetime. S3 checks it when a request starts, not while
/// its body streams, and every request is signed afresh, so a short one
/// limits what a leaked URL is worth without limiting a download.
pub const PRESIGN_FOR: Duration = Duration::from_secs(15 * 60);

/// Default region when neither the config nor the environment names one.
const DEFAULT_REGION: &str = "us-east-1";

/// An object named by an `s3://bucket/key` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    pub bucket: String,
    pub key: String,
}

impl ObjectUrl {
    /// Parses `s3://bucket/key`; `Err` says what is wrong with it.
    pub fn parse(url: &str) -> std::result::Result<ObjectUrl, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| "does not start with s3://".to_string())?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| "names no key after the bucket (s3://bucket/key)".to_string())?;
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(format!(
                "bucket {bucket:?} is not a valid bucket name (3-63 of a-z 0-9 . -)"
            ));
        }
        if key.is_empty() || key.contains(['?', '#']) {
            return Err("the key must be non-empty and hold no ? or #".into());
        }
        Ok(ObjectUrl {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }
}

impl std::fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// Where requests go and which credentials sign them, resolved from
/// `[store]` and the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    pub region: String,
    pub endpoint: reqwest::Url,
    pub path_style: bool,
    pub source: Source,
}

fn env_value<'a>(env: &'a Env, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| env.get(*n).map(String::as_str).filter(|v| !v.is_empty()))
}

impl StoreSettings {
    /// `[store]` with the `AWS_*` environment over it, as `CONSUL_*` is
    /// over `[consul]`: `AWS_REGION`/`AWS_DEFAULT_REGION`,
    /// `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`.
    pub fn resolve(cfg: &StoreConfig, env: &Env) -> Result<StoreSettings> {
        let region = env_value(env, &["AWS_REGION", "AWS_DEFAULT_REGION"])
            .or(cfg.region.as_deref())
            .unwrap_or(DEFAULT_REGION)
            .to_string();
        let (endpoint, setting) = match env_value(env, &["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
        {
            Some(e) => (e.to_string(), "AWS_ENDPOINT_URL_S3"),
            None => match &cfg.endpoint {
                Some(e) => (e.clone(), "store.endpoint"),
                None => (format!("https://s3.{region}.amazonaws.com"), "store.region"),
            },
        };
        let endpoint = reqwest::Url::parse(&endpoint).map_err(|e| Error::StoreSetting {
            setting: setting.into(),
            reason: format!("{endpoint:?} is not a URL: {e}"),
        })?;
        let source = Source::detect(cfg.credentials_file.as_deref(), &region, env);
        Ok(StoreSettings {
            region,
            endpoint,
            path_style: cfg.path_style,
            source,
        })
    }
}

/// What is asked of the store, for signing and for the error's advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Get,
    Head,
    Put,
}

impl Action {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Action::Get => "GET",
            Action::Head => "HEAD",
            Action::Put => "PUT",
        }
    }

    fn permission(self) -> &'static str {
        match self {
            Action::Get | Action::Head => "s3:GetObject",
            Action::Put => "s3:PutObject",
        }
    }
}

/// A presigned request URL and the access key that signed it. `Debug`
/// hides the URL: it carries the signature and any session token.
pub struct Signed {
    pub url: reqwest::Url,
    pub access_key: String,
}

impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

/// How a store's error answer should be handled.
#[derive(Debug)]
pub enum Verdict {
    /// The credentials expired: they were forgotten; retry with new ones.
    Expired(String),
    /// Throttling or a server error: retry after the backoff.
    Retry(String),
    /// Retrying will not help: the error says what to fix.
    Fatal(Error),
}

/// One store (endpoint, region) and its credential provider. Shared by
/// every download; cheap to clone behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    settings: StoreSettings,
    provider: Provider,
}

impl PartialEq for Store {
    fn eq(&self, other: &Store) -> bool {
        self.settings == other.settings
    }
}

impl Store {
    pub fn new(settings: StoreSettings, http: reqwest::Client) -> Store {
        let provider = Provider::new(settings.source.clone(), http);
        Store { settings, provider }
    }

    /// The store `[store]` and this process's environment describe.
    pub fn from_config(cfg: &StoreConfig, http: reqwest::Client) -> Result<Store> {
        let settings = StoreSettings::resolve(cfg, &credentials::process_env())?;
        Ok(Store::new(settings, http))
    }

    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    /// What `run` and `check-config` refuse before any request: a key file
    /// that others could read.
    pub fn check(&self) -> Result<()> {
        if let Source::File(path) = &self.settings.source {
            credentials::check_private(path).map_err(|reason| Error::StoreSetting {
                setting: "store.credentials-file".into(),
                reason,
            })?;
        }
        Ok(())
    }

    pub(crate) fn bucket(&self, object: &ObjectUrl) -> Result<Bucket> {
        let style = if self.settings.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        Bucket::new(
            self.settings.endpoint.clone(),
            style,
            object.bucket.clone(),
            self.settings.region.clone(),
        )
        .map_err(|e| Error::StoreSetting {
            setting: "store.endpoint".into(),
            reason: format!("{}: {e}", self.settings.endpoint),
        })
    }

    /// Current keys (refreshed when close to expiry) as rusty-s3 wants them.
    async fn keys(&self) -> Result<(std::sync::Arc<Keys>, rusty_s3::Credentials)> {
        let keys = self.provider.keys().await?;
        let creds = match &keys.session_token {
            Some(t) => rusty_s3::Credentials::new_with_token(
                keys.access_key_id.clone(),
                keys.secret_access_key.clone(),
                t.clone(),
            ),
            None => rusty_s3::Credentials::new(
                keys.access_key_id.clone(),
                keys.secret_access_key.clone(),
            ),
        };
        Ok((keys, creds))
    }

    /// A presigned URL for `action` on `object` with the current keys.
    pub async fn sign(&self, object: &ObjectUrl, action: Action) -> Result<Signed> {
        use rusty_s3::S3Action;
        self.sign_with(object, &|bucket, creds, key| match action {
            Action::Get => bucket.get_object(Some(creds), key).sign(PRESIGN_FOR),
            Action::Head => bucket.head_object(Some(creds), key).sign(PRESIGN_FOR),
            Action::Put => bucket.put_object(Some(creds), key).sign(PRESIGN_FOR),
        })
        .await
    }

    /// A URL `sign` presigns for `object`'s bucket and key with the
    /// current keys (multipart uploads sign their own actions).
    pub async fn sign_with(
        &self,
        object: &ObjectUrl,
        sign: &(dyn Fn(&Bucket, &rusty_s3::Credentials, &str) -> reqwest::Url + Sync),
    ) -> Result<Signed> {
        let bucket = self.bucket(object)?;
        let (keys, creds) = self.keys().await?;
        Ok(Signed {
            url: sign(&bucket, &creds, &object.key),
            access_key: keys.access_key_id.clone(),
        })
    }

    /// Classifies the store's error answer to `action` on `object`
    /// (`status`, the `x-amz-bucket-region` header, the XML body). Expired
    /// credentials are forgotten here, so the retry fetches new ones.
    pub async fn classify(
        &self,
        object: &ObjectUrl,
        action: Action,
        signed: &Signed,
        status: u16,
        bucket_region: Option<&str>,
        body: &str,
    ) -> Verdict {
        let code = credentials::xml_tag(body, "Code").unwrap_or("").to_string();
        let message = crate::redact::message(credentials::xml_tag(body, "Message").unwrap_or(""));
        let what = format!("HTTP {status} {code} {message}").trim().to_string();
        let region = bucket_region
            .map(str::to_string)
            .or_else(|| credentials::xml_tag(body, "Region").map(str::to_string));
        match (status, code.as_str()) {
            (400 | 403, "ExpiredToken" | "TokenRefreshRequired" | "RequestExpired") => {
                self.provider.invalidate(&signed.access_key, &code).await;
                Verdict::Expired(format!("{what} (credentials expired; fetching new ones)"))
            }
            // S3 names the bucket's region in a 301, or in the 400 it gives
            // a signature scoped to another region.
            (301 | 307, _) | (400, _) if status != 400 || region.is_some() => {
                Verdict::Fatal(Error::StoreWrongRegion {
                    object: object.to_string(),
                    region: self.settings.region.clone(),
                    detail: match region {
                        Some(r) => format!("the store says it is in {r}"),
                        None => what,
                    },
                })
            }
            (403, "RequestTimeTooSkewed") => Verdict::Fatal(Error::StoreRequest {
                object: object.to_string(),
                action: action.name(),
                reason: format!(
                    "{what}: this host's clock is off; check its time sync (timedatectl)"
                ),
            }),
            (403, _) => {
                if matches!(
                    code.as_str(),
                    "InvalidAccessKeyId" | "SignatureDoesNotMatch"
                ) {
                    // A key file (or profile) that was rotated or fixed is
                    // read again on the next try: the fix heals the host
                    // without a restart.
                    self.provider.invalidate(&signed.access_key, &code).await;
                }
                Verdict::Fatal(Error::StoreDenied {
                    object: object.to_string(),
                    action: action.name(),
                    detail: what,
                    identity: format!(
                        "access key {} from {}",
                        signed.access_key,
                        self.provider.source()
                    ),
                    permission: action.permission(),
                })
            }
            (404, c) => Verdict::Fatal(Error::StoreNotFound {
                object: object.to_string(),
                what: if c == "NoSuchBucket" { "bucket" } else { "key" },
                code: if c.is_empty() {
                    "NoSuchKey".into()
                } else {
                    c.to_string()
                },
            }),
            (429 | 500..=599, _) => Verdict::Retry(what),
            _ => Verdict::Fatal(Error::StoreRequest {
                object: object.to_string(),
                action: action.name(),
                reason: what,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn object_urls() {
        let o = ObjectUrl::parse("s3://builds-1/app/a b.tar.gz").unwrap();
        assert_eq!(
            (o.bucket.as_str(), o.key.as_str()),
            ("builds-1", "app/a b.tar.gz")
        );
        assert_eq!(o.to_string(), "s3://builds-1/app/a b.tar.gz");
        for bad in [
            "s3://b",
            "s3://Bad_Bucket/k",
            "s3://bucket/",
            "https://x/y",
            "s3://bkt/k?x",
        ] {
            assert!(ObjectUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn environment_overrides_the_section() {
        let cfg = StoreConfig {
            region: Some("eu-west-1".into()),
            endpoint: Some("http://minio:9000".into()),
            path_style: true,
            credentials_file: None,
        };
        let s = StoreSettings::resolve(&cfg, &Env::new()).unwrap();
        assert_eq!(
            (s.region.as_str(), s.endpoint.as_str()),
            ("eu-west-1", "http://minio:9000/")
        );
        let env: Env = [
            ("AWS_REGION", "ap-south-1"),
            ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = StoreSettings::resolve(&StoreConfig::default(), &env).unwrap();
        assert_eq!(
            (s.region.as_str(), s.endpoint.as_str()),
            ("ap-south-1", "http://127.0.0.1:9/")
        );
        let s = StoreSettings::resolve(&StoreConfig::default(), &Env::new()).unwrap();
        assert_eq!(s.endpoint.as_str(), "https://s3.us-east-1.amazonaws.com/");
    }
}
