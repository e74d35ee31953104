//! The fleet: tiers, keys, and the percentage-rollout decision each host
//! makes for itself. The commander's side lives in `release`, `view` and
//! `web` (the live page, `fleet serve`).
//!
//! A tier's key (`deploy/<app>/<tier>`) holds one manifest. With `percent`
//! below 100 it also names the `previous` build; each host hashes its host
//! id with the rollout salt into a stable bucket in `[0, 100)` and runs the
//! new build when its bucket is below the percentage, `previous` otherwise.
//! Because the bucket does not depend on the percentage, raising it only
//! adds hosts: the 10% set is inside the 25% set.
//!
//! The salt is the manifest's `salt`, or the new build's id when absent, so
//! each rollout picks a different first 2% (no host is always the canary)
//! while the sets stay nested for the whole life of one build.
//!
//! Everything here is pure computation apart from reading the host id once
//! at start; nothing is persisted, so a crash loses nothing.

pub mod commander;
pub mod host;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::Config;
pub use crate::consul::keys::{freeze_key, report_prefix, tier_key};
use crate::manifest::{BuildSpec, Manifest};

/// Where the host id comes from when the config does not set one.
pub const MACHINE_ID_PATH: &str = "/etc/machine-id";

/// This host's id: the config's `host-id`, else `/etc/machine-id`, else the
/// hostname. Reads files: call it once at start.
pub fn host_id(config: &Config) -> String {
    if let Some(id) = &config.fleet.host_id {
        return id.clone();
    }
    if let Ok(s) = std::fs::read_to_string(MACHINE_ID_PATH) {
        let s = s.trim();
        if !s.is_empty() {
            return s.to_string();
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// The host's stable bucket in `[0, 100)`: the first 8 bytes of
/// `sha256(salt || 0x00 || host_id)` as a fraction of 2^64, times 100.
pub fn bucket(salt: &str, host_id: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0u8]);
    h.update(host_id.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    // u64 -> f64 loses low bits, never monotonicity; 2^64 as f64 is exact.
    (u64::from_be_bytes(first) as f64) / 18_446_744_073_709_551_616.0 * 100.0
}

/// The salt a manifest's rollout uses.
pub fn salt(m: &Manifest) -> &str {
    m.salt.as_deref().unwrap_or(&m.spec.build)
}

/// Which build a host runs under a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Choice {
    /// No percentage (or 100): everybody runs the new build.
    All,
    /// The bucket is below the percentage.
    New,
    /// The bucket is at or above it: stay on (or return to) `previous`.
    Previous,
    /// Outside the percentage, but the manifest names no previous build:
    /// keep whatever is live, deploy nothing.
    Stay,
}

/// The decision as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub bucket: f64,
    pub percent: Option<f64>,
    pub choice: Choice,
    /// The build this host should run (`None` with [`Choice::Stay`]).
    pub build: Option<String>,
}

/// Decides which build this host runs: `spec` when `bucket < percent`,
/// `previous` otherwise. Pure.
pub fn decide(m: &Manifest, bucket: f64) -> (Decision, Option<&BuildSpec>) {
    let (choice, spec) = match m.percent {
        None => (Choice::All, Some(&m.spec)),
        Some(p) if p >= 100.0 => (Choice::All, Some(&m.spec)),
        Some(p) if bucket < p => (Choice::New, Some(&m.spec)),
        Some(_) => match &m.previous {
            Some(prev) => (Choice::Previous, Some(prev)),
            None => (Choice::Stay, None),
        },
    };
    let d = Decision {
        bucket,
        percent: m.percent,
        choice,
        build: spec.map(|s| s.build.clone()),
    };
    (d, spec)
}

