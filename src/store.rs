//! The store: plain functions over one database connection, the same code for both backends.
//! Persistence calls the writing ones (it is the only writer); read-only handlers call the reading
//! ones through `web::block`.

pub mod clean;
pub mod db;
pub mod notify;
pub mod persistence;
pub mod readers;
pub mod retention;
pub mod schema;

use chrono::NaiveDateTime;
use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};

use crate::status::Status;
use crate::store::db::DbConnection;
use crate::store::schema::{task_events, task_hosts, tasks};

/// A task row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = tasks)]
pub struct Task {
    pub id: i64,
    pub name: String,
    pub nodes: String,
    pub remote_user: String,
    pub content: String,
    pub params: String,
    pub fork_num: i32,
    pub forks: i32,
    pub status: i32,
    pub err: Option<String>,
    pub correlation_id: String,
    pub source: String,
    pub created_at: NaiveDateTime,
    pub started_at: Option<NaiveDateTime>,
    pub ended_at: Option<NaiveDateTime>,
    pub updated_at: NaiveDateTime,
    pub exit_code: Option<i32>,
    pub pid: Option<i32>,
    pub pid_start_time: Option<i64>,
    pub events_offset: i64,
    pub instance: Option<String>,
    pub agent: Option<String>,
    pub cpu_usec: Option<i64>,
    pub memory_peak_bytes: Option<i64>,
}

/// What `/api/check` and `/api/stop` read of a task: the columns of the answer, nothing of the
/// playbook or params.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = tasks)]
pub struct TaskSummary {
    pub id: i64,
    pub name: String,
    pub nodes: String,
    pub status: i32,
    pub err: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub started_at: Option<NaiveDateTime>,
    pub ended_at: Option<NaiveDateTime>,
    pub agent: Option<String>,
}

/// What `GET /api/tasks` lists of a task.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = tasks)]
pub struct TaskListing {
    pub id: i64,
    pub name: String,
    pub nodes: String,
    pub status: i32,
    pub err: Option<String>,
    pub source: String,
    pub correlation_id: String,
    pub agent: Option<String>,
    pub created_at: NaiveDateTime,
    pub started_at: Option<NaiveDateTime>,
    pub ended_at: Option<NaiveDateTime>,
    pub requested_by: Option<String>,
    pub requested_via: Option<String>,
    pub stop_requested_by: Option<String>,
    pub stop_requested_via: Option<String>,
}

/// A new task, as validated from a request.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = tasks)]
pub struct NewTask {
    pub name: String,
    pub nodes: String,
    pub remote_user: String,
    pub content: String,
    pub params: String,
    pub fork_num: i32,
    pub forks: i32,
    pub status: i32,
    pub correlation_id: String,
    pub source: String,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    /// The agent that runs it; `None`: unclaimed, in the shared queue (`shared_queue`).
    pub agent: Option<String>,
    /// Who ran it (a token's name, or `local`) and through what (`api`, `console`, `cli`).
    pub requested_by: Option<String>,
    pub requested_via: Option<String>,
}

/// A per-host result row.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = task_hosts)]
pub struct HostRow {
    pub id: i64,
    pub task_id: i64,
    pub host: String,
    pub result: Option<String>,
    pub ok: i32,
    pub changed: i32,
    pub failed: i32,
    pub unreachable: i32,
    pub skipped: i32,
    pub rescued: i32,
    pub ignored: i32,
    pub msg: Option<String>,
    pub correlation_id: String,
    pub source: String,
    pub created_at: NaiveDateTime,
    pub ended_at: Option<NaiveDateTime>,
}

/// What a task knows of one host: written over the host's row. `None` fields are left as they
/// are (a result, message or time once known is never taken back).
#[derive(Debug, Clone, PartialEq, Default, AsChangeset)]
#[diesel(table_name = task_hosts)]
pub struct HostState {
    #[diesel(skip_update)]
    pub host: String,
    pub result: Option<String>,
    pub ok: i32,
    pub changed: i32,
    pub failed: i32,
    pub unreachable: i32,
    pub skipped: i32,
    pub rescued: i32,
    pub ignored: i32,
    pub msg: Option<String>,
    pub created_at: Option<NaiveDateTime>,
    pub ended_at: Option<NaiveDateTime>,
}

