//! A fleet host run as a real `deploy-agent run` process with the shipped
//! settings, and the commander's `release` commands, for the intent tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use deploy_agent::consul::{ConsulClient, ConsulSettings};
use deploy_agent::fleet::commander::release::{check_spec, spec_from_artifact, Release};
use deploy_agent::manifest::{BuildSpec, Format};
use testkit::buildgen::{self, BuildProfile};
use testkit::testserver::artifact::ArtifactServer;
use testkit::testserver::consul::ConsulServer;

use crate::process::{served, wait_served_sync, write_config, Proc};
use crate::{agent_bin, DEADLINE};

pub const APP: &str = "app";
pub const TIER: &str = "production";

/// One host: its directory, config and (when running) process.
#[derive(Debug)]
pub struct Host {
    pub id: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub proc: Option<Proc>,
}

impl Host {
    /// Writes the config: shipped defaults everywhere except paths, the
    /// host id, and a short download splay (the splay is not what these
    /// tests are about, and it would only add up to 20 s per deploy).
    pub fn new(base: &Path, id: &str, consul: &str, extra: &str) -> Host {
        let dir = base.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.toml");
        let h = Host {
            id: id.to_string(),
            dir,
            config,
            proc: None,
        };
        h.write_config(id, consul, extra);
        h
    }

    pub fn write_config(&self, id: &str, consul: &str, extra: &str) {
        let tables = format!(
            "[fleet]\napp = \"{APP}\"\ntier = \"{TIER}\"\nhost-id = \"{id}\"\nsplay-max = \"1s\"\n{extra}"
        );
        let written = write_config(&self.dir, &self.dir.join("root"), consul, "", &tables);
        debug_assert_eq!(written, self.config);
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    pub fn start(&mut self) {
        self.proc = Some(Proc::start(&self.config, None));
    }

    pub fn proc(&self) -> &Proc {
        self.proc.as_ref().unwrap()
    }

    pub fn served(&self) -> String {
        served(&self.dir.join("root"))
    }

    pub fn wait_served(&self, id: &str) {
        wait_served_sync(&self.dir.join("root"), id, DEADLINE, || {
            self.proc.as_ref().map(Proc::log).unwrap_or_default()
        });
    }

    /// An operator command. A reload rebuilds the agent's parts, the
    /// status socket among them: "agent not running" (exit 3) is retried
    /// up to the shared deadline, as an operator would.
    pub fn cli(&self, args: &[&str]) -> Output {
        let answer = crate::poll_until(DEADLINE, Duration::from_millis(100), || {
            let out = Command::new(agent_bin())
                .args(args)
                .arg("--socket")
                .arg(self.sock())
                .env("NO_COLOR", "1")
                .output()
                .unwrap();
            // A reload's new parts create their socket a moment after the
            // old ones go (the CLI itself sends a command again while the
            // agent says it did not run it); a restart takes longer.
            let not_running = out.status.code() == Some(i32::from(deploy_agent::exit::NOT_RUNNING));
            if not_running {
                Err(out)
            } else {
                Ok(out)
            }
        });
        // After the deadline, the last answer as it is.
        match answer {
            Ok(out) | Err(out) => out,
        }
    }

    /// `status --json`, waiting for the socket after a (re)start.
    pub fn status(&self) -> serde_json::Value {
        crate::wait_until_every("status", DEADLINE, Duration::from_millis(50), || {
            let out = self.cli(&["status", "--json"]);
            if out.status.success() {
                Ok(serde_json::from_slice(&out.stdout).unwrap())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        })
    }
}

pub fn release(consul: &str, args: &[&str]) -> Output {
    let out = Command::new(agent_bin())
        .args(["release", "--consul", consul, "--app", APP, "--tier", TIER])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "release {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Publishes build `id` with `release publish` (the current build becomes
/// `previous`, as in a real rollout).
pub fn publish(consul: &ConsulServer, art: &ArtifactServer, dir: &Path, id: &str) {
    let (path, full) = serve_build(art, dir, id);
    let out = Command::new(agent_bin())
        .args([
            "release",
            "--consul",
            &consul.url(),
            "--app",
            APP,
            "--tier",
            TIER,
            "publish",
            "--build",
            id,
            "--percent",
            "100",
            "--artifact",
        ])
        .arg(&path)
        .args(["--url", &full])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "publish {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Generates build `id` (TINY, seed 3) in `dir`, serves it at
/// `/<id>.tar.gz`; returns the artifact's path and its full URL.
fn serve_build(art: &ArtifactServer, dir: &Path, id: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{id}.tar.gz"));
    buildgen::write_build(BuildProfile::TINY, 3, id, Format::TarGz, &path).unwrap();
    let url = format!("/{id}.tar.gz");
    art.add(&url, std::fs::read(&path).unwrap());
    (path, art.url(&url))
}

/// Build `id` served as by [`publish`], as the checked spec an in-process
/// [`Release`] publishes.
pub fn tiny_spec(art: &ArtifactServer, dir: &Path, id: &str) -> BuildSpec {
    let (path, url) = serve_build(art, dir, id);
    let spec = spec_from_artifact(id, &path, &url, Format::TarGz, None).unwrap();
    check_spec(spec).unwrap()
}

/// The commander for [`APP`] and [`TIER`], in-process with the shipped
/// `[consul]` settings: its writes take a millisecond, not a process start.
pub fn in_process_release(consul: &ConsulServer) -> Release {
    let client = ConsulClient::new(&ConsulSettings {
        address: consul.url(),
        ..ConsulSettings::default()
    })
    .unwrap();
    Release {
        client,
        key: deploy_agent::fleet::tier_key(APP, TIER),
        freeze_key: deploy_agent::fleet::freeze_key(APP),
    }
}
