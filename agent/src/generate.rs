//! `deploy-agent generate man|completions DIR` (hidden): writes the man
//! pages and shell completions the Debian package ships, rendered from the
//! same clap definitions the binary parses, so they cannot drift from it.
//! Only the packaging step runs it (debian/build-deb.sh), never the agent.
//!
//! Each file is written whole with `std::fs::write`; if the process dies
//! midway, rerun it (the package build always does).

use std::io;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

/// What to write.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    /// `deploy-agent.8` plus `deploy-agent-<command>.8` per visible command.
    Man,
    /// `deploy-agent.bash`, `_deploy-agent` (zsh) and `deploy-agent.fish`.
    Completions,
}

/// Writes `what` into `dir` (created if missing).
pub fn write(what: What, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = crate::Cli::command();
    cmd.build();
    match what {
        What::Man => man(&cmd, dir),
        What::Completions => {
            for (shell, file) in [
                (Shell::Bash, "deploy-agent.bash"),
                (Shell::Zsh, "_deploy-agent"),
                (Shell::Fish, "deploy-agent.fish"),
            ] {
                let mut out = Vec::new();
                clap_complete::generate(shell, &mut cmd, "deploy-agent", &mut out);
                std::fs::write(dir.join(file), out)?;
            }
            Ok(())
        }
    }
}

/// Section 8 (system administration): the agent is a root daemon. After
/// `Command::build`, clap names each subcommand `deploy-agent-<command>`
/// (its display name), which is the page's title and file name.
fn man(cmd: &clap::Command, dir: &Path) -> io::Result<()> {
    let title = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("deploy-agent")
        .render(&mut out)?;
    std::fs::write(dir.join(format!("{title}.8")), out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() != "help" {
            man(sub, dir)?;
        }
    }
    Ok(())
}