#[derive(Insertable)]
#[diesel(table_name = task_hosts)]
// A `None` is NULL (the columns' default), so that many rows go into one INSERT on SQLite too.
#[diesel(treat_none_as_default_value = false)]
struct NewHost<'a> {
    task_id: i64,
    host: &'a str,
    result: Option<&'a str>,
    correlation_id: &'a str,
    source: &'a str,
    created_at: NaiveDateTime,
    ended_at: Option<NaiveDateTime>,
}

/// One event of a task's stream.
#[derive(Debug, Clone, PartialEq, Insertable, Queryable, Selectable)]
#[diesel(table_name = task_events)]
// A `None` is NULL, not DEFAULT (the same here): what a binary COPY needs.
#[diesel(treat_none_as_default_value = false)]
pub struct NewEvent {
    pub task_id: i64,
    pub seq: i32,
    pub host: Option<String>,
    pub kind: String,
    pub task_name: Option<String>,
    pub payload: String,
    pub created_at: NaiveDateTime,
}

/// The end of a task, written in one transaction.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: i64,
    pub status: Status,
    pub err: Option<String>,
    pub exit_code: Option<i32>,
    pub ended_at: NaiveDateTime,
    /// Final state of every node: rows that do not exist yet are created.
    pub hosts: Vec<HostState>,
    /// What the task's cgroup measured (CPU microseconds, peak memory bytes).
    pub usage: Usage,
}

/// What a task's cgroup measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_usec: Option<i64>,
    pub memory_peak_bytes: Option<i64>,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task name is duplicate")]
    Duplicate,
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Query(DieselError),
    /// The database answered and refused what the request asked (a data exception).
    #[error("the database refused the request: {0}")]
    Refused(String),
}

impl From<DieselError> for StoreError {
    fn from(e: DieselError) -> Self {
        crate::store::db::suspect();
        StoreError::Query(e)
    }
}

