//! The deploy commander's release commands: publish, promote, rollback,
//! freeze, unfreeze, show. Each reads the key with its ModifyIndex and
//! writes with check-and-set on that index (create with `cas=0`), so two
//! commanders can never silently overwrite each other: the second one gets
//! [`Error::ReleaseConflict`] and re-reads.
//!
//! Each command is one Consul write; if the process dies, the key holds
//! either the old or the new manifest, never a mix.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::clock::now_secs;
use crate::consul::{ConsulClient, QueryOptions};
use crate::error::{Error, Result};
use crate::manifest::{BuildSpec, DeltaSpec, Format, IndexSpec, Manifest, UrlPolicy};

/// The keys a commander works on.
#[derive(Debug, Clone)]
pub struct Release {
    pub client: ConsulClient,
    /// The tier key (`deploy/<app>/<tier>`).
    pub key: String,
    /// The app's freeze key (`deploy/<app>/freeze`).
    pub freeze_key: String,
}

/// The tier key as read, with the index a write must match.
#[derive(Debug, Clone)]
pub struct Current {
    /// The raw JSON object (unknown fields kept on rewrite).
    pub raw: Map<String, Value>,
    pub manifest: Manifest,
    pub modify_index: u64,
}

/// What `release show` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Shown {
    pub key: String,
    pub manifest: Option<Value>,
    pub modify_index: Option<u64>,
    pub freeze: Option<Value>,
}

/// Writes the delta from the local `base` artifact to the local `target`
/// artifact into `out` and describes it for the manifest: hosts running
/// the base download it from `url` instead of the whole target.
pub fn delta_spec(
    base: (&Path, Format),
    target: (&Path, Format),
    out: &Path,
    url: &str,
) -> Result<(DeltaSpec, crate::unpack::delta::DeltaInfo)> {
    // `write` hashed the base already: its index names it.
    let info = crate::unpack::delta::write(base, target, out)?;
    let spec = DeltaSpec {
        base: info.base.clone(),
        urls: vec![url.to_string()],
        sha256: info.sha256.clone(),
        size: info.size,
    };
    Ok((spec, info))
}

/// Where [`spec_from_artifact`] writes the file index of `artifact`.
pub fn index_path(artifact: &Path) -> PathBuf {
    PathBuf::from(format!("{}.index.json.zst", artifact.display()))
}

/// Builds a spec from a local artifact: its sha256 and size are computed
/// here, the URL is where the artifact server serves it. With `index_url`,
/// the same read also writes the build's file index next to the artifact
/// ([`index_path`]), which hosts download from `index_url`.
pub fn spec_from_artifact(
    build: &str,
    path: &Path,
    url: &str,
    format: Format,
    index_url: Option<&str>,
) -> Result<BuildSpec> {
    let (sha256, size, index) = match index_url {
        None => {
            let (sha256, size) = crate::artifact::sha256::hash_file(path)?;
            (sha256, size, None)
        }
        Some(index_url) => {
            let size = std::fs::metadata(path)
                .map_err(|e| Error::io(path, e))?
                .len();
            let files = written_index(path, format)?;
            let (sha256, bytes) = crate::artifact::sha256::hash_file(&index_path(path))?;
            let index = IndexSpec {
                urls: vec![index_url.to_string()],
                sha256,
                size: bytes,
            };
            (files.artifact, size, Some(index))
        }
    };
    check_spec(BuildSpec {
        build: build.to_string(),
        urls: vec![url.to_string()],
        sha256,
        size,
        format,
        index,
    })
}

/// The file index of `artifact` at [`index_path`]: the one `release index`
/// wrote when it describes this artifact (it may be uploaded already and
/// must not change), else written now.
fn written_index(artifact: &Path, format: Format) -> Result<crate::integrity::FileIndex> {
    use crate::integrity::FileIndex;
    let out = index_path(artifact);
    if out.exists() {
        let (sha256, _) = crate::artifact::sha256::hash_file(artifact)?;
        if let Ok(index) = FileIndex::load(&out, &sha256) {
            return Ok(index);
        }
    }
    let index = FileIndex::of_artifact(artifact, format)?;
    index.write(&out)?;
    Ok(index)
}

