//! Stamps the binary with what `deploy-agent --version` prints: the git
//! commit it was built from and the build date (UTC).
//!
//! - Commit: `git rev-parse --short=12 HEAD` (uncommitted edits are not
//!   tracked: watching them would rebuild on every save); `unknown` when
//!   there is no git or no repository (a source tarball), or
//!   `DEPLOY_AGENT_COMMIT` when set (a packager building from a tarball can
//!   pass the commit it came from).
//! - Date: `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.
//!
//! Writes nothing but cargo's own output: if the build dies midway, the
//! next build runs this again from scratch.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-env-changed=DEPLOY_AGENT_COMMIT");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let commit = std::env::var("DEPLOY_AGENT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git_commit(Path::new(&dir)))
        .unwrap_or_else(|| "unknown".into());
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
    println!("cargo:rustc-env=DEPLOY_AGENT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=DEPLOY_AGENT_BUILD_DATE={}",
        civil_date(secs)
    );
}

/// The short commit, or `None` outside a git checkout. Also tells cargo to
/// run this again when HEAD moves (the files it reads live in the git dir).
fn git_commit(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // Only this repository's own git: a source tarball unpacked inside
    // some other checkout must not report that checkout's commit.
    if !dir.parent().is_some_and(|w| w.join(".git").exists()) {
        return None;
    }
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // HEAD itself, the branch it names and packed-refs: a commit, a
    // checkout or a gc changes one of them. Nothing is printed when git
    // fails, so cargo's default (rerun when the package changes) applies.
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(p) = git(&["rev-parse", "--git-path", &name]) {
            let p = if Path::new(&p).is_absolute() {
                p
            } else {
                dir.join(p).display().to_string()
            };
            // A path that does not exist would make cargo rerun this on
            // every build (and so rebuild the crate): watch only real files.
            if Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    Some(commit)
}

/// `YYYY-MM-DD` (UTC) of a unix time (Howard Hinnant's days-to-civil).
fn civil_date(secs: i64) -> String {
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