impl From<diesel::r2d2::PoolError> for StoreError {
    fn from(e: diesel::r2d2::PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Runs `f` in a transaction that takes the write lock at its start: on SQLite `BEGIN IMMEDIATE`,
/// so a transaction that reads and then writes waits (busy_timeout) for a concurrent writer instead
/// of failing BUSY when it tries to upgrade its read lock; on PostgreSQL a plain transaction.
fn write_transaction<T>(
    conn: &mut DbConnection,
    f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    type Manager = <DbConnection as Connection>::TransactionManager;
    // Inside a batch (`in_one_transaction`): join it, so the batch commits once.
    if matches!(
        Manager::transaction_manager_status_mut(conn).transaction_depth(),
        Ok(Some(_))
    ) {
        return f(conn);
    }
    match conn {
        DbConnection::Sqlite(c) => {
            AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?
        }
        DbConnection::Pg(_) => Manager::begin_transaction(conn)?,
    }
    match f(conn) {
        Ok(value) => {
            Manager::commit_transaction(conn)?;
            Ok(value)
        }
        Err(e) => {
            // The statement's error is the one worth reporting; a failed rollback marks the
            // connection broken, and the pool replaces it.
            Manager::rollback_transaction(conn).ok();
            Err(e)
        }
    }
}

/// Runs several writes in one transaction, one commit for all: each write's own transaction
/// joins it, so a failure anywhere rolls back every one of them.
pub fn in_one_transaction<T>(
    conn: &mut DbConnection,
    f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    write_transaction(conn, f)
}

/// Inserts a task; its id once committed.
/// Records who first asked to stop a live task (a later stop, or one of an ended task, changes
/// nothing).
pub fn record_stop_request(
    conn: &mut DbConnection,
    id: i64,
    by: &str,
    via: &str,
) -> Result<(), StoreError> {
    diesel::update(
        tasks::table
            .find(id)
            .filter(tasks::status.eq_any(Status::LIVE))
            .filter(tasks::stop_requested_by.is_null()),
    )
    .set((
        tasks::stop_requested_by.eq(by),
        tasks::stop_requested_via.eq(via),
    ))
    .execute(conn)?;
    Ok(())
}

pub fn insert_task(conn: &mut DbConnection, new: &NewTask) -> Result<i64, StoreError> {
    // In a transaction of its own, so the commit is a statement whose failure is seen: SQLite
    // commits an autocommit `INSERT … RETURNING` only when the statement is reset, after its row
    // has been read, and an error there (a full disk: SQLITE_FULL) never reaches the caller, who
    // would answer an id that was never stored.
    write_transaction(conn, |c| {
        diesel::insert_into(tasks::table)
            .values(new)
            .returning(tasks::id)
            .get_result(c)
            .map_err(|e| match e {
                DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
                    StoreError::Duplicate
                }
                other => other.into(),
            })
    })
}

/// The task with this id.
pub fn get_task(conn: &mut DbConnection, id: i64) -> Result<Option<Task>, StoreError> {
    Ok(tasks::table
        .find(id)
        .select(Task::as_select())
        .first(conn)
        .optional()?)
}

/// The summary of the task with this id and name and its host rows in node order, in one
/// statement (`/api/check` is the hottest read; on PostgreSQL the HTTP workers send the same
/// statement themselves, `readers::task_with_hosts`).
pub fn task_with_hosts(
    conn: &mut DbConnection,
    id: i64,
    name: &str,
) -> Result<Option<(TaskSummary, Vec<HostRow>)>, StoreError> {
    // Two statements, not a join: a join repeats the task's `nodes` (80 KB at 5,000 nodes) on
    // every host's row. The task first: its hosts, read after, are at least as recent.
    let task: Option<TaskSummary> = crate::on_backend!(conn, |c| tasks::table
        .filter(tasks::id.eq(id))
        .filter(tasks::name.eq(name))
        .select(TaskSummary::as_select())
        .first(c)
        .optional())?;
    let Some(task) = task else {
        return Ok(None);
    };
    Ok(Some((task, task_hosts(conn, id)?)))
}

/// Every task of `agent` with one of these statuses, oldest first; with `unowned`, also those of
/// no agent (stored before agents had names; in the shared queue they are the queue, nobody's).
pub fn tasks_with_status(
    conn: &mut DbConnection,
    agent: &str,
    statuses: &[i32],
    unowned: bool,
) -> Result<Vec<Task>, StoreError> {
    let of = tasks::table
        .filter(tasks::status.eq_any(statuses))
        .order(tasks::id.asc())
        .select(Task::as_select());
    Ok(if unowned {
        of.filter(tasks::agent.eq(agent).or(tasks::agent.is_null()))
            .load(conn)?
    } else {
        of.filter(tasks::agent.eq(agent)).load(conn)?
    })
}

/// Which tasks a list shows (`GET /api/tasks`, the console's pages).
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub status: Option<i32>,
    pub source: Option<String>,
    /// The start of the name.
    pub name: Option<String>,
    pub agent: Option<String>,
    /// Only ids below this one (the keyset of the next page).
    pub before: Option<i64>,
    pub limit: i64,
}

