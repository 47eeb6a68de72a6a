//! The `downlink` binary: parses the command line, loads settings, builds the logger and calls
//! into the library.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use slog::{error, info};

use downlink::settings::Settings;
use downlink::store::db;
use downlink::{cli, logging, server};

/// downlink: runs orchestrator tasks as ansible-playbook processes and records every result.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Settings file (TOML) laid over the built-in defaults; DOWNLINK_* variables override both.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations, then serve the API.
    Serve,
    /// Apply pending migrations and exit.
    Migrate,
    /// Print the effective settings (secrets redacted) and exit.
    Settings,
    /// Read a bearer token on standard input and print its SHA-256 for `auth_token_hashes`.
    HashToken,
    /// List the agents that serve the database: name, host, pid, version, budget, state.
    Agents,
    /// List, show, watch and stop tasks through the HTTP API of a running agent.
    Tasks {
        /// The agent's URL (default: the settings' bind on loopback).
        #[arg(long, global = true, value_name = "URL", env = cli::SERVER_VAR)]
        server: Option<String>,
        /// The bearer token (from the environment only: a command line is visible to every user).
        #[arg(long, global = true, hide = true, env = cli::TOKEN_VAR, hide_env_values = true)]
        token: Option<String>,
        /// A file whose first line is the bearer token (default: DOWNLINK_TOKEN).
        #[arg(long, global = true, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// PEM certificates to trust for an https:// server (default: the public web roots).
        #[arg(long, global = true, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        #[command(subcommand)]
        command: TasksCommand,
    },
}

#[derive(Subcommand)]
enum TasksCommand {
    /// The newest tasks, newest first.
    List {
        /// Only this status (a code 1-7 or its name: pending, running, failed, success, ...).
        #[arg(long)]
        status: Option<String>,
        /// Only tasks from this source (X-RESOURCE of the run).
        #[arg(long)]
        source: Option<String>,
        /// How many (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// A task and its per-host table: result, counters, message.
    Show { id: i64 },
    /// Follow a task's events to its end, a line per host; exits 0 if it succeeded, 3 if it ended
    /// otherwise.
    Watch { id: i64 },
    /// Stop a task; answers once it is recorded as stopped.
    Stop { id: i64 },
}

fn main() -> ExitCode {
    // Descriptors 0-2 closed at start are opened on /dev/null by Rust's runtime before main
    // (std's sanitize_standard_fds), so no file the server opens becomes a standard stream
    // (tests/it/hostile.rs checks it from /proc).
    let cli = Cli::parse();
    if let Command::HashToken = cli.command {
        let mut token = String::new();
        if std::io::stdin().read_line(&mut token).is_err() || token.trim().is_empty() {
            eprintln!("downlink: give the token on standard input");
            return ExitCode::from(2);
        }
        println!("{}", downlink::api::auth::hash_token(token.trim()));
        return ExitCode::SUCCESS;
    }
    // The CLI's own DOWNLINK_* variables are clap's, not settings.
    let env = std::env::vars().filter(|(name, _)| !cli::ENV_VARS.contains(&name.as_str()));
    let settings = match Settings::load(cli.config.as_deref(), env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("downlink: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Tasks {
        server,
        token,
        token_file,
        ca_file,
        command,
    } = cli.command
    {
        let target = cli::Target {
            server,
            token,
            token_file,
            ca_file,
        };
        return match tasks(&settings, &target, command) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("downlink: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let (log, log_guard) = logging::root(&settings);
    let result = match cli.command {
        Command::Serve => serve(settings, &log),
        Command::Migrate => server::migrate_only(&settings, &log),
        Command::Agents => agents(&settings),
        Command::HashToken | Command::Tasks { .. } => Ok(()),
        Command::Settings => {
            let mut shown = settings.clone();
            shown.database_url = db::redact(&shown.database_url);
            println!("{shown:#?}");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(log, "downlink stopped"; "error" => format!("{e:#}"));
            // The guard waits for the logging thread to write the line before the exit.
            drop(log);
            drop(log_guard);
            eprintln!("downlink: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `downlink agents`: one line per agent, `lost` for one silent past its lease.
fn agents(settings: &Settings) -> anyhow::Result<()> {
    let target = db::Target::parse(&settings.effective_database_url())?;
    let mut conn =
        db::connect(&target).with_context(|| format!("connecting to {}", target.describe()))?;
    let rows = downlink::cluster::agents::list(&mut conn).context("reading agents")?;
    let heartbeat = std::time::Duration::from_secs(settings.heartbeat_secs.max(1));
    println!(
        "{:<24} {:<20} {:>8} {:<10} {:<20} {:>13} {:>9} STATE",
        "NAME", "HOST", "PID", "VERSION", "STARTED (UTC)", "LAST_BEAT", "MAX_FORKS"
    );
    for row in &rows {
        println!(
            "{:<24} {:<20} {:>8} {:<10} {:<20} {:>9.1}s ago {:>9} {}",
            row.name,
            row.host,
            row.pid,
            row.version,
            row.started_at.format("%Y-%m-%d %H:%M:%S"),
            row.silent_ms as f64 / 1000.0,
            row.max_forks,
            downlink::cluster::agents::shown_state(row, heartbeat)
        );
    }
    Ok(())
}

/// `downlink tasks …`.
fn tasks(
    settings: &Settings,
    target: &cli::Target,
    command: TasksCommand,
) -> anyhow::Result<ExitCode> {
    let client = cli::Client::new(settings, target)?;
    // Not locked for the whole command: `watch`'s display draws from a thread of its own.
    let mut out = std::io::stdout();
    match command {
        TasksCommand::List {
            status,
            source,
            limit,
        } => cli::list(
            &client,
            status.as_deref(),
            source.as_deref(),
            limit,
            &mut out,
        )?,
        TasksCommand::Show { id } => cli::show(&client, id, &mut out)?,
        TasksCommand::Stop { id } => cli::stop(&client, id, &mut out)?,
        TasksCommand::Watch { id } => {
            let status = cli::watch(&client, id, &mut out)?;
            if status != downlink::status::Status::Success.code() {
                return Ok(ExitCode::from(3));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Completes at the first SIGTERM or SIGINT.
async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the process still dies on the default action.
        _ => std::future::pending::<()>().await,
    }
}

fn serve(settings: Settings, log: &slog::Logger) -> anyhow::Result<()> {
    let bind = settings.bind.clone();
    let addr: std::net::SocketAddr = bind
        .parse()
        .with_context(|| format!("bind `{bind}` is not an address:port"))?;
    let access = downlink::api::auth::Access::from_settings(&settings)?;
    match downlink::api::auth::check_exposure(&settings, &access, addr) {
        Ok(Some(warning)) => slog::warn!(log, "{}", warning),
        Ok(None) => {}
        Err(refusal) => anyhow::bail!(refusal),
    }
    let prepared = server::prepare(settings, log)?;
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {bind}"))?;
    info!(log, "listening"; "address" => listener.local_addr()?.to_string());
    actix_web::rt::System::with_tokio_rt(|| {
        server::runtime("dl-blocking", server::ACTOR_BLOCKING_THREADS)
    })
    .block_on(server::run(
        prepared,
        listener,
        log.clone(),
        signal(),
        |_| {},
    ))
    .context("server")?;
    info!(log, "stopped");
    Ok(())
}
