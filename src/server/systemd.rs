//! systemd's notify protocol, for `Type=notify` units (`deploy/downlink.service`): `READY=1` once
//! the database is ready, migrations are applied and the tasks an earlier server left are adopted
//! or queued again; `WATCHDOG=1` while the task supervisor answers; `STOPPING=1` at shutdown.
//! Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.

use std::time::Duration;

use actix::Addr;
use sd_notify::NotifyState;
use slog::{info, warn, Logger};

use crate::supervisor::{TaskSupervisor, WhereInQueue};

/// Tells systemd the server is ready, with a status line.
pub fn ready(log: &Logger, status: &str) {
    send(log, &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the server is stopping.
pub fn stopping(log: &Logger) {
    send(log, &[NotifyState::Stopping]);
}

/// With `WatchdogSec=` set, pings systemd at half the interval for as long as the task supervisor
/// answers a question within that half; a wedged supervisor stops the pings and systemd restarts
/// the agent (its tasks are adopted by the next start).
pub fn watchdog(supervisor: Addr<TaskSupervisor>, log: Logger) {
    let Some(every) = sd_notify::watchdog_enabled().map(|d| d / 2) else {
        return;
    };
    info!(log, "systemd watchdog"; "ping_every_ms" => every.as_millis() as u64);
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        loop {
            tick.tick().await;
            match tokio::time::timeout(every, supervisor.send(WhereInQueue(0))).await {
                Ok(Ok(_)) => send(&log, &[NotifyState::Watchdog]),
                _ => warn!(log, "the task supervisor did not answer: no watchdog ping"),
            }
        }
    });
}

fn send(log: &Logger, state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(log, "cannot notify systemd"; "error" => %e);
    }
}