/// The tasks a filter lets through, newest first (by id: the primary key's index is the order).
pub fn filter_tasks(
    conn: &mut DbConnection,
    f: &TaskFilter,
) -> Result<Vec<TaskListing>, StoreError> {
    let mut q = tasks::table
        .order(tasks::id.desc())
        .limit(f.limit)
        .select(TaskListing::as_select())
        .into_boxed();
    if let Some(s) = f.status {
        q = q.filter(tasks::status.eq(s));
    }
    if let Some(s) = &f.source {
        q = q.filter(tasks::source.eq(s.clone()));
    }
    if let Some(n) = &f.name {
        let escaped: String = n
            .chars()
            .flat_map(|c| match c {
                '%' | '_' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        q = q.filter(tasks::name.like(format!("{escaped}%")).escape('\\'));
    }
    if let Some(a) = &f.agent {
        q = q.filter(tasks::agent.eq(a.clone()));
    }
    if let Some(b) = f.before {
        q = q.filter(tasks::id.lt(b));
    }
    Ok(q.load(conn)?)
}

/// One task as listed, and its host rows in node order.
pub fn task_detail(
    conn: &mut DbConnection,
    id: i64,
) -> Result<Option<(TaskListing, Vec<HostRow>)>, StoreError> {
    let task = tasks::table
        .find(id)
        .select(TaskListing::as_select())
        .first(conn)
        .optional()?;
    match task {
        Some(task) => Ok(Some((task, task_hosts(conn, id)?))),
        None => Ok(None),
    }
}

/// How many tasks the table holds in each status, and when the oldest pending one was created.
pub struct TaskCounts {
    /// `(status code, tasks)`, for the codes that have any.
    pub by_status: Vec<(i32, i64)>,
    pub oldest_pending: Option<NaiveDateTime>,
}

/// Counts the table's tasks by status (`/metrics`).
pub fn task_counts(conn: &mut DbConnection) -> Result<TaskCounts, StoreError> {
    let by_status = tasks::table
        .group_by(tasks::status)
        .select((tasks::status, diesel::dsl::count_star()))
        .load(conn)?;
    let oldest_pending = tasks::table
        .filter(tasks::status.eq(Status::Pending.code()))
        .select(diesel::dsl::min(tasks::created_at))
        .first(conn)?;
    Ok(TaskCounts {
        by_status,
        oldest_pending,
    })
}

/// A task's status code; `None` if there is no such task.
pub fn task_status(conn: &mut DbConnection, id: i64) -> Result<Option<i32>, StoreError> {
    Ok(tasks::table
        .find(id)
        .select(tasks::status)
        .first(conn)
        .optional()?)
}

/// The host rows of a task in node order.
pub fn task_hosts(conn: &mut DbConnection, task_id: i64) -> Result<Vec<HostRow>, StoreError> {
    Ok(task_hosts::table
        .filter(task_hosts::task_id.eq(task_id))
        .order(task_hosts::id.asc())
        .select(HostRow::as_select())
        .load(conn)?)
}

/// The events of a task in order.
pub fn task_events(conn: &mut DbConnection, task_id: i64) -> Result<Vec<NewEvent>, StoreError> {
    Ok(task_events::table
        .filter(task_events::task_id.eq(task_id))
        .order(task_events::seq.asc())
        .select(NewEvent::as_select())
        .load(conn)?)
}

/// A page of a task's event stream, and the task's status read before it.
pub struct EventPage {
    /// `(status, err, ended_at)` of the task; `None`: no such task.
    pub task: Option<(i32, Option<String>, Option<NaiveDateTime>)>,
    /// Events with `seq > after` (of `host` alone, if given), in order, at most `limit`.
    pub events: Vec<NewEvent>,
}

/// The task's status, then its events after `after`. Read in this order, a terminal status means
/// the page holds every event that is left: a task's events are committed before its end.
pub fn events_after(
    conn: &mut DbConnection,
    task_id: i64,
    after: i32,
    host: Option<&str>,
    limit: i64,
) -> Result<EventPage, StoreError> {
    let task = tasks::table
        .find(task_id)
        .select((tasks::status, tasks::err, tasks::ended_at))
        .first(conn)
        .optional()?;
    if task.is_none() {
        return Ok(EventPage {
            task,
            events: Vec::new(),
        });
    }
    let page = task_events::table
        .filter(task_events::task_id.eq(task_id))
        .filter(task_events::seq.gt(after))
        .order(task_events::seq.asc())
        .limit(limit)
        .select(NewEvent::as_select());
    let events = match host {
        Some(host) => page.filter(task_events::host.eq(host)).load(conn)?,
        None => page.load(conn)?,
    };
    Ok(EventPage { task, events })
}

/// A host's records over every task, newest task first (task ids below `before`, if given; a task
/// has one record per host), at most `limit`, each with its task's name and status.
pub fn host_history(
    conn: &mut DbConnection,
    host: &str,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<(HostRow, String, i32)>, StoreError> {
    let mut q = task_hosts::table
        .filter(task_hosts::host.eq(host.to_owned()))
        .order(task_hosts::task_id.desc())
        .limit(limit)
        .select(HostRow::as_select())
        .into_boxed();
    if let Some(b) = before {
        q = q.filter(task_hosts::task_id.lt(b));
    }
    let rows: Vec<HostRow> = q.load(conn)?;
    let ids: Vec<i64> = rows.iter().map(|r| r.task_id).collect();
    let tasks: std::collections::HashMap<i64, (String, i32)> = tasks::table
        .filter(tasks::id.eq_any(ids))
        .select((tasks::id, tasks::name, tasks::status))
        .load::<(i64, String, i32)>(conn)?
        .into_iter()
        .map(|(id, name, status)| (id, (name, status)))
        .collect();
    Ok(rows
        .into_iter()
        .map(|r| {
            let (name, status) = tasks.get(&r.task_id).cloned().unwrap_or_default();
            (r, name, status)
        })
        .collect())
}

/// The newest `limit` records of `host` for tasks from `source`, oldest first.
pub fn host_log(
    conn: &mut DbConnection,
    host: &str,
    source: &str,
    limit: i64,
) -> Result<Vec<HostRow>, StoreError> {
    let mut rows: Vec<HostRow> = task_hosts::table
        .filter(task_hosts::host.eq(host))
        .filter(task_hosts::source.eq(source))
        .order((task_hosts::created_at.desc(), task_hosts::id.desc()))
        .limit(limit)
        .select(HostRow::as_select())
        .load(conn)?;
    rows.reverse();
    Ok(rows)
}

/// Moves a task from pending to running and creates a row per node. False if the task was no
/// longer pending (then nothing changes).
#[allow(clippy::too_many_arguments)]
pub fn mark_running(
    conn: &mut DbConnection,
    id: i64,
    nodes: &[String],
    started_at: NaiveDateTime,
    pid: i32,
    pid_start_time: i64,
    instance: &str,
    forks: u32,
    remote_mark: Option<&str>,
) -> Result<bool, StoreError> {
    write_transaction(conn, |conn| {
        let changed = diesel::update(
            tasks::table
                .find(id)
                .filter(tasks::status.eq_any(Status::Running.predecessors())),
        )
        .set((
            tasks::status.eq(Status::Running.code()),
            tasks::started_at.eq(started_at),
            tasks::updated_at.eq(started_at),
            tasks::pid.eq(pid),
            tasks::pid_start_time.eq(pid_start_time),
            tasks::instance.eq(instance),
            tasks::forks.eq(i32::try_from(forks).unwrap_or(i32::MAX)),
        ))
        .execute(conn)?;
        if let (1, Some(mark)) = (changed, remote_mark) {
            diesel::update(tasks::table.find(id))
                .set(tasks::remote_mark.eq(mark))
                .execute(conn)?;
        }
        let task = match (changed, get_task(conn, id)?) {
            (1, Some(task)) => task,
            _ => return Ok(false),
        };
        // A row per node, HOST_ROWS_PER_STATEMENT to a statement.
        let rows: Vec<NewHost> = nodes
            .iter()
            .map(|host| NewHost::of(&task, host, None, started_at, None))
            .collect();
        for rows in rows.chunks(HOST_ROWS_PER_STATEMENT) {
            crate::on_backend!(conn, |c| diesel::insert_into(task_hosts::table)
                .values(rows)
                .execute(c))?;
        }
        Ok(true)
    })
}

impl<'a> NewHost<'a> {
    /// The row of `host` for `task` (which gives it its correlation id and source).
    fn of(
        task: &'a Task,
        host: &'a str,
        result: Option<&'a str>,
        created_at: NaiveDateTime,
        ended_at: Option<NaiveDateTime>,
    ) -> NewHost<'a> {
        NewHost {
            task_id: task.id,
            host,
            result,
            correlation_id: &task.correlation_id,
            source: &task.source,
            created_at,
            ended_at,
        }
    }
}

fn insert_host(
    conn: &mut DbConnection,
    task: &Task,
    host: &str,
    result: Option<&str>,
    created_at: NaiveDateTime,
    ended_at: Option<NaiveDateTime>,
) -> Result<(), DieselError> {
    diesel::insert_into(task_hosts::table)
        .values(NewHost::of(task, host, result, created_at, ended_at))
        .execute(conn)
        .map(|_| ())
}

/// Writes the current state of some hosts of a running task.
pub fn update_hosts(
    conn: &mut DbConnection,
    task_id: i64,
    hosts: &[HostState],
) -> Result<(), StoreError> {
    write_transaction(conn, |conn| {
        update_each_host(conn, task_id, hosts)?;
        Ok(())
    })
}

/// Writes these hosts' states over their rows; the states of hosts that have no row.
/// PostgreSQL takes them all in one statement (a round trip per host was most of a 5,000-node
/// task's end); SQLite, in process, one statement each.
fn update_each_host<'s>(
    conn: &mut DbConnection,
    task_id: i64,
    hosts: &'s [HostState],
) -> Result<Vec<&'s HostState>, DieselError> {
    let DbConnection::Pg(c) = conn else {
        let mut missing = Vec::new();
        for state in hosts {
            if update_host(conn, task_id, state)? == 0 {
                missing.push(state);
            }
        }
        return Ok(missing);
    };
    if hosts.is_empty() {
        return Ok(Vec::new());
    }
    use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text, Timestamp};
    #[derive(QueryableByName)]
    struct Updated {
        #[diesel(sql_type = Text)]
        host: String,
    }
    let column = |f: fn(&HostState) -> i32| hosts.iter().map(f).collect::<Vec<i32>>();
    let updated: Vec<Updated> = diesel::sql_query(
        "UPDATE task_hosts AS h SET result = COALESCE(v.result, h.result), ok = v.ok, \
         changed = v.changed, failed = v.failed, unreachable = v.unreachable, \
         skipped = v.skipped, rescued = v.rescued, ignored = v.ignored, \
         msg = COALESCE(v.msg, h.msg), created_at = COALESCE(v.created_at, h.created_at), \
         ended_at = COALESCE(v.ended_at, h.ended_at) \
         FROM unnest($2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) AS v(host, result, ok, \
         changed, failed, unreachable, skipped, rescued, ignored, msg, created_at, ended_at) \
         WHERE h.task_id = $1 AND h.host = v.host RETURNING h.host",
    )
    .bind::<BigInt, _>(task_id)
    .bind::<Array<Text>, _>(hosts.iter().map(|h| h.host.as_str()).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>(
        hosts
            .iter()
            .map(|h| h.result.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind::<Array<Integer>, _>(column(|h| h.ok))
    .bind::<Array<Integer>, _>(column(|h| h.changed))
    .bind::<Array<Integer>, _>(column(|h| h.failed))
    .bind::<Array<Integer>, _>(column(|h| h.unreachable))
    .bind::<Array<Integer>, _>(column(|h| h.skipped))
    .bind::<Array<Integer>, _>(column(|h| h.rescued))
    .bind::<Array<Integer>, _>(column(|h| h.ignored))
    .bind::<Array<Nullable<Text>>, _>(hosts.iter().map(|h| h.msg.as_deref()).collect::<Vec<_>>())
    .bind::<Array<Nullable<Timestamp>>, _>(hosts.iter().map(|h| h.created_at).collect::<Vec<_>>())
    .bind::<Array<Nullable<Timestamp>>, _>(hosts.iter().map(|h| h.ended_at).collect::<Vec<_>>())
    .load(c)?;
    let updated: std::collections::HashSet<&str> =
        updated.iter().map(|u| u.host.as_str()).collect();
    Ok(hosts
        .iter()
        .filter(|h| !updated.contains(h.host.as_str()))
        .collect())
}

fn update_host(
    conn: &mut DbConnection,
    task_id: i64,
    state: &HostState,
) -> Result<usize, DieselError> {
    diesel::update(
        task_hosts::table
            .filter(task_hosts::task_id.eq(task_id))
            .filter(task_hosts::host.eq(&state.host)),
    )
    .set(state)
    .execute(conn)
}

/// Rows of one multi-row host insert (7 binds each).
const HOST_ROWS_PER_STATEMENT: usize = 1000;

/// Rows of one multi-row event insert (7 binds each).
const EVENT_ROWS_PER_STATEMENT: usize = 500;

/// Appends events and records how far the events file has been read.
pub fn insert_events(
    conn: &mut DbConnection,
    task_id: i64,
    events: &[NewEvent],
    offset: i64,
) -> Result<(), StoreError> {
    write_transaction(conn, |conn| {
        // A retried write may find its events already stored: keep only the new ones.
        let stored: Option<i32> = task_events::table
            .filter(task_events::task_id.eq(task_id))
            .select(diesel::dsl::max(task_events::seq))
            .first(conn)?;
        let stored = stored.unwrap_or(0);
        // Events come in sequence order: the new ones are a tail.
        let new = &events[events.partition_point(|e| e.seq <= stored)..];
        // Multi-row VALUES, which MultiConnection does not offer: through the inner connection,
        // a bounded number of rows per statement (well below either backend's bind limit).
        // PostgreSQL takes them all in one binary COPY.
        match conn {
            DbConnection::Pg(c) if !new.is_empty() => {
                diesel::copy_from(task_events::table)
                    .from_insertable(new)
                    .execute(c)?;
            }
            DbConnection::Pg(_) => {}
            DbConnection::Sqlite(c) => {
                for rows in new.chunks(EVENT_ROWS_PER_STATEMENT) {
                    diesel::insert_into(task_events::table)
                        .values(rows)
                        .execute(c)?;
                }
            }
        }
        diesel::update(tasks::table.find(task_id))
            .set(tasks::events_offset.eq(offset))
            .execute(conn)?;
        Ok(())
    })
}

/// Writes a task's end: every host's final state (creating rows for nodes never reached), then the
/// status transition. False if the task had already ended (then nothing changes).
pub fn finish(conn: &mut DbConnection, fin: &Finish) -> Result<bool, StoreError> {
    write_transaction(conn, |conn| {
        let Some(task) = get_task(conn, fin.id)? else {
            return Ok(false);
        };
        if !fin.status.predecessors().contains(&task.status) {
            return Ok(false);
        }
        // A host with no event of its own ends when the task does.
        let hosts: Vec<HostState> = fin
            .hosts
            .iter()
            .map(|state| {
                let mut state = state.clone();
                state.ended_at.get_or_insert(fin.ended_at);
                state
            })
            .collect();
        for state in update_each_host(conn, task.id, &hosts)? {
            let created = state.created_at.unwrap_or(fin.ended_at);
            insert_host(
                conn,
                &task,
                &state.host,
                state.result.as_deref(),
                created,
                Some(state.ended_at.unwrap_or(fin.ended_at)),
            )?;
            update_host(conn, task.id, state)?;
        }
        let changed = diesel::update(
            tasks::table
                .find(fin.id)
                .filter(tasks::status.eq_any(fin.status.predecessors())),
        )
        .set((
            tasks::status.eq(fin.status.code()),
            tasks::err.eq(&fin.err),
            tasks::exit_code.eq(fin.exit_code),
            tasks::ended_at.eq(fin.ended_at),
            tasks::updated_at.eq(fin.ended_at),
            tasks::pid.eq(None::<i32>),
            tasks::pid_start_time.eq(None::<i64>),
            tasks::cpu_usec.eq(fin.usage.cpu_usec),
            tasks::memory_peak_bytes.eq(fin.usage.memory_peak_bytes),
        ))
        .execute(conn)?;
        Ok(changed == 1)
    })
}