/// Validates a spec given on the command line exactly as agents will.
pub fn check_spec(s: BuildSpec) -> Result<BuildSpec> {
    let obj = s.to_json();
    BuildSpec::from_object(&obj, UrlPolicy { allow_file: true }).map_err(|e| {
        Error::ReleaseInvalid {
            key: String::new(),
            reason: e.to_string(),
        }
    })
}

fn check_percent(key: &str, p: f64) -> Result<f64> {
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(Error::ReleaseInvalid {
            key: key.into(),
            reason: format!("percent {p} is not between 0 and 100"),
        })
    }
}

impl Release {
    /// Reads the tier key; `None` when nothing is published.
    pub async fn read(&self) -> Result<Option<Current>> {
        let r = self.client.get(&self.key, &QueryOptions::default()).await?;
        let Some(pair) = r.pair else { return Ok(None) };
        let manifest =
            Manifest::parse(&pair.value, UrlPolicy { allow_file: true }).map_err(|e| {
                Error::ReleaseInvalid {
                    key: self.key.clone(),
                    reason: format!(
                    "the published manifest does not parse ({e}); fix it with `release publish`"
                ),
                }
            })?;
        let raw = match serde_json::from_slice(&pair.value) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        Ok(Some(Current {
            raw,
            manifest,
            modify_index: pair.modify_index,
        }))
    }

