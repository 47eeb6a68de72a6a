//! The root slog logger. Built once at start; every actor and request logs through a child carrying
//! its context (`task_id`, `task_name`, `correlation_id`, `source`).

use slog::{o, Drain, Level, Logger};

use crate::settings::{LogFormat, Settings, SettingsError};

/// Reads a level name as written in the settings.
pub fn parse_level(name: &str) -> Result<Level, SettingsError> {
    match name {
        "critical" => Ok(Level::Critical),
        "error" => Ok(Level::Error),
        "warning" | "warn" => Ok(Level::Warning),
        "info" => Ok(Level::Info),
        "debug" => Ok(Level::Debug),
        "trace" => Ok(Level::Trace),
        other => Err(SettingsError::Invalid(format!(
            "log_level `{other}` is not one of critical, error, warning, info, debug, trace"
        ))),
    }
}

/// The root logger for `settings`, writing to standard error.
pub fn root(settings: &Settings) -> Logger {
    let level = parse_level(&settings.log_level).unwrap_or(Level::Info);
    let drain = match settings.log_format {
        LogFormat::Json => {
            let json = slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build()
                .fuse();
            async_drain(json, level)
        }
        LogFormat::Terminal => {
            let decorator = slog_term::TermDecorator::new().stderr().build();
            let term = slog_term::FullFormat::new(decorator).build().fuse();
            async_drain(term, level)
        }
    };
    Logger::root(drain, o!("service" => "downlink"))
}

fn async_drain<D>(drain: D, level: Level) -> slog::Fuse<slog::LevelFilter<slog_async::Async>>
where
    D: Drain<Ok = (), Err = slog::Never> + Send + 'static,
{
    // Block rather than drop when the queue is full: a lost log line about a task is worse than a
    // short stall of the logging thread.
    let async_drain = slog_async::Async::new(drain)
        .chan_size(4096)
        .overflow_strategy(slog_async::OverflowStrategy::Block)
        .build();
    slog::LevelFilter::new(async_drain, level).fuse()
}

/// A logger that drops everything (tests and tools).
pub fn discard() -> Logger {
    Logger::root(slog::Discard, o!())
}
