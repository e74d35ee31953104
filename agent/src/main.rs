//! The `deploy-agent` binary: parses the command line, sets up logging and
//! calls into the library. Holds no state of its own, so a crash here is a
//! crash of the library call it was in, covered by that module's guarantees.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use deploy_agent::config::{Config, DEFAULT_PATH};
use deploy_agent::logging::LogFormat;
use deploy_agent::say;
use deploy_agent::status::OperatorCommand;
use tokio_util::sync::CancellationToken;

mod generate;

/// `deploy-agent --version`: the crate version, the commit and the build
/// date (agent/build.rs; `unknown` commit outside a git checkout).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("DEPLOY_AGENT_COMMIT"),
    ", built ",
    env!("DEPLOY_AGENT_BUILD_DATE"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "deploy-agent",
    version = VERSION,
    about = "Keeps this host on the build its Consul key names."
)]
struct Cli {
    /// Log format: auto (plain key=value under systemd, human otherwise), text or json.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent (the systemd service's command).
    Run {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate a config file and print what it resolves to.
    CheckConfig {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Create a manifest signing key pair (release engineers): the private
    /// key goes to --out (mode 0600), the public key to <out>.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a manifest (a file, or - for stdin) with a private key from
    /// keygen; prints the signed manifest.
    Sign {
        #[arg(long)]
        key: PathBuf,
        manifest: PathBuf,
    },
    #[command(flatten)]
    Operator(OperatorCommand),
    /// The deploy commander's release commands (publish, promote, rollback, freeze).
    Release(deploy_agent::fleet::commander::cli::ReleaseCommand),
    /// The fleet as the hosts report it.
    Fleet(deploy_agent::fleet::commander::cli::FleetCommand),
    /// Packaging only: write the man pages or shell completions into DIR.
    #[command(hide = true)]
    Generate { what: generate::What, dir: PathBuf },
}

/// Exit codes of `run` and `check-config`, from the binary's one
/// table (docs/operating.md, Exit codes): 1 runtime failure, 2 bad config or usage.
mod exit {
    pub const RUNTIME: u8 = deploy_agent::exit::FAILURE;
    pub const CONFIG: u8 = deploy_agent::exit::USAGE;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Operator(cmd) => {
            let code = deploy_agent::status::run_cli(cmd);
            ExitCode::from(u8::try_from(code).unwrap_or(exit::RUNTIME))
        }
        Cmd::Keygen { out } => keygen(&out),
        Cmd::Sign { key, manifest } => sign(&key, &manifest),
        Cmd::Generate { what, dir } => match generate::write(what, &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}: {e}", dir.display());
                ExitCode::from(exit::RUNTIME)
            }
        },
        Cmd::Release(cmd) => ExitCode::from(deploy_agent::fleet::commander::cli::run_release(cmd)),
        Cmd::Fleet(cmd) => fleet(cmd, cli.log_format),
        Cmd::CheckConfig { config } => check_config(&config),
        Cmd::Run { config } => run(config, cli.log_format),
    }
}

/// `deploy-agent keygen`: writes the pair and prints the config lines that
/// trust it.
fn keygen(out: &Path) -> ExitCode {
    match deploy_agent::sign::keygen(out) {
        Ok((public, id)) => {
            say!("private key: {} (mode 0600; keep it secret)", out.display());
            say!("public key:  {}.pub", out.display());
            say!("key id:      {id}");
            say!("\nadd to the agents' config:\n[signing]\npublic-keys = [\"{public}\"]");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit::RUNTIME)
        }
    }
}

/// `deploy-agent sign`: prints the manifest (a file, or `-` for stdin)
/// signed with the private key.
fn sign(key: &Path, manifest: &Path) -> ExitCode {
    let bytes = if manifest.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b).map(|_| b)
    } else {
        std::fs::read(manifest)
    };
    let signed = bytes
        .map_err(|e| deploy_agent::Error::io(manifest, e))
        .and_then(|b| {
            let k = deploy_agent::sign::load_private_key(key)?;
            deploy_agent::sign::sign(&b, &k)
        });
    match signed {
        Ok(text) => {
            say!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit::CONFIG)
        }
    }
}

