//! Retention: ended tasks older than `retention_days` lose their events and run directories; the
//! `tasks` and `task_hosts` rows stay (the audit trail) unless `retention_keep_tasks = false`.
//!
//! A pass runs every `retention_check_secs`. Each statement is short and commits on its own, so
//! no lock is held for long:
//!
//! 1. On PostgreSQL, `task_events` is partitioned by month (`task_events_YYYY_MM`): the pass makes
//!    sure this month's and the next month's partitions exist, then drops every month partition
//!    whose month ended before the cutoff and whose tasks have all ended before it (a drop, not a
//!    delete of its rows; `lock_timeout` bounds its wait for the table's lock, and a drop that has
//!    to wait is left to the next pass).
//! 2. Then, on both backends, the agent's own ended tasks older than the cutoff, [`TASK_BATCH`] at
//!    a time: their remaining events deleted [`EVENT_BATCH`] rows per statement, their run
//!    directories removed, and `tasks.purged_at` set (or the rows deleted).
//!
//! Beside the time budget, a space budget: with `run_dir_max_bytes`, [`budget`] removes the
//! oldest ended run directories whenever this agent's hold more than that.
//!
//! Run directories live on the agent's machine, so an agent purges its own tasks (and those of no
//! agent); another agent's old events still go with their month's partition.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{Datelike, NaiveDate, NaiveDateTime};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use slog::{info, warn, Logger};

use crate::store::db::{DbConnection, Pool};
use crate::store::schema::{task_events, tasks};
use crate::store::StoreError;

/// Tasks purged per round.
pub const TASK_BATCH: i64 = 100;
/// Events deleted per statement.
pub const EVENT_BATCH: i64 = 5000;
/// Longest wait for the lock a partition drop (or creation) needs.
const LOCK_TIMEOUT: &str = "2s";

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub partitions_dropped: Vec<String>,
    pub tasks_purged: usize,
    pub tasks_deleted: usize,
    pub events_deleted: usize,
    pub dirs_removed: usize,
}

impl Report {
    fn is_empty(&self) -> bool {
        *self == Report::default()
    }
}

/// How a pass is set.
#[derive(Debug, Clone)]
pub struct Policy {
    pub retention_days: u32,
    pub keep_tasks: bool,
    pub agent: String,
    /// `<run_dir>/<agent_name>`: task `id`'s directory is `run_root/id`.
    pub run_root: PathBuf,
}

/// `task_events_YYYY_MM` of the month holding `day`.
fn partition_name(day: NaiveDate) -> String {
    format!("task_events_{:04}_{:02}", day.year(), day.month())
}

fn month_start(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

fn next_month(day: NaiveDate) -> NaiveDate {
    let first = month_start(day);
    let (y, m) = if first.month() == 12 {
        (first.year() + 1, 1)
    } else {
        (first.year(), first.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(first)
}

/// The month a `task_events_YYYY_MM` name stands for.
fn partition_month(name: &str) -> Option<NaiveDate> {
    let rest = name.strip_prefix("task_events_")?;
    let (y, m) = rest.split_once('_')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)
}

/// Runs `sql` in a transaction of its own with a bounded lock wait.
fn with_lock_timeout(conn: &mut DbConnection, sql: &str) -> Result<(), StoreError> {
    conn.batch_execute(&format!(
        "BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; {sql}; COMMIT;"
    ))
    .map_err(|e| {
        // The statement's error is the one to report; a failed ROLLBACK breaks the connection,
        // and the pool replaces it.
        conn.batch_execute("ROLLBACK").ok();
        StoreError::from(e)
    })
}

#[derive(QueryableByName)]
struct Relname {
    #[diesel(sql_type = diesel::sql_types::Text)]
    relname: String,
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    found: bool,
}

/// PostgreSQL: this month's and the next month's partitions exist; finished months whose every
/// task ended before `cutoff` are dropped. Answers the names dropped.
fn partitions(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    cutoff: NaiveDateTime,
    log: &Logger,
) -> Result<Vec<String>, StoreError> {
    let today = now.date();
    for month in [month_start(today), next_month(today)] {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF task_events FOR VALUES FROM ('{month}') TO ('{}')",
            partition_name(month),
            next_month(month)
        );
        if let Err(e) = with_lock_timeout(conn, &sql) {
            warn!(log, "retention: cannot create a month partition of task_events (left to the next pass)";
                  "partition" => partition_name(month), "error" => %e);
        }
    }
    let names: Vec<Relname> = diesel::sql_query(
        "SELECT c.relname::text AS relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'task_events'::regclass ORDER BY c.relname",
    )
    .load(conn)?;
    let mut dropped = Vec::new();
    for Relname { relname } in names {
        let Some(month) = partition_month(&relname) else {
            continue;
        };
        let end = next_month(month).and_hms_opt(0, 0, 0).unwrap_or(now);
        if end > cutoff {
            continue;
        }
        // Every event in it is older than `end`, so its tasks started (or were created) before it:
        // droppable once none of those is still running or ended after the cutoff.
        let kept: Vec<Exists> = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM tasks WHERE COALESCE(started_at, created_at) < $1 \
             AND (ended_at IS NULL OR ended_at >= $2)) AS found",
        )
        .bind::<diesel::sql_types::Timestamp, _>(end)
        .bind::<diesel::sql_types::Timestamp, _>(cutoff)
        .load(conn)?;
        if kept.first().is_some_and(|k| k.found) {
            continue;
        }
        match with_lock_timeout(conn, &format!("DROP TABLE IF EXISTS {relname}")) {
            Ok(()) => {
                info!(log, "retention: dropped a month of task_events"; "partition" => &relname);
                dropped.push(relname);
            }
            Err(e) => {
                warn!(log, "retention: cannot drop a month partition now (left to the next pass)";
                      "partition" => &relname, "error" => %e)
            }
        }
    }
    Ok(dropped)
}

