//! A real `deploy-agent` process for tests: start with a config, read its
//! log, signal it, wait for it; killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::agent_bin;

/// A running `deploy-agent run`.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
}

impl Proc {
    pub fn start(config: &Path, notify: Option<&Path>) -> Proc {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["run", "--config"])
            .arg(config)
            .env("DEPLOY_AGENT_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match notify {
            Some(p) => {
                cmd.env("NOTIFY_SOCKET", p).env("WATCHDOG_USEC", "300000");
            }
            None => {
                cmd.env_remove("NOTIFY_SOCKET");
            }
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        Proc { child, log }
    }

    pub fn wait_log(&self, needle: &str, limit: Duration) {
        crate::wait_until(&format!("{needle:?} in the log"), limit, || {
            let log = self.log.lock().unwrap();
            if log.contains(needle) {
                Ok(())
            } else {
                Err(log.clone())
            }
        });
    }

    /// Waits until `needle` is in the log after the last `marker`.
    pub fn wait_log_after(&self, marker: &str, needle: &str, limit: Duration) {
        crate::wait_until(
            &format!("{needle:?} after {marker:?} in the log"),
            limit,
            || {
                let log = self.log.lock().unwrap();
                match log.rfind(marker) {
                    Some(at) if log[at..].contains(needle) => Ok(()),
                    _ => Err(log.clone()),
                }
            },
        );
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.child.id();
        crate::wait_until("agent did not exit", limit, || {
            self.child
                .try_wait()
                .unwrap()
                .ok_or_else(|| format!("pid {pid} still running"))
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `deploy-agent status --json` over `sock`: `None` while the agent does
/// not answer (starting, restarting); a successful answer that is not JSON
/// fails the test.
pub fn status_json(sock: &Path) -> Option<serde_json::Value> {
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--socket"])
        .arg(sock)
        .output()
        .unwrap_or_else(|e| panic!("deploy-agent status: {e}"));
    out.status.success().then(|| {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON: {e}"))
    })
}

/// Writes the config of a `deploy-agent run` process to `dir/config.toml`
/// and returns its path: deploy root `root`, status socket
/// `dir/agent.sock`, Consul at `consul` with `consul_keys` in its table,
/// then `tables` (whole tables such as `[source]`, `[fleet]`, `[hooks]`;
/// not `[consul]` or `[status]`). Everything else is the shipped default.
pub fn write_config(
    dir: &Path,
    root: &Path,
    consul: &str,
    consul_keys: &str,
    tables: &str,
) -> PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "deploy-root = \"{root}\"\n[status]\nsocket = \"{sock}\"\n\
         [consul]\naddress = \"{consul}\"\n{consul_keys}\n{tables}\n",
        root = root.display(),
        sock = dir.join("agent.sock").display(),
    );
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// `deploy-agent run --config <config>` with info logs appended to `log`
/// (text format), no notify socket: the agent as the SIGKILL tests run it.
pub fn spawn_run(bin: &Path, config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bin)
        .args(["--log-format", "text", "run", "--config"])
        .arg(config)
        .env("DEPLOY_AGENT_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// The build `<root>/current` serves (its BUILD file), or "" if none.
pub fn served(root: &Path) -> String {
    std::fs::read_to_string(root.join("current/BUILD")).unwrap_or_default()
}

/// Waits until `root/current/BUILD` names `build`; on timeout panics with
/// what `context` says (the agent's log).
pub fn wait_served_sync(root: &Path, build: &str, limit: Duration, context: impl Fn() -> String) {
    crate::wait_until(&format!("{build} served"), limit, || {
        let now = served(root);
        if now == build {
            Ok(())
        } else {
            Err(format!("serving {now:?}\n{}", context()))
        }
    });
}

/// [`wait_served_sync`] for async tests; on timeout panics with the tail of
/// the agent's `log`.
pub async fn wait_served(root: &Path, build: &str, limit: Duration, log: &Path) {
    crate::wait_until_async(&format!("{build} served"), limit, || async {
        let now = served(root);
        if now == build {
            return Ok(());
        }
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        Err(format!("serving {now:?}; agent log tail:\n{tail}"))
    })
    .await;
}