/// The manifest this host deploys: `m` itself, or one for `previous` with
/// the same limits and deploy id. `None` means deploy nothing.
pub fn effective(m: &Manifest, host_id: &str) -> (Decision, Option<Manifest>) {
    let b = bucket(salt(m), host_id);
    let (d, spec) = decide(m, b);
    let chosen = spec.map(|s| Manifest {
        spec: s.clone(),
        deploy_id: m.deploy_id.clone(),
        max_unpacked_bytes: m.max_unpacked_bytes,
        max_entries: m.max_entries,
        percent: None,
        salt: None,
        previous: None,
        // The delta leads to `spec`; a host going to `previous` has no use for it.
        delta: m.delta.clone().filter(|_| *s == m.spec),
    });
    (d, chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Format, UrlPolicy};

    fn spec(b: &str) -> BuildSpec {
        BuildSpec {
            build: b.into(),
            urls: vec!["http://h/a".into()],
            sha256: "a".repeat(64).parse().unwrap(),
            size: 1,
            format: Format::Tar,
            index: None,
        }
    }

    fn manifest(percent: Option<f64>, previous: Option<BuildSpec>) -> Manifest {
        Manifest {
            spec: spec("new"),
            deploy_id: None,
            max_unpacked_bytes: None,
            max_entries: None,
            percent,
            salt: None,
            previous,
            delta: None,
        }
    }

    #[test]
    fn bucket_is_stable_and_in_range() {
        let a = bucket("s", "host-1");
        assert_eq!(a, bucket("s", "host-1"));
        assert!((0.0..100.0).contains(&a));
        assert_ne!(a, bucket("t", "host-1"), "the salt reshuffles");
        assert_ne!(a, bucket("s", "host-2"));
        // The separator keeps (salt, id) pairs apart.
        assert_ne!(bucket("ab", "c"), bucket("a", "bc"));
    }

    #[test]
    fn raising_the_percentage_only_adds_hosts() {
        let hosts: Vec<String> = (0..5000).map(|i| format!("web-{i:05}")).collect();
        let steps = [0.0, 2.0, 10.0, 25.0, 50.0, 75.0, 99.5, 100.0];
        let prev_spec = spec("old");
        let mut last: Vec<bool> = vec![false; hosts.len()];
        for p in steps {
            let m = manifest(Some(p), Some(prev_spec.clone()));
            let now: Vec<bool> = hosts
                .iter()
                .map(|h| effective(&m, h).1.unwrap().spec.build == "new")
                .collect();
            for (i, (was, is)) in last.iter().zip(&now).enumerate() {
                assert!(
                    !was || *is,
                    "{} left the set when raising to {p}%",
                    hosts[i]
                );
            }
            let share = now.iter().filter(|x| **x).count() as f64 / hosts.len() as f64 * 100.0;
            assert!((share - p).abs() < 2.5, "{p}%: {share:.2}% of hosts");
            last = now;
        }
        assert!(last.iter().all(|x| *x));
    }

    #[test]
    fn buckets_are_roughly_uniform() {
        let mut deciles = [0usize; 10];
        for i in 0..20_000 {
            deciles[(bucket("rollout", &format!("h{i}")) / 10.0) as usize] += 1;
        }
        for (d, n) in deciles.iter().enumerate() {
            assert!((1700..2300).contains(n), "decile {d}: {n} of 20000");
        }
    }

    fn chosen(m: Manifest, bucket: f64) -> (Choice, Option<String>) {
        let (d, s) = decide(&m, bucket);
        assert_eq!(d.build, s.map(|s| s.build.clone()));
        (d.choice, d.build)
    }

    #[test]
    fn decision_cases() {
        let prev = spec("old");
        let new = Some("new".to_string());
        assert_eq!(
            chosen(manifest(None, None), 99.0),
            (Choice::All, new.clone())
        );
        let m = manifest(Some(10.0), Some(prev.clone()));
        assert_eq!(chosen(m.clone(), 9.99), (Choice::New, new.clone()));
        assert_eq!(chosen(m, 10.0), (Choice::Previous, Some("old".into())));
        assert_eq!(chosen(manifest(Some(0.0), None), 0.0), (Choice::Stay, None));
        let m = manifest(Some(100.0), Some(prev));
        assert_eq!(chosen(m, 99.999), (Choice::All, new));
    }

    #[test]
    fn salt_defaults_to_the_build_and_can_be_set() {
        let text = br#"{"build":"b-2","url":"http://h/a","sha256":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":1,"format":"tar","percent":12.5}"#;
        let m = Manifest::parse(text, UrlPolicy::default()).unwrap();
        assert_eq!(salt(&m), "b-2");
        let mut m2 = m.clone();
        m2.salt = Some("fixed".into());
        assert_eq!(salt(&m2), "fixed");
    }
}
