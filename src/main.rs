//! The `riskd` command: parse arguments, load the config, call the library.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use riskd::config::{Config, Stream};
use riskd::telemetry::{init_logging, LogFormat};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Events are decoded on one thread and dropped on another: mimalloc frees
/// across threads without the lock contention of the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// At the end of the input file, wait for more lines (as `tail -f`)
        /// until Ctrl-C or SIGTERM, serving `/metrics` and the API meanwhile
        /// (`source.follow = true` for this run).
        #[arg(long)]
        follow: bool,
    },
    /// Re-key raw Kafka events by entity: consume `kafka.topics`, produce
    /// each event to `<kafka.route_prefix><entity type>` keyed by entity id.
    Route {
        /// Service config.
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
    },
    /// Validate the config and every rule file; list every error, then warnings.
    Check {
        /// Service config.
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
        /// JSON-lines sample events: warn about fields no sample has.
        #[arg(long)]
        sample: Option<PathBuf>,
    },
    /// Run rule tests (`*.test.yaml`) on the real engine with an in-memory store.
    Test {
        /// Test files or folders; default: the config's rule paths.
        paths: Vec<PathBuf>,
        /// Service config (names the rules).
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
    },
    /// Backtest: run the rules over recorded events on a throw-away store and report per rule.
    Replay {
        /// Service config (names the rules; its store is never touched).
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
        /// JSON-lines events.
        #[arg(long)]
        input: PathBuf,
        /// Override a rule setting, e.g. `rules.aws_access_denied_burst.threshold=15` (repeatable).
        #[arg(long = "set", value_name = "rules.ID.KEY=VALUE")]
        set: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Explain an entity: its risk score, peak, last crossing, whether it is
    /// armed, its contributions and every rule's state. Exits non-zero when
    /// the store holds nothing for it.
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
        /// Score at this event time (RFC 3339, e.g. 2024-03-01T10:05:00Z)
        /// instead of the latest seen.
        #[arg(long, value_name = "TIME", value_parser = event_time)]
        at: Option<i64>,
    },
    /// List the riskiest entities: by score at the latest event time seen
    /// (or `--at`), highest first, each with its largest contributions.
    /// Asks the riskd running on this config first (its index, at once);
    /// without one, or with `--at`, reads every risk key of the store once.
    Entities {
        /// Service config (names the store).
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
        /// Only entities of this type (user, ip, role, principal, …).
        #[arg(long = "type", value_name = "TYPE")]
        entity_type: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// Only entities scoring at least this.
        #[arg(long, default_value_t = 0.0)]
        min_score: f64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Score at this event time (RFC 3339) instead of the latest seen.
        #[arg(long, value_name = "TIME", value_parser = event_time)]
        at: Option<i64>,
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum StateAction {
    /// One key: its values, expiry and whether it is live.
    Get {
        /// The key.
        key: String,
    },
    /// Keys (with a prefix), a line each: values and expiry.
    List {
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Remove one key.
    Delete {
        /// The key.
        key: String,
        /// Really do it.
        #[arg(long)]
        yes: bool,
    },
    /// Every record as a JSON line: key, values, expiry.
    Export,
    /// Write records from a JSON-lines file in the export format.
    Import {
        /// The file (`-` = stdin).
        file: String,
        /// Really do it.
        #[arg(long)]
        yes: bool,
    },
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
    /// Delete the DynamoDB commit markers no item needs any more (safe while
    /// riskd runs).
    Prune {
        /// Service config (names the store).
        #[arg(long, default_value = "config/riskd.toml")]
        config: PathBuf,
        /// Leave markers that committed more recently than this.
        #[arg(long, default_value = "1h")]
        idle: humantime::Duration,
    },
}

/// A time read as event times are (RFC 3339, or epoch seconds or milliseconds).
fn event_time(text: &str) -> Result<i64, String> {
    riskd::event::parse_time_ms(&serde_json::Value::from(text))
        .ok_or_else(|| format!("{text:?} is not a time: give RFC 3339, e.g. 2024-03-01T10:05:00Z"))
}

/// The listing of the riskd running on `cfg` (`GET /v1/entities` on its
/// telemetry listener, with `RISKD_API_TOKEN` when set), if one answers.
fn running_listing(
    cfg: &riskd::config::Config,
    entity_type: Option<&str>,
    top: usize,
    min_score: f64,
) -> Option<(std::net::SocketAddr, riskd::scoring::Listing)> {
    let mut addr = cfg.listen?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut url = format!("http://{addr}/v1/entities?top={}&min_score={min_score}", top.max(1));
    if let Some(t) = entity_type {
        url += &format!("&type={}", percent_encoding::utf8_percent_encode(t, percent_encoding::NON_ALPHANUMERIC));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(3)))
        .build()
        .into();
    let mut request = agent.get(&url);
    if let Some(token) = std::env::var(riskd::TOKEN_ENV).ok().filter(|t| !t.is_empty()) {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut answer = request.call().ok()?;
    if answer.status() != 200 {
        return None;
    }
    let body = answer.body_mut().read_to_string().ok()?;
    Some((addr, serde_json::from_str(&body).ok()?))
}

fn stream(text: &str) -> Stream {
    Stream::parse(text, Path::new(""))
}

fn load(path: &Path) -> anyhow::Result<Config> {
    readable(path)?;
    Config::load(path).map_err(anyhow::Error::from)
}

/// A config file that cannot be read is not an invalid one: say which and why.
fn readable(path: &Path) -> anyhow::Result<()> {
    match std::fs::read(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("cannot read the config file {}: {e}; name it with --config FILE", path.display())
        }
        Err(e) => anyhow::bail!("cannot read the config file {}: {e}", path.display()),
    }
}

/// An error and its causes, each said once: a message that already holds
/// its cause's text is not followed by it again.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Runs store work on a blocking thread: the DynamoDB store blocks on a
/// runtime of its own, which cannot happen on an async worker.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await.context("store task failed")?
}

