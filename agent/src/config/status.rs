//! The `[status]` section: the status socket's path, mode and groups.
//! Parsing only; nothing is written, so a crash loses nothing.

use std::convert::Infallible;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Error, Result};

/// A group named by name (looked up in the group database at start) or by
/// number (used as is).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GroupSpec {
    Gid(u32),
    Name(String),
}

impl std::str::FromStr for GroupSpec {
    type Err = Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Infallible> {
        Ok(match s.parse::<u32>() {
            Ok(gid) => GroupSpec::Gid(gid),
            Err(_) => GroupSpec::Name(s.to_owned()),
        })
    }
}

impl std::fmt::Display for GroupSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupSpec::Gid(g) => write!(f, "{g}"),
            GroupSpec::Name(n) => f.write_str(n),
        }
    }
}

impl GroupSpec {
    /// The numeric gid; a name must exist in the group database.
    pub fn resolve(&self) -> Result<u32> {
        match self {
            GroupSpec::Gid(g) => Ok(*g),
            GroupSpec::Name(name) => match nix::unistd::Group::from_name(name) {
                Ok(Some(g)) => Ok(g.gid.as_raw()),
                _ => Err(Error::UnknownGroup {
                    group: name.clone(),
                }),
            },
        }
    }
}

/// The `[status]` table of the agent's TOML config; every key optional,
/// defaults as in [`SocketSettings::default`]. Timeouts are not
/// configurable: they bound misbehaving clients, not operators.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StatusConfig {
    /// Socket path (`/run/deploy-agent/agent.sock`).
    pub socket: Option<PathBuf>,
    /// Socket mode: a TOML octal literal (`0o660`) or an octal string
    /// (`"0660"`, `"660"`), at most `0o777` (no setuid/setgid/sticky bits).
    /// `Config::parse` also refuses a decimal literal such as `660`.
    #[serde(deserialize_with = "socket_mode")]
    pub socket_mode: Option<u32>,
    /// Group owning the socket: who may connect and read status.
    pub socket_group: Option<GroupSpec>,
    /// Group whose members may hold/resume/rollback/redeploy.
    pub operator_group: Option<GroupSpec>,
    /// Connections served at once (16).
    pub max_clients: Option<usize>,
}

/// The largest socket mode: permission bits only.
pub const MAX_SOCKET_MODE: u32 = 0o777;

/// Parses an octal mode string: `660`, `0660` or `0o660`.
pub fn parse_octal_mode(s: &str) -> std::result::Result<u32, String> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!(
            "{s:?} is not an octal mode (write e.g. \"0660\" or 0o660)"
        ));
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|e| format!("{s:?}: {e}"))?;
    check_mode(mode)
}

fn check_mode(mode: u32) -> std::result::Result<u32, String> {
    if mode > MAX_SOCKET_MODE {
        return Err(format!(
            "0o{mode:o} is above 0o777: a socket mode has permission bits only"
        ));
    }
    Ok(mode)
}

fn socket_mode<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Text(String),
    }
    let mode = match Raw::deserialize(d)? {
        Raw::Int(n) => u32::try_from(n)
            .map_err(|_| format!("{n} is not a file mode"))
            .and_then(check_mode),
        Raw::Text(t) => parse_octal_mode(&t),
    };
    mode.map(Some).map_err(serde::de::Error::custom)
}
