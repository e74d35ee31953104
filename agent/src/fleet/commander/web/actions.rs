//! The fleet page's controls: promote to the next step, rollback, freeze,
//! unfreeze. Each is the CLI's own write from [`crate::fleet::commander::release`]
//! (`promoted` / `rolled_back` + `write`, `freeze`, `unfreeze_at`), with
//! check-and-set on the ModifyIndex the page showed when the commander
//! confirmed: if anyone changed the key since, nothing is written and the
//! page shows the conflict.
//!
//! Each control is one Consul write; if the process dies, the key holds the
//! old or the new value, never a mix, exactly as with the CLI.

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::fleet::commander::release::Release;
use crate::fleet::commander::web::feed::{cli_prefix, quote, STEPS};

/// What the page posts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub tier: String,
    pub action: ActionKind,
    /// The ModifyIndex of the key the action writes, as the page showed it
    /// (0 for the freeze key when it was absent).
    pub expected_index: u64,
    /// The build the confirmation named.
    pub build: Option<String>,
    /// The percentage the confirmation named (promote).
    pub percent: Option<f64>,
    /// The freeze reason.
    pub reason: Option<String>,
}

/// The four controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    Promote,
    Rollback,
    Freeze,
    Unfreeze,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Promote => "promote",
            ActionKind::Rollback => "rollback",
            ActionKind::Freeze => "freeze",
            ActionKind::Unfreeze => "unfreeze",
        }
    }
}

/// What the page shows after a control went through.
#[derive(Debug, Clone, Serialize)]
pub struct ActionOutcome {
    pub message: String,
    /// The CLI command that does the same.
    pub cli: String,
    /// The key's new ModifyIndex (none after an unfreeze).
    pub modify_index: Option<u64>,
}

fn conflict(key: &str, expected: u64) -> Error {
    Error::ReleaseConflict {
        key: key.to_string(),
        expected,
    }
}

/// Applies one control with the server's own Consul client (and token).
/// `release` names the tier key and the freeze key; `by` is who the freeze
/// record names.
pub async fn apply(
    release: &Release,
    app: &str,
    req: &ActionRequest,
    by: &str,
) -> Result<ActionOutcome> {
    let consul = release.client.address().to_string();
    let res = apply_inner(release, &consul, app, req, by).await;
    match &res {
        Ok(o) => info!(
            tier = %req.tier,
            action = req.action.as_str(),
            expected_index = req.expected_index,
            modify_index = ?o.modify_index,
            by,
            "fleet page: control applied"
        ),
        Err(e) => warn!(
            tier = %req.tier,
            action = req.action.as_str(),
            expected_index = req.expected_index,
            by,
            error = %e,
            "fleet page: control refused"
        ),
    }
    res
}

async fn apply_inner(
    release: &Release,
    consul: &str,
    app: &str,
    req: &ActionRequest,
    by: &str,
) -> Result<ActionOutcome> {
    match req.action {
        ActionKind::Promote | ActionKind::Rollback => {
            rewrite_tier(release, &cli_prefix(consul, app, Some(&req.tier)), req).await
        }
        ActionKind::Freeze => freeze(release, consul, app, req, by).await,
        ActionKind::Unfreeze => unfreeze(release, consul, app, req).await,
    }
}

/// Promote or rollback: the CLI's rewrite of the tier key, written only if
/// the key is still at the index the page showed.
async fn rewrite_tier(release: &Release, cli: &str, req: &ActionRequest) -> Result<ActionOutcome> {
    let cur = release.read().await?.ok_or_else(|| Error::ReleaseMissing {
        key: release.key.clone(),
    })?;
    // The page's index, not the one just read: a change since the
    // commander confirmed is a conflict, not a silent rebase.
    if cur.modify_index != req.expected_index {
        return Err(conflict(&release.key, req.expected_index));
    }
    if req
        .build
        .as_ref()
        .is_some_and(|b| *b != cur.manifest.spec.build)
        && req.action == ActionKind::Promote
    {
        return Err(conflict(&release.key, req.expected_index));
    }
    let (value, cli, what) = if req.action == ActionKind::Promote {
        let p = req.percent.filter(|p| STEPS.contains(p)).ok_or_else(|| {
            Error::ReleaseInvalid {
                key: release.key.clone(),
                reason: format!(
                    "the page promotes through {STEPS:?} percent only; use `release promote --percent N` for other values"
                ),
            }
        })?;
        (
            release.promoted(&cur, p)?,
            format!("{cli} promote --percent {p}"),
            format!("promoted {} to {p}%", cur.manifest.spec.build),
        )
    } else {
        let to = cur
            .manifest
            .previous
            .as_ref()
            .map(|p| p.build.clone())
            .unwrap_or_default();
        (
            release.rolled_back(&cur)?,
            format!("{cli} rollback"),
            format!("rolled back from {} to {to}", cur.manifest.spec.build),
        )
    };
    let i = release.write(&value, req.expected_index).await?;
    Ok(ActionOutcome {
        message: format!("{}: {what} (index {i})", release.key),
        cli,
        modify_index: Some(i),
    })
}

/// Creates the freeze key, if the page saw none.
async fn freeze(
    release: &Release,
    consul: &str,
    app: &str,
    req: &ActionRequest,
    by: &str,
) -> Result<ActionOutcome> {
    if req.expected_index != 0 {
        // The page saw a freeze: nothing to create.
        return Err(conflict(&release.freeze_key, req.expected_index));
    }
    let reason = req
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .unwrap_or("frozen by the deploy commander from the fleet page");
    // Create-only (cas=0), like the CLI: a freeze someone else set
    // meanwhile is reported, not overwritten.
    release.freeze(reason, by).await?;
    Ok(ActionOutcome {
        message: format!(
            "{} set: no host of {app} starts a new deploy until unfreeze",
            release.freeze_key
        ),
        cli: format!(
            "{} freeze --reason {}",
            cli_prefix(consul, app, None),
            quote(reason)
        ),
        modify_index: None,
    })
}

/// Deletes the freeze key, if it is still the one the page saw.
async fn unfreeze(
    release: &Release,
    consul: &str,
    app: &str,
    req: &ActionRequest,
) -> Result<ActionOutcome> {
    if req.expected_index == 0 {
        return Err(Error::ReleaseInvalid {
            key: release.freeze_key.clone(),
            reason: "the page saw no freeze to lift; reload it".into(),
        });
    }
    release.unfreeze_at(req.expected_index).await?;
    Ok(ActionOutcome {
        message: format!("{} removed: hosts resume", release.freeze_key),
        cli: format!("{} unfreeze", cli_prefix(consul, app, None)),
        modify_index: None,
    })
}