/// `riskd state …`, on a blocking thread (stores may block on a runtime of their own).
fn state_command(cfg: &Config, action: StateAction) -> anyhow::Result<()> {
    let mut store = riskd::state::open_store(&cfg.store).context("opening the store")?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match action {
        StateAction::Export => {
            riskd::state::export(store.as_ref(), &mut out).context("exporting state")?;
        }
        StateAction::Get { key } => {
            let record = store.get_many(&[&key])?.pop().flatten();
            anyhow::ensure!(
                record.is_some(),
                "no key {key:?} in the {} store (`riskd state list --prefix PREFIX` lists the keys there are)",
                store.kind()
            );
            let now = riskd::state::watermark(store.as_ref())?;
            let view = riskd::state::describe(&key, record.as_ref(), now);
            std::io::Write::write_all(&mut out, format!("{view:#}\n").as_bytes())?;
        }
        StateAction::List { prefix } => {
            let now = riskd::state::watermark(store.as_ref())?;
            let mut lines = Vec::new();
            store.scan(&prefix, &mut |key, record| lines.push(riskd::state::summarize(key, record, now)))?;
            for l in lines {
                std::io::Write::write_all(&mut out, format!("{l}\n").as_bytes())?;
            }
        }
        StateAction::Delete { key, yes } => {
            anyhow::ensure!(yes, "deleting {key:?} changes the store: add --yes");
            anyhow::ensure!(store.get_many(&[&key])?.pop().flatten().is_some(), "no key {key:?}");
            store.apply(riskd::state::WriteBatch {
                mutations: vec![(key.as_str(), riskd::state::Mutation::Delete)],
                checkpoints: Vec::new(),
            })?;
            eprintln!("deleted {key}");
        }
        StateAction::Import { file, yes } => {
            anyhow::ensure!(yes, "importing changes the store: add --yes");
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let n = riskd::state::import(store.as_mut(), &text).context("importing")?;
            eprintln!("imported {n} records");
        }
    }
    std::io::Write::flush(&mut out)?;
    Ok(())
}