/// One pass at `now`.
pub fn pass(
    conn: &mut DbConnection,
    policy: &Policy,
    now: NaiveDateTime,
    log: &Logger,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    if policy.retention_days == 0 {
        return Ok(report);
    }
    let cutoff = now - chrono::Duration::days(i64::from(policy.retention_days));
    if matches!(conn, DbConnection::Pg(_)) {
        report.partitions_dropped = partitions(conn, now, cutoff, log)?;
    }
    loop {
        let mine = tasks::agent.eq(&policy.agent).or(tasks::agent.is_null());
        let old = tasks::table
            .filter(tasks::ended_at.lt(cutoff))
            .filter(mine)
            .order(tasks::ended_at.asc())
            .limit(TASK_BATCH)
            .select(tasks::id);
        let ids: Vec<i64> = if policy.keep_tasks {
            old.filter(tasks::purged_at.is_null()).load(conn)?
        } else {
            old.load(conn)?
        };
        if ids.is_empty() {
            break;
        }
        loop {
            let batch: Vec<i64> = task_events::table
                .filter(task_events::task_id.eq_any(&ids))
                .select(task_events::id)
                .limit(EVENT_BATCH)
                .load(conn)?;
            if batch.is_empty() {
                break;
            }
            let n = diesel::delete(task_events::table.filter(task_events::id.eq_any(&batch)))
                .execute(conn)?;
            report.events_deleted += n;
            if (n as i64) < EVENT_BATCH {
                break;
            }
        }
        report.dirs_removed += remove_dirs(&policy.run_root, &ids, log);
        if policy.keep_tasks {
            diesel::update(tasks::table.filter(tasks::id.eq_any(&ids)))
                .set(tasks::purged_at.eq(now))
                .execute(conn)?;
            report.tasks_purged += ids.len();
        } else {
            // task_hosts go with them (ON DELETE CASCADE).
            report.tasks_deleted +=
                diesel::delete(tasks::table.filter(tasks::id.eq_any(&ids))).execute(conn)?;
        }
        if (ids.len() as i64) < TASK_BATCH {
            break;
        }
    }
    Ok(report)
}

/// Removes the run directories of these tasks; answers how many there were.
fn remove_dirs(run_root: &Path, ids: &[i64], log: &Logger) -> usize {
    let mut removed = 0;
    for id in ids {
        let dir = run_root.join(id.to_string());
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(log, "retention: cannot remove a run directory"; "task_id" => id, "path" => dir.display().to_string(), "error" => %e)
            }
        }
    }
    removed
}

/// Runs `pass` on a pooled connection every `every` (the first soon after the start), on the
/// blocking pool; its report goes to `done`, and a failure is logged once until a pass succeeds.
fn every<R: Send + 'static>(
    pool: Pool,
    every: Duration,
    log: Logger,
    what: &'static str,
    pass: impl Fn(&mut DbConnection, &Logger) -> Result<R, StoreError> + Send + Sync + 'static,
    done: impl Fn(&Logger, R) + 'static,
) -> actix_web::rt::task::JoinHandle<()> {
    let pass = std::sync::Arc::new(pass);
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut failing = false;
        loop {
            tick.tick().await;
            let (pool, plog, pass) = (pool.clone(), log.clone(), pass.clone());
            let result = tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                pass(&mut conn, &plog)
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
            .and_then(|r| r);
            match result {
                Ok(report) => {
                    failing = false;
                    done(&log, report);
                }
                Err(e) => {
                    if !failing {
                        warn!(log, "{what} failed; tried again later"; "error" => %e);
                    }
                    failing = true;
                }
            }
        }
    })
}

