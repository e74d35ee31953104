//! The `[store]` section: where `s3://` URLs point (region, endpoint, path
//! style) and an optional static key file. Credentials never come from a
//! manifest; without a key file they come from the host's standard chain
//! (`store::credentials`). Read-only config: a crash here changes nothing.

use std::path::PathBuf;

use serde::Deserialize;

/// `[store]`: S3-compatible object stores for `s3://bucket/key` URLs.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct StoreConfig {
    /// Region requests are signed for; `AWS_REGION` / `AWS_DEFAULT_REGION`
    /// override it; default `us-east-1`.
    pub region: Option<String>,
    /// Endpoint of an S3-compatible store (MinIO, Ceph, R2, Garage);
    /// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` override it; default
    /// `https://s3.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    /// `https://endpoint/bucket/key` instead of `https://bucket.endpoint/key`
    /// (most self-hosted stores want this).
    pub path_style: bool,
    /// A static key in the shared-credentials format (`aws_access_key_id`,
    /// `aws_secret_access_key`, optional `aws_session_token`, under
    /// `[default]`), readable only by the agent (mode 0600 or 0400). When
    /// set, it is the only credential source.
    pub credentials_file: Option<PathBuf>,
}

impl StoreConfig {
    /// The checks that need no environment: a parsable endpoint, a
    /// plausible region. `Err` is the message for `ConfigInvalid`.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(e) = &self.endpoint {
            let url =
                reqwest::Url::parse(e).map_err(|err| format!("store.endpoint {e:?}: {err}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(format!(
                    "store.endpoint {e:?}: must be an http or https URL with a host"
                ));
            }
        }
        if let Some(r) = &self.region {
            let ok = !r.is_empty()
                && r.len() <= 64
                && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !ok {
                return Err(format!(
                    "store.region {r:?}: must be a region name such as eu-west-1"
                ));
            }
        }
        Ok(())
    }
}