    /// Writes `value` if the key is still at `expected` (0: still absent).
    pub async fn write(&self, value: &Map<String, Value>, expected: u64) -> Result<u64> {
        let body = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::Internal(format!("cannot encode the manifest: {e}")))?;
        if !self.client.put(&self.key, &body, Some(expected)).await? {
            return Err(Error::ReleaseConflict {
                key: self.key.clone(),
                expected,
            });
        }
        let r = self.client.get(&self.key, &QueryOptions::default()).await?;
        let index = r.pair.map(|p| p.modify_index).unwrap_or(r.index);
        if index == expected && expected != 0 {
            // Consul keeps the ModifyIndex when a write stores the value
            // already there (rule 18): another commander's identical write
            // got there first, and this one changed nothing. Say so rather
            // than print their index as ours.
            return Err(Error::ReleaseNoChange {
                key: self.key.clone(),
                index,
            });
        }
        Ok(index)
    }

    /// The manifest `publish` writes: `spec` at `percent`, with the current
    /// build (or, when republishing the same build, its previous) as
    /// `previous`.
    pub fn published(
        &self,
        cur: Option<&Current>,
        spec: &BuildSpec,
        percent: Option<f64>,
    ) -> Result<Map<String, Value>> {
        let mut m = spec.to_json();
        if let Some(p) = percent {
            m.insert("percent".into(), json!(check_percent(&self.key, p)?));
        }
        let previous = cur.and_then(|c| {
            if c.manifest.spec.build == spec.build {
                c.manifest.previous.clone()
            } else {
                Some(c.manifest.spec.clone())
            }
        });
        if let Some(prev) = previous {
            m.insert("previous".into(), Value::Object(prev.to_json()));
        }
        if let Some(c) = cur {
            for k in ["max_unpacked_bytes", "max_entries"] {
                if let Some(v) = c.raw.get(k) {
                    m.insert(k.into(), v.clone());
                }
            }
        }
        m.insert("published_at".into(), json!(now_secs()));
        Ok(m)
    }

    /// `release publish`.
    pub async fn publish(&self, spec: &BuildSpec, percent: Option<f64>) -> Result<u64> {
        self.publish_with_delta(spec, percent, None).await
    }

    /// `publish`, with the delta to `spec` for hosts that run its base.
    pub async fn publish_with_delta(
        &self,
        spec: &BuildSpec,
        percent: Option<f64>,
        delta: Option<&DeltaSpec>,
    ) -> Result<u64> {
        let cur = self.read().await?;
        let mut m = self.published(cur.as_ref(), spec, percent)?;
        if let Some(d) = delta {
            m.insert("delta".into(), Value::Object(d.to_json()));
        }
        self.write(&m, cur.map_or(0, |c| c.modify_index)).await
    }

    /// The manifest `promote` writes.
    pub fn promoted(&self, cur: &Current, percent: f64) -> Result<Map<String, Value>> {
        let mut m = cur.raw.clone();
        let p = check_percent(&self.key, percent)?;
        if p < 100.0 && cur.manifest.previous.is_none() {
            return Err(Error::ReleaseInvalid {
                key: self.key.clone(),
                reason: "the published manifest has no previous build for the hosts outside the percentage; publish it with --percent".into(),
            });
        }
        m.insert("percent".into(), json!(p));
        m.insert("published_at".into(), json!(now_secs()));
        Ok(m)
    }

    /// `release promote --percent N`.
    pub async fn promote(&self, percent: f64) -> Result<u64> {
        let cur = self.require().await?;
        let m = self.promoted(&cur, percent)?;
        self.write(&m, cur.modify_index).await
    }

    /// The manifest `rollback` writes: the previous build for everyone,
    /// the bad one kept as `previous` (a later promote can roll forward).
    pub fn rolled_back(&self, cur: &Current) -> Result<Map<String, Value>> {
        let Some(prev) = &cur.manifest.previous else {
            return Err(Error::ReleaseInvalid {
                key: self.key.clone(),
                reason: "the published manifest names no previous build to roll back to".into(),
            });
        };
        let mut m = prev.to_json();
        m.insert(
            "previous".into(),
            Value::Object(cur.manifest.spec.to_json()),
        );
        m.insert("percent".into(), json!(100));
        m.insert("rolled_back_from".into(), json!(cur.manifest.spec.build));
        for k in ["max_unpacked_bytes", "max_entries"] {
            if let Some(v) = cur.raw.get(k) {
                m.insert(k.into(), v.clone());
            }
        }
        m.insert("published_at".into(), json!(now_secs()));
        Ok(m)
    }

    /// `release rollback`.
    pub async fn rollback(&self) -> Result<u64> {
        let cur = self.require().await?;
        let m = self.rolled_back(&cur)?;
        self.write(&m, cur.modify_index).await
    }

    async fn require(&self) -> Result<Current> {
        self.read().await?.ok_or_else(|| Error::ReleaseMissing {
            key: self.key.clone(),
        })
    }

    /// `release freeze`: creates the freeze key (`cas=0`).
    pub async fn freeze(&self, reason: &str, by: &str) -> Result<()> {
        let body = serde_json::to_vec(&json!({"reason": reason, "by": by, "at": now_secs()}))
            .map_err(|e| Error::Internal(e.to_string()))?;
        if self.client.put(&self.freeze_key, &body, Some(0)).await? {
            return Ok(());
        }
        let r = self
            .client
            .get(&self.freeze_key, &QueryOptions::default())
            .await?;
        let why = r
            .pair
            .map(|p| String::from_utf8_lossy(&p.value).into_owned())
            .unwrap_or_default();
        Err(Error::ReleaseFrozen {
            key: self.freeze_key.clone(),
            detail: why,
        })
    }

    /// `release unfreeze`: deletes the freeze key with `cas` on the index
    /// read, so a freeze someone set meanwhile is not lifted by accident.
    pub async fn unfreeze(&self) -> Result<bool> {
        let r = self
            .client
            .get(&self.freeze_key, &QueryOptions::default())
            .await?;
        let Some(pair) = r.pair else { return Ok(false) };
        self.unfreeze_at(pair.modify_index).await?;
        Ok(true)
    }

    /// Deletes the freeze key only if it is still at `expected` (the index
    /// an earlier read, or the fleet page, saw).
    pub async fn unfreeze_at(&self, expected: u64) -> Result<()> {
        if !self.client.delete_cas(&self.freeze_key, expected).await? {
            return Err(Error::ReleaseConflict {
                key: self.freeze_key.clone(),
                expected,
            });
        }
        Ok(())
    }

    /// `release show`.
    pub async fn show(&self) -> Result<Shown> {
        let r = self.client.get(&self.key, &QueryOptions::default()).await?;
        let f = self
            .client
            .get(&self.freeze_key, &QueryOptions::default())
            .await?;
        let as_json = |v: &[u8]| {
            serde_json::from_slice(v)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(v).into_owned()))
        };
        Ok(Shown {
            key: self.key.clone(),
            modify_index: r.pair.as_ref().map(|p| p.modify_index),
            manifest: r.pair.map(|p| as_json(&p.value)),
            freeze: f.pair.map(|p| as_json(&p.value)),
        })
    }
}