/// Runs a retention pass every `every`, the first soon after the start.
pub fn spawn(
    pool: Pool,
    policy: Policy,
    interval: Duration,
    log: Logger,
) -> actix_web::rt::task::JoinHandle<()> {
    let run =
        move |conn: &mut DbConnection, log: &Logger| pass(conn, &policy, crate::time::now(), log);
    every(
        pool,
        interval,
        log,
        "retention pass",
        run,
        |log, report: Report| {
            if !report.is_empty() {
                info!(log, "retention pass";
                "partitions_dropped" => report.partitions_dropped.join(","),
                "tasks_purged" => report.tasks_purged, "tasks_deleted" => report.tasks_deleted,
                "events_deleted" => report.events_deleted, "dirs_removed" => report.dirs_removed);
            }
        },
    )
}

/// What one space-budget pass found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BudgetReport {
    /// Bytes the run directories held before the pass.
    pub held: u64,
    pub dirs_removed: usize,
    pub bytes_freed: u64,
}

/// The space budget (`run_dir_max_bytes`): when this agent's run directories hold more than
/// `max_bytes`, the directories of ended tasks go, the earliest ended first, until they fit. A
/// directory whose task is pending or running is never touched; one without a row (its row was
/// deleted, or it belongs to another database) counts as ended before every other.
pub fn budget(
    conn: &mut DbConnection,
    policy: &Policy,
    max_bytes: u64,
    log: &Logger,
) -> Result<BudgetReport, StoreError> {
    let mut dirs: Vec<(i64, u64)> = match std::fs::read_dir(&policy.run_root) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| {
                let id: i64 = e.file_name().to_str()?.parse().ok()?;
                Some((id, crate::disk::usage(&e.path())))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            warn!(log, "space budget: cannot list the run directories"; "path" => policy.run_root.display().to_string(), "error" => %e);
            Vec::new()
        }
    };
    let held: u64 = dirs.iter().map(|d| d.1).sum();
    let mut report = BudgetReport {
        held,
        ..BudgetReport::default()
    };
    if held <= max_bytes {
        return Ok(report);
    }
    // The rows of these directories, a bounded number per query: live ones stay.
    let mut ended: std::collections::HashMap<i64, Option<NaiveDateTime>> = Default::default();
    let mut seen = std::collections::HashSet::new();
    dirs.sort_unstable();
    for chunk in dirs.chunks(500) {
        let ids: Vec<i64> = chunk.iter().map(|d| d.0).collect();
        let rows: Vec<(i64, i32, Option<NaiveDateTime>)> = tasks::table
            .filter(tasks::id.eq_any(&ids))
            .select((tasks::id, tasks::status, tasks::ended_at))
            .load(conn)?;
        for (id, status, ended_at) in rows {
            seen.insert(id);
            if !crate::status::Status::LIVE.contains(&status) {
                ended.insert(id, ended_at);
            }
        }
    }
    let mut removable: Vec<(Option<NaiveDateTime>, i64, u64)> = dirs
        .iter()
        .filter_map(|&(id, bytes)| match ended.get(&id) {
            Some(at) => Some((*at, id, bytes)),
            None if !seen.contains(&id) => Some((None, id, bytes)),
            None => None,
        })
        .collect();
    // No row (None) first, then by when each ended.
    removable.sort_unstable();
    let mut left = held;
    for (_, id, bytes) in removable {
        if left <= max_bytes {
            break;
        }
        if remove_dirs(&policy.run_root, &[id], log) == 1 {
            left = left.saturating_sub(bytes);
            report.dirs_removed += 1;
            report.bytes_freed += bytes;
        }
    }
    if left > max_bytes {
        warn!(log, "the run directories of live tasks alone pass run_dir_max_bytes";
              "held" => left, "run_dir_max_bytes" => max_bytes);
    }
    Ok(report)
}

/// Runs a space-budget pass every `interval`.
pub fn spawn_budget(
    pool: Pool,
    policy: Policy,
    max_bytes: u64,
    interval: Duration,
    log: Logger,
) -> actix_web::rt::task::JoinHandle<()> {
    let run = move |conn: &mut DbConnection, log: &Logger| budget(conn, &policy, max_bytes, log);
    every(
        pool,
        interval,
        log,
        "space budget pass",
        run,
        move |log, report: BudgetReport| {
            if report.dirs_removed > 0 {
                info!(log, "run_dir_max_bytes: removed the oldest ended run directories";
                  "held" => report.held, "dirs_removed" => report.dirs_removed,
                  "bytes_freed" => report.bytes_freed, "run_dir_max_bytes" => max_bytes);
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_partition_names() {
        let d = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).unwrap();
        assert_eq!(partition_name(d(2026, 12, 31)), "task_events_2026_12");
        assert_eq!(next_month(d(2026, 12, 31)), d(2027, 1, 1));
        assert_eq!(next_month(d(2026, 1, 31)), d(2026, 2, 1));
        assert_eq!(partition_month("task_events_2026_09"), Some(d(2026, 9, 1)));
        assert_eq!(partition_month("task_events_default"), None);
        assert_eq!(partition_month("task_events_2026_13"), None);
    }
}