/// `riskd store …`.
async fn store_command(action: StoreAction) -> anyhow::Result<()> {
    match action {
        StoreAction::Init { config } => {
            let cfg = load(&config)?;
            let done = blocking(move || Ok(riskd::state::init_store(&cfg.store)?)).await?;
            for line in done {
                println!("{line}");
            }
        }
        StoreAction::Check { config } => {
            let cfg = load(&config)?;
            let problems = blocking(move || Ok(riskd::state::check_store(&cfg.store)?)).await?;
            if !problems.is_empty() {
                anyhow::bail!("{}: the store does not fit riskd:\n  {}", config.display(), problems.join("\n  "));
            }
            println!("{}: store ok", config.display());
        }
        StoreAction::Prune { config, idle } => {
            let cfg = load(&config)?;
            let done = blocking(move || Ok(riskd::state::prune_store(&cfg.store, idle.into())?)).await?;
            for line in done {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// `riskd check`: the config loads (every error reported by the loader), then warnings.
fn check_command(config: &Path, sample: Option<&Path>) -> anyhow::Result<()> {
    let cfg = load(config)?;
    println!("{}: ok, {} rules", config.display(), cfg.rules.len());
    if !cfg.sigma_paths.is_empty() {
        let loaded: usize = cfg.sigma.loaded.values().sum();
        let by: Vec<String> = cfg.sigma.loaded.iter().map(|(l, n)| format!("{l} {n}")).collect();
        println!("Sigma rules: {loaded} loaded ({}), {} skipped", by.join(", "), cfg.sigma.skipped.len());
        for s in &cfg.sigma.skipped {
            println!("  skipped {s}");
        }
    }
    let samples = match sample {
        None => Vec::new(),
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
    };
    let mut warnings = riskd::tuning::check::warnings(&cfg.rules, &samples);
    if let Some(k) = cfg.kafka.as_ref().filter(|_| cfg.from_kafka) {
        warnings.extend(k.key_warnings(&cfg.rules));
    }
    if !warnings.is_empty() {
        println!("warnings ({}):", warnings.len());
        for w in warnings {
            println!("  {w}");
        }
    }
    Ok(())
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.command, Command::Run { .. } | Command::Route { .. }) {
        init_logging(cli.log_format, "warn");
    }
    match cli.command {
        Command::Run { config, input, alerts, follow } => {
            let mut cfg = load(&config)?;
            if follow {
                anyhow::ensure!(
                    !cfg.from_kafka,
                    "--follow follows a file; a Kafka source is read until stopped anyway"
                );
                anyhow::ensure!(
                    input.as_deref() != Some("-"),
                    "--follow follows a file; standard input is read until it closes anyway"
                );
                cfg.follow = true;
            }
            init_logging(cli.log_format, &cfg.log_level);
            let opts = riskd::RunOptions {
                input: input.as_deref().map(stream),
                alerts: alerts.as_deref().map(stream),
                watch: true,
                reloads: None,
            };
            let summary = riskd::service::run(cfg, opts, riskd::service::signal()).await?;
            eprintln!("{summary}");
        }
        Command::Route { config } => {
            let cfg = load(&config)?;
            init_logging(cli.log_format, &cfg.log_level);
            let summary = riskd::service::route(cfg, riskd::service::signal()).await?;
            eprintln!("{summary}");
        }
        Command::Check { config, sample } => check_command(&config, sample.as_deref())?,
        Command::Test { paths, config } => {
            let cfg = load(&config)?;
            let paths = if paths.is_empty() { cfg.rule_paths.clone() } else { paths };
            let files = riskd::tuning::ruletest::discover(&paths);
            anyhow::ensure!(!files.is_empty(), "no *.test.yaml files under {paths:?}");
            let results = riskd::tuning::ruletest::run(cfg, &files);
            print!("{}", riskd::tuning::ruletest::render(&results));
            anyhow::ensure!(results.iter().all(|r| r.failures.is_empty()), "some rule tests failed");
        }
        Command::Replay { config, input, set, format } => {
            let overrides = set
                .iter()
                .map(|s| riskd::config::Override::parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            readable(&config)?;
            let cfg = riskd::config::Config::load_with(&config, &overrides)?;
            let report = tokio::task::spawn_blocking(move || riskd::tuning::replay::replay(cfg, &input)).await??;
            match format {
                Format::Text => print!("{}", riskd::tuning::replay::render(&report)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
        }
        Command::Entity { entity_type, id, config, json, at } => {
            let cfg = load(&config)?;
            let text = blocking(move || {
                let store = riskd::state::open_store(&cfg.store).context("opening the store")?;
                let entity = riskd::alert::EntityRef { type_: entity_type, id };
                let x = riskd::scoring::explain_entity(&cfg.rules, &cfg.scoring, store.as_ref(), &entity, at)
                    .context("reading the entity's state")?
                    .ok_or_else(|| anyhow::anyhow!(riskd::scoring::no_state(&cfg.rules, &entity)))?;
                Ok(if json { format!("{}\n", serde_json::to_string_pretty(&x)?) } else { x.to_string() })
            })
            .await?;
            print!("{text}");
        }
        Command::Entities { config, entity_type, top, min_score, json, at } => {
            let cfg = load(&config)?;
            let text = blocking(move || {
                // A riskd running on this config answers from its index at
                // once (and holds the embedded store's file); else one scan.
                let running = at.is_none().then(|| running_listing(&cfg, entity_type.as_deref(), top, min_score));
                if let Some((addr, listing)) = running.flatten() {
                    eprintln!("riskd: listed by the riskd running on {addr} (its index, as of its last flush)");
                    return Ok(if json {
                        format!("{}\n", serde_json::to_string_pretty(&listing)?)
                    } else {
                        listing.to_string()
                    });
                }
                let store = riskd::state::open_store(&cfg.store).context("opening the store")?;
                let board =
                    riskd::scoring::Board::build(store.as_ref(), &cfg.scoring, at).context("reading the risk keys")?;
                let filter = (entity_type.as_deref(), top.max(1), min_score);
                let listing = riskd::scoring::list(&board, &cfg.scoring, store.as_ref(), filter, at)
                    .context("reading the entities' risk")?;
                Ok(if json { format!("{}\n", serde_json::to_string_pretty(&listing)?) } else { listing.to_string() })
            })
            .await?;
            print!("{text}");
        }
        Command::State { config, action } => {
            let cfg = load(&config)?;
            blocking(move || state_command(&cfg, action)).await?;
        }
        Command::Store { action } => store_command(action).await?,
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
            eprintln!("riskd: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}
