//! The root slog logger. Built once at start; every actor and request logs through a child carrying
//! its context (`task_id`, `task_name`, `correlation_id`, `source`).

use slog::{o, Drain, Level, Logger};

use crate::settings::{LogFormat, LogLevel, Settings};

fn level(level: LogLevel) -> Level {
    match level {
        LogLevel::Critical => Level::Critical,
        LogLevel::Error => Level::Error,
        LogLevel::Warning => Level::Warning,
        LogLevel::Info => Level::Info,
        LogLevel::Debug => Level::Debug,
        LogLevel::Trace => Level::Trace,
    }
}

/// The root logger for `settings`, writing to standard error through a logging thread, and the
/// guard that flushes that thread's queue when dropped: keep it until the last line is logged.
pub fn root(settings: &Settings) -> (Logger, LogGuard) {
    let level = level(settings.log_level);
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
    let (drain, guard) = drain;
    (Logger::root(drain, o!("service" => "downlink")), guard)
}

/// Flushes the logging thread's queue when dropped.
pub type LogGuard = slog_async::AsyncGuard;

// A line logged after the guard is gone (a thread still ending at exit) is dropped, not a panic.
type Filtered = slog::IgnoreResult<slog::LevelFilter<slog_async::Async>>;

fn async_drain<D>(drain: D, level: Level) -> (Filtered, LogGuard)
where
    D: Drain<Ok = (), Err = slog::Never> + Send + 'static,
{
    // Block rather than drop when the queue is full: a lost log line about a task is worse than a
    // short stall of the logging thread.
    let async_drain = slog_async::Async::new(drain)
        .chan_size(4096)
        .overflow_strategy(slog_async::OverflowStrategy::Block)
        .build_with_guard();
    (
        slog::LevelFilter::new(async_drain.0, level).ignore_res(),
        async_drain.1,
    )
}
