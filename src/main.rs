//! The `riskd` command: parse arguments, load the config, call the library.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use riskd::config::{Config, Stream};
use riskd::telemetry::{init_logging, LogFormat};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "riskd", version, about = "Stream-processing UEBA risk scorer")]
struct Cli {
    /// Log format on stderr (level from RUST_LOG, default warn).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score events: read the source, apply every rule, write alerts.
    Run {
        /// Service config.
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
        /// JSON-lines input instead of the configured source (`-` = stdin).
        #[arg(long)]
        input: Option<String>,
        /// Alert output instead of the configured sink (`-` = stdout).
        #[arg(long)]
        alerts: Option<String>,
    },
    /// Validate the config and every rule file; list every error.
    Check {
        /// Service config.
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
    },
    /// Explain an entity: its risk score, contributions and every rule's state.
    Entity {
        /// Entity type (user, ip, role, principal, …).
        entity_type: String,
        /// Entity id.
        id: String,
        /// Service config (names the store and the rules).
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Look at the state store.
    State {
        /// Service config (names the store).
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: StateAction,
    },
    /// Set up or verify the state store (the DynamoDB table and its TTL).
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// Write a synthetic CloudTrail/Okta stream with planted attacks to stdout.
    Generate {
        /// Number of events.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Number of distinct users.
        #[arg(long, default_value_t = 10_000)]
        users: u32,
        /// Seed: the same seed gives the same stream.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// One event in this many starts a planted attack (0: none).
        #[arg(long, default_value_t = 5000)]
        attack_every: u64,
    },
}

#[derive(Subcommand)]
enum StateAction {
    /// Every record as a JSON line: key, values, expiry.
    Export,
}

#[derive(Subcommand)]
enum StoreAction {
    /// Create the table (on-demand, hash key `key`) and enable TTL on
    /// `expiresAt`; a table already set up is left as it is.
    Init {
        /// Service config (names the store).
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
    },
    /// Verify the table's key schema and TTL; exit non-zero, saying what is
    /// wrong, when they do not fit riskd.
    Check {
        /// Service config (names the store).
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
    },
}

fn stream(text: &str) -> Stream {
    Stream::parse(text, Path::new(""))
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(anyhow::Error::from)
}

/// Runs store work on a blocking thread: the DynamoDB store blocks on a
/// runtime of its own, which cannot happen on an async worker.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await.context("store task failed")?
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, input, alerts } => {
            let cfg = load(&config)?;
            let opts = riskd::RunOptions { input: input.as_deref().map(stream), alerts: alerts.as_deref().map(stream) };
            let summary = riskd::run(cfg, opts, shutdown_signal()).await?;
            eprintln!("{summary}");
        }
        Command::Check { config } => {
            let cfg = load(&config)?;
            println!("{}: ok, {} rules", config.display(), cfg.rules.len());
        }
        Command::Entity { entity_type, id, config, json } => {
            let cfg = load(&config)?;
            let text = blocking(move || {
                let store = riskd::pipeline::open_store(&cfg.store).context("opening the store")?;
                let entity = riskd::rules::EntityRef { type_: entity_type, id };
                let x = riskd::scoring::explain_entity(&cfg.rules, &cfg.scoring, store.as_ref(), &entity)
                    .context("reading the entity's state")?;
                Ok(if json { format!("{x:#}\n") } else { riskd::scoring::render_explanation(&x) })
            })
            .await?;
            print!("{text}");
        }
        Command::State { config, action: StateAction::Export } => {
            let cfg = load(&config)?;
            blocking(move || {
                let store = riskd::pipeline::open_store(&cfg.store).context("opening the store")?;
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                riskd::state::export(store.as_ref(), &mut out).context("exporting state")?;
                Ok(())
            })
            .await?;
        }
        Command::Store { action: StoreAction::Init { config } } => {
            let cfg = load(&config)?;
            let done = blocking(move || Ok(riskd::pipeline::init_store(&cfg.store)?)).await?;
            for line in done {
                println!("{line}");
            }
        }
        Command::Store { action: StoreAction::Check { config } } => {
            let cfg = load(&config)?;
            let problems = blocking(move || Ok(riskd::pipeline::check_store(&cfg.store)?)).await?;
            if !problems.is_empty() {
                anyhow::bail!("{}: the store does not fit riskd:\n  {}", config.display(), problems.join("\n  "));
            }
            println!("{}: store ok", config.display());
        }
        Command::Generate { events, users, seed, attack_every } => {
            let spec = riskd::generate::Spec { events, users, seed, attack_every, ..Default::default() };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            riskd::generate::write_stream(&spec, &mut out).context("writing events")?;
            std::io::Write::flush(&mut out)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("riskd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_inner(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("riskd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
