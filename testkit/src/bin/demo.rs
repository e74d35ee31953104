//! The demo: `cargo run --release -p testkit --bin demo -- [--dir D]
//! [--size tiny|demo|small|full] [--format tar|tar.gz|tar.zst] [--store http|s3] [--keep]`.
//!
//! Runs the whole job end to end on this machine with in-process servers
//! (see `testkit::demo`). It lives in the test kit, not in the packaged
//! `deploy-agent`, because it embeds the test servers. A crash leaves only
//! the demo's directory behind.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use deploy_agent::exit;
use deploy_agent::manifest::Format;
use testkit::buildgen::BuildProfile;
use testkit::demo::{DemoOptions, DemoStore};

#[derive(Debug, Parser)]
#[command(
    name = "demo",
    about = "The whole deploy-agent job end to end on this machine, with in-process Consul and artifact servers."
)]
struct Cli {
    /// Keep the deploy root and artifacts here instead of a temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Build size: tiny, demo, small (~4,000 files) or full (~40,000 files).
    #[arg(long, value_enum, default_value = "demo")]
    size: Size,
    /// Archive format.
    #[arg(long, value_enum, default_value = "tar.gz")]
    format: ArchiveFormat,
    /// Serve the builds from the artifact HTTP server or from the
    /// S3-compatible test server (s3:// URLs, signed requests).
    #[arg(long, value_enum, default_value = "http")]
    store: Store,
    /// Keep the servers and the agent running afterwards (until Ctrl-C)
    /// and print the `fleet serve` command that shows them in a browser.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Size {
    Tiny,
    Demo,
    Small,
    Full,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Store {
    Http,
    S3,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ArchiveFormat {
    #[value(name = "tar")]
    Tar,
    #[value(name = "tar.gz")]
    TarGz,
    #[value(name = "tar.zst")]
    TarZst,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("DEPLOY_AGENT_LOG").is_some() {
        let _ = deploy_agent::logging::init(deploy_agent::logging::LogFormat::Auto);
    }
    let profile = match cli.size {
        Size::Tiny => BuildProfile::TINY,
        Size::Demo => BuildProfile::DEMO,
        Size::Small => BuildProfile::SMALL,
        Size::Full => BuildProfile::FULL,
    };
    let format = match cli.format {
        ArchiveFormat::Tar => Format::Tar,
        ArchiveFormat::TarGz => Format::TarGz,
        ArchiveFormat::TarZst => Format::TarZst,
    };
    let opts = DemoOptions {
        dir: cli.dir,
        profile,
        format,
    };
    let store = match cli.store {
        Store::Http => DemoStore::Http,
        Store::S3 => DemoStore::S3,
    };
    let mut out = std::io::stdout();
    let result = if cli.keep {
        let until = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        testkit::demo::run_and_keep_on(store, opts, &mut out, until)
            .await
            .map(|_| ())
    } else {
        testkit::demo::run_on(store, opts, &mut out)
            .await
            .map(|_| ())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}