/// `deploy-agent fleet ...`; `fleet serve` logs like the agent.
fn fleet(
    cmd: deploy_agent::fleet::commander::cli::FleetCommand,
    log_format: LogFormat,
) -> ExitCode {
    if matches!(
        cmd.action,
        deploy_agent::fleet::commander::cli::FleetAction::Serve(_)
    ) {
        // A long-running server: log like the agent does.
        if let Err(e) = deploy_agent::logging::init(log_format) {
            eprintln!("error: cannot set up logging: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    }
    ExitCode::from(deploy_agent::fleet::commander::cli::run_fleet(cmd))
}

/// `deploy-agent check-config`: the same `Config::load` as `run` (parse,
/// value rules, group lookups, Consul settings with the CONSUL_HTTP_*
/// overrides), then what the file resolves to.
fn check_config(config: &Path) -> ExitCode {
    let c = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    say!("{}: ok", config.display());
    say!("  deploy root: {}", c.deploy_root.display());
    if let Some(line) = source_line(&c) {
        say!("  source: {line}");
    }
    say!("  status socket: {}", socket_line(&c));
    say!("  cache: {}", c.cache_dir().display());
    say!("  health gate: {}", health_line(&c));
    match store_line(&c) {
        Ok(line) => say!("  object store (s3:// URLs): {line}"),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    }
    say!(
        "  signed manifests: {}",
        match c.signing.public_keys.len() {
            0 => "not required".to_string(),
            n => format!("required ({n} trusted key(s))"),
        }
    );
    ExitCode::SUCCESS
}

/// The store `s3://` URLs go to, and which credential source the chain
/// picked on this host (never a secret). Fails like `run` would on a key
/// file others can read.
fn store_line(c: &Config) -> Result<String, deploy_agent::Error> {
    let store = deploy_agent::store::Store::from_config(&c.store, reqwest::Client::new())?;
    store.check()?;
    let s = store.settings();
    Ok(format!(
        "endpoint {}, region {}, {} style, credentials from {}",
        s.endpoint,
        s.region,
        if s.path_style { "path" } else { "virtual-host" },
        s.source
    ))
}

/// Where the desired state comes from: a Consul key (at the address the
/// environment resolves) or a file.
fn source_line(c: &Config) -> Option<String> {
    match (&c.source.key, &c.source.file) {
        (Some(k), _) => {
            // load() already resolved these once; this cannot
            // fail differently unless the environment changed.
            let address = deploy_agent::config::consul_settings(c)
                .map(|s| s.address)
                .unwrap_or_else(|_| c.consul.address.clone());
            Some(format!("consul key {k} at {address}"))
        }
        (_, Some(f)) => Some(format!("file {}", f.display())),
        _ => None,
    }
}

/// The status socket's path, mode and who may use it.
fn socket_line(c: &Config) -> String {
    let socket = deploy_agent::status::SocketSettings::from(c.status.clone());
    format!(
        "{} mode 0o{:o}{}{}",
        socket.path.display(),
        socket.mode,
        socket
            .group
            .as_ref()
            .map(|g| format!(" group {g}"))
            .unwrap_or_default(),
        socket
            .operator_group
            .as_ref()
            .map(|g| format!(", operator group {g}"))
            .unwrap_or_else(|| ", operators: root and the agent's user".into()),
    )
}

/// The health gate: URL and/or command, and its window.
fn health_line(c: &Config) -> String {
    match (&c.health.url, &c.health.command) {
        (None, None) => "none".to_string(),
        (url, cmd) => format!(
            "{}{}, window {}",
            url.as_deref()
                .map(|u| format!("GET {u} "))
                .unwrap_or_default(),
            cmd.as_ref()
                .map(|a| format!("command {a:?}"))
                .unwrap_or_default(),
            deploy_agent::clock::human_duration(c.health.window)
        ),
    }
}

/// `deploy-agent run`: checks the config once before anything starts, then
/// runs the daemon until SIGTERM or SIGINT.
fn run(config: PathBuf, log_format: LogFormat) -> ExitCode {
    deploy_agent::deploy::pipeline::limit_malloc_arenas();
    if let Err(e) = deploy_agent::logging::init(log_format) {
        eprintln!("error: cannot set up logging: {e}");
        return ExitCode::from(exit::RUNTIME);
    }
    if let Err(e) = Config::load(&config) {
        eprintln!("error: {e}");
        return ExitCode::from(exit::CONFIG);
    }
    runtime_block(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        deploy_agent::daemon::run_with_reload(config, shutdown).await
    })
}

/// Cancels `shutdown` at the first SIGTERM or SIGINT; the daemon stops at
/// its next safe point.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping at the next safe point");
    shutdown.cancel();
}

fn runtime_block(fut: impl std::future::Future<Output = deploy_agent::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit::RUNTIME)
        }
    }
}
