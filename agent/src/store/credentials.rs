//! Object-store credentials from the host's own standard chain, never from
//! a manifest: a static key file named in `[store]`, the `AWS_*`
//! environment, web identity (EKS IRSA, through STS), the shared
//! credentials file and `AWS_PROFILE`, the ECS task role, then the EC2
//! instance role over IMDSv2. The source is chosen once from what the host
//! has ([`Source::detect`], no network); the keys it gives are cached in
//! memory and fetched again 5 minutes before they expire, or at once when
//! the store says they expired.
//!
//! Crash guarantees: nothing is written anywhere; secrets live only in
//! memory, and `Debug`/`Display` never show them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::error::{Error, Result};

/// Credentials are fetched again this long before they expire (the AWS
/// SDKs' window: IMDS and STS hand out new keys well before that).
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);

/// How long one request to IMDS, ECS or STS may take. A PUT for an IMDSv2
/// token that never answers is the hop limit at work (see [`Source::Imds`]).
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// The IMDSv2 session token's lifetime we ask for (6 hours, the maximum).
const IMDS_TOKEN_TTL: Duration = Duration::from_secs(6 * 3600);

const IMDS_DEFAULT: &str = "http://169.254.169.254";
const ECS_DEFAULT_HOST: &str = "http://169.254.170.2";

/// Where the keys come from.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// `[store] credentials-file`: a static key only the agent can read.
    File(PathBuf),
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    Env,
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, exchanged at STS.
    WebIdentity {
        token_file: PathBuf,
        role_arn: String,
        session_name: String,
        sts: String,
    },
    /// The shared credentials file (`AWS_SHARED_CREDENTIALS_FILE` or
    /// `~/.aws/credentials`), profile `AWS_PROFILE` or `default`.
    Profile { path: PathBuf, profile: String },
    /// The ECS task role (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` or
    /// `_FULL_URI`, with `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]`).
    Ecs { url: String, auth: Option<Auth> },
    /// The EC2 instance role over IMDSv2: PUT a session token, then GET the
    /// role's keys with it. In a container behind one more network hop the
    /// PUT's answer is dropped unless the instance's hop limit is >= 2.
    Imds { endpoint: String },
}

/// The ECS credentials endpoint's authorization token, given or in a file.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    Value(String),
    File(PathBuf),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Value(_) => write!(f, "Auth::Value(***)"),
            Auth::File(p) => write!(f, "Auth::File({})", p.display()),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "the key file {}", p.display()),
            Source::Env => write!(f, "the environment (AWS_ACCESS_KEY_ID)"),
            Source::WebIdentity { role_arn, .. } => {
                write!(
                    f,
                    "web identity (AWS_WEB_IDENTITY_TOKEN_FILE, role {role_arn})"
                )
            }
            Source::Profile { path, profile } => {
                write!(f, "profile {profile} in {}", path.display())
            }
            Source::Ecs { url, .. } => write!(f, "the ECS task role ({url})"),
            Source::Imds { endpoint } => write!(f, "the EC2 instance role (IMDSv2 at {endpoint})"),
        }
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Display holds no secret: paths, ARNs and endpoints only.
        write!(f, "{self}")
    }
}

/// The environment the chain reads, as a map (tests pass their own).
pub type Env = HashMap<String, String>;

/// This process's environment.
pub fn process_env() -> Env {
    std::env::vars().collect()
}

fn non_empty<'a>(env: &'a Env, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

impl Source {
    /// Picks the source the way the AWS SDKs walk their chain, from what
    /// this host has, without a request: the configured key file, then the
    /// environment, web identity, a shared credentials file that has the
    /// profile, the ECS task role, and the instance role last.
    pub fn detect(key_file: Option<&Path>, region: &str, env: &Env) -> Source {
        if let Some(p) = key_file {
            return Source::File(p.to_path_buf());
        }
        if non_empty(env, "AWS_ACCESS_KEY_ID").is_some() {
            return Source::Env;
        }
        if let (Some(token), Some(role)) = (
            non_empty(env, "AWS_WEB_IDENTITY_TOKEN_FILE"),
            non_empty(env, "AWS_ROLE_ARN"),
        ) {
            let sts = non_empty(env, "AWS_ENDPOINT_URL_STS")
                .map(str::to_string)
                .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
            return Source::WebIdentity {
                token_file: PathBuf::from(token),
                role_arn: role.to_string(),
                session_name: non_empty(env, "AWS_ROLE_SESSION_NAME")
                    .unwrap_or("deploy-agent")
                    .to_string(),
                sts,
            };
        }
        if let Some(source) = Self::profile(env) {
            return source;
        }
        if let Some(source) = Self::ecs(env) {
            return source;
        }
        let endpoint = non_empty(env, "AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .unwrap_or(IMDS_DEFAULT)
            .trim_end_matches('/')
            .to_string();
        Source::Imds { endpoint }
    }

    fn profile(env: &Env) -> Option<Source> {
        let path = match non_empty(env, "AWS_SHARED_CREDENTIALS_FILE") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(non_empty(env, "HOME")?).join(".aws/credentials"),
        };
        let profile = non_empty(env, "AWS_PROFILE")
            .unwrap_or("default")
            .to_string();
        let text = std::fs::read_to_string(&path).ok()?;
        parse_ini(&text)
            .contains_key(&profile)
            .then_some(Source::Profile { path, profile })
    }

    fn ecs(env: &Env) -> Option<Source> {
        let url = match (
            non_empty(env, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
            non_empty(env, "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        ) {
            (Some(rel), _) => format!("{ECS_DEFAULT_HOST}{rel}"),
            (None, Some(full)) => full.to_string(),
            (None, None) => return None,
        };
        let auth = match (
            non_empty(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
            non_empty(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN"),
        ) {
            (Some(f), _) => Some(Auth::File(PathBuf::from(f))),
            (None, Some(v)) => Some(Auth::Value(v.to_string())),
            (None, None) => None,
        };
        Some(Source::Ecs { url, auth })
    }

    /// What to tell the operator when this source gives no keys.
    fn fix(&self) -> &'static str {
        match self {
            Source::File(_) => "the file needs aws_access_key_id and aws_secret_access_key under [default], owned by the agent's user with mode 0600",
            Source::Env => "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (e.g. in /etc/default/deploy-agent)",
            Source::WebIdentity { .. } => "check the service account's role annotation and that the role trusts the cluster's OIDC provider",
            Source::Profile { .. } => "the profile needs aws_access_key_id and aws_secret_access_key",
            Source::Ecs { .. } => "check the task definition has a task role",
            Source::Imds { .. } => "attach an instance profile with a role to this instance, set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or set [store] credentials-file; in a container, raise the instance's metadata hop limit to 2",
        }
    }
}

/// One set of keys. `Debug` shows the access key id only.
#[derive(Clone)]
pub struct Keys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// `None`: static keys that do not expire.
    pub expires: Option<SystemTime>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("access_key_id", &self.access_key_id)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl Keys {
    fn fresh(&self, now: SystemTime) -> bool {
        self.expires.is_none_or(|at| {
            at.duration_since(now)
                .is_ok_and(|left| left > REFRESH_BEFORE)
        })
    }

    fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

/// The chosen source and its cached keys; shared by every request.
#[derive(Debug)]
pub struct Provider {
    source: Source,
    http: reqwest::Client,
    cached: tokio::sync::Mutex<Option<Arc<Keys>>>,
}

impl Provider {
    pub fn new(source: Source, http: reqwest::Client) -> Provider {
        Provider {
            source,
            http,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Keys good for at least [`REFRESH_BEFORE`] when the source can give
    /// them; keys that are older but not yet expired when a refresh fails
    /// (one flaky IMDS answer must not stop a download).
    pub async fn keys(&self) -> Result<Arc<Keys>> {
        let mut cached = self.cached.lock().await;
        let now = SystemTime::now();
        if let Some(k) = cached.as_ref().filter(|k| k.fresh(now)) {
            return Ok(Arc::clone(k));
        }
        match self.fetch().await {
            Ok(keys) => {
                let expires = keys.expires.map_or_else(
                    || "never".to_string(),
                    |t| humantime::format_rfc3339_seconds(t).to_string(),
                );
                info!(source = %self.source, access_key = %keys.access_key_id, expires = %expires,
                      "object store credentials loaded");
                let keys = Arc::new(keys);
                *cached = Some(Arc::clone(&keys));
                Ok(keys)
            }
            Err(e) => match cached.as_ref().filter(|k| !k.expired(now)) {
                Some(old) => {
                    warn!(source = %self.source, error = %e, "credential refresh failed; using the current keys until they expire");
                    Ok(Arc::clone(old))
                }
                None => Err(e),
            },
        }
    }

    /// Forgets `access_key_id`'s keys after the store refused them (`code`:
    /// expired, unknown, or a secret that does not match), so the next
    /// request fetches or reads them again.
    pub async fn invalidate(&self, access_key_id: &str, code: &str) {
        let mut cached = self.cached.lock().await;
        if cached
            .as_ref()
            .is_some_and(|k| k.access_key_id == access_key_id)
        {
            warn!(source = %self.source, access_key = %access_key_id, code, "the store rejected these credentials; fetching them again");
            *cached = None;
        }
    }

    async fn fetch(&self) -> Result<Keys> {
        let failed = |reason: String| Error::StoreCredentials {
            source_name: self.source.to_string(),
            reason,
            fix: self.source.fix(),
        };
        match &self.source {
            Source::File(p) => {
                check_private(p).map_err(failed)?;
                read_profile(p, "default").map_err(failed)
            }
            Source::Profile { path, profile } => read_profile(path, profile).map_err(failed),
            Source::Env => from_env(&process_env()).map_err(failed),
            Source::WebIdentity {
                token_file,
                role_arn,
                session_name,
                sts,
            } => self
                .web_identity(token_file, role_arn, session_name, sts)
                .await
                .map_err(failed),
            Source::Ecs { url, auth } => self.ecs(url, auth.as_ref()).await.map_err(failed),
            Source::Imds { endpoint } => self.imds(endpoint).await.map_err(failed),
        }
    }

    async fn ecs(&self, url: &str, auth: Option<&Auth>) -> std::result::Result<Keys, String> {
        let mut request = self.http.get(url).timeout(FETCH_TIMEOUT);
        match auth {
            Some(Auth::Value(v)) => request = request.header("Authorization", v),
            Some(Auth::File(p)) => {
                let v = std::fs::read_to_string(p)
                    .map_err(|e| format!("authorization token file {}: {e}", p.display()))?;
                request = request.header("Authorization", v.trim());
            }
            None => {}
        }
        let body = send_text(request, "credentials").await?;
        parse_json_keys(&body)
    }

    /// IMDSv2: a session token by PUT, then the role name and its keys by
    /// GET with the token. No fallback to IMDSv1.
    async fn imds(&self, endpoint: &str) -> std::result::Result<Keys, String> {
        let put = self
            .http
            .put(format!("{endpoint}/latest/api/token"))
            .header(
                "X-aws-ec2-metadata-token-ttl-seconds",
                IMDS_TOKEN_TTL.as_secs().to_string(),
            )
            .timeout(FETCH_TIMEOUT);
        let token = send_text(put, "IMDSv2 token (PUT)").await.map_err(|e| {
            format!("{e}; no answer to the token PUT usually means the metadata hop limit is 1 and the agent runs one hop further (a container): aws ec2 modify-instance-metadata-options --http-put-response-hop-limit 2")
        })?;
        let base = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
        let get = |url: String| {
            self.http
                .get(url)
                .header("X-aws-ec2-metadata-token", token.trim())
                .timeout(FETCH_TIMEOUT)
        };
        let roles = send_text(get(base.clone()), "instance role name").await?;
        let role = roles
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or_else(|| "this instance has no IAM role attached".to_string())?;
        let body = send_text(get(format!("{base}{role}")), "instance role keys").await?;
        parse_json_keys(&body)
    }

    async fn web_identity(
        &self,
        token_file: &Path,
        role_arn: &str,
        session_name: &str,
        sts: &str,
    ) -> std::result::Result<Keys, String> {
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| format!("token file {}: {e}", token_file.display()))?;
        let request = self
            .http
            .post(sts)
            .form(&[
                ("Action", "AssumeRoleWithWebIdentity"),
                ("Version", "2011-06-15"),
                ("RoleArn", role_arn),
                ("RoleSessionName", session_name),
                ("WebIdentityToken", token.trim()),
            ])
            .timeout(FETCH_TIMEOUT);
        let body = send_text(request, "STS AssumeRoleWithWebIdentity").await?;
        let tag = |name: &str| xml_tag(&body, name).map(str::to_string);
        let (Some(id), Some(secret)) = (tag("AccessKeyId"), tag("SecretAccessKey")) else {
            return Err("STS answered without AccessKeyId/SecretAccessKey".into());
        };
        Ok(Keys {
            access_key_id: id,
            secret_access_key: secret,
            session_token: tag("SessionToken"),
            expires: tag("Expiration").and_then(|t| humantime::parse_rfc3339_weak(&t).ok()),
        })
    }
}

/// Sends `request` and returns its body when it answered 2xx. Errors never
/// carry the body of a credentials answer (it may hold keys).
async fn send_text(
    request: reqwest::RequestBuilder,
    what: &str,
) -> std::result::Result<String, String> {
    let response = request
        .send()
        .await
        .map_err(|e| format!("{what}: {}", e.without_url()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("{what}: HTTP {status}"));
    }
    response
        .text()
        .await
        .map_err(|e| format!("{what}: {}", e.without_url()))
}

/// The JSON IMDS and ECS answer with (`AccessKeyId`, `SecretAccessKey`,
/// `Token`, `Expiration`).
fn parse_json_keys(body: &str) -> std::result::Result<Keys, String> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("credentials answer is not JSON: {e}"))?;
    let field = |name: &str| v.get(name).and_then(|x| x.as_str()).map(str::to_string);
    if let Some(code) = field("Code").filter(|c| c != "Success") {
        return Err(format!("credentials answer says {code}"));
    }
    let (Some(id), Some(secret)) = (field("AccessKeyId"), field("SecretAccessKey")) else {
        return Err("credentials answer without AccessKeyId/SecretAccessKey".into());
    };
    let expires = match field("Expiration") {
        Some(t) => Some(
            humantime::parse_rfc3339_weak(&t)
                .map_err(|e| format!("credentials Expiration {t:?}: {e}"))?,
        ),
        None => None,
    };
    Ok(Keys {
        access_key_id: id,
        secret_access_key: secret,
        session_token: field("Token"),
        expires,
    })
}

fn from_env(env: &Env) -> std::result::Result<Keys, String> {
    let id = non_empty(env, "AWS_ACCESS_KEY_ID").ok_or("AWS_ACCESS_KEY_ID is not set")?;
    let secret = non_empty(env, "AWS_SECRET_ACCESS_KEY")
        .ok_or("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")?;
    Ok(Keys {
        access_key_id: id.to_string(),
        secret_access_key: secret.to_string(),
        session_token: non_empty(env, "AWS_SESSION_TOKEN").map(str::to_string),
        expires: None,
    })
}

/// The key file must not be readable by anyone but its owner.
pub fn check_private(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode 0{mode:o}: other users could read the secret; chmod 600 it",
            path.display()
        ));
    }
    Ok(())
}

fn read_profile(path: &Path, profile: &str) -> std::result::Result<Keys, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let sections = parse_ini(&text);
    let section = sections
        .get(profile)
        .ok_or_else(|| format!("{} has no [{profile}] section", path.display()))?;
    let get = |k: &str| section.get(k).filter(|v| !v.is_empty()).cloned();
    let (Some(id), Some(secret)) = (get("aws_access_key_id"), get("aws_secret_access_key")) else {
        return Err(format!(
            "[{profile}] in {} lacks aws_access_key_id or aws_secret_access_key",
            path.display()
        ));
    };
    Ok(Keys {
        access_key_id: id,
        secret_access_key: secret,
        session_token: get("aws_session_token"),
        expires: None,
    })
}

/// The shared credentials file: `[name]` sections of `key = value` lines;
/// `#`/`;` comments. Sections `[profile name]` count as `name`.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            let name = name
                .strip_prefix("profile ")
                .unwrap_or(name)
                .trim()
                .to_string();
            out.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((k, v))) = (&current, line.split_once('=')) {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    out
}

/// The text of the first `<name>…</name>` in a flat XML answer.
pub(crate) fn xml_tag<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&format!("</{name}>"))?;
    Some(&body[start..start + len])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_chain_picks_in_the_sdk_order() {
        let e = env(&[("AWS_ACCESS_KEY_ID", "A"), ("AWS_ROLE_ARN", "r")]);
        assert_eq!(Source::detect(None, "eu-west-1", &e), Source::Env);
        let f = Path::new("/etc/k");
        assert_eq!(Source::detect(Some(f), "x", &e), Source::File(f.into()));
        let w = env(&[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
            ("AWS_ROLE_ARN", "arn:r"),
        ]);
        assert!(matches!(
            Source::detect(None, "eu-west-1", &w),
            Source::WebIdentity { sts, .. } if sts == "https://sts.eu-west-1.amazonaws.com"
        ));
        let c = env(&[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/c")]);
        assert!(matches!(Source::detect(None, "x", &c),
            Source::Ecs { url, .. } if url == "http://169.254.170.2/v2/c"));
        assert_eq!(
            Source::detect(None, "x", &env(&[])),
            Source::Imds {
                endpoint: IMDS_DEFAULT.into()
            }
        );
    }

    #[test]
    fn profiles_and_json_keys_parse() {
        let ini = parse_ini(
            "# c\n[default]\naws_access_key_id = A\n[profile ci]\naws_secret_access_key=s\n",
        );
        assert_eq!(ini["default"]["aws_access_key_id"], "A");
        assert_eq!(ini["ci"]["aws_secret_access_key"], "s");
        let k = parse_json_keys(r#"{"Code":"Success","AccessKeyId":"A","SecretAccessKey":"s3cr3t","Token":"t0ken","Expiration":"2030-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(k.session_token.as_deref(), Some("t0ken"));
        assert!(k.fresh(SystemTime::now()));
        let shown = format!("{k:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("t0ken"),
            "{shown}"
        );
    }
}
