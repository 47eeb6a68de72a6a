//! Persistence: the only writer to the database.
//!
//! Task writes (running, progress, end, repairs) go through one ordered queue and are applied one
//! at a time on the blocking pool, so they land in the order they were sent. Every write is
//! cleaned first ([`crate::store::clean`]): nothing a playbook prints can make a row unstorable.
//!
//! A failed write is classified, and only unavailability is retried:
//!
//! - **The database is away** (pool timeout, closed connection, a connection that no longer
//!   answers, SQLite busy or I/O errors, a read-only PostgreSQL during failover): the write stays at
//!   the head of the queue and is retried with backoff until it lands or `db_retry_secs` have
//!   passed; the writes behind it wait, so nothing is reordered.
//! - **The database refused the data** (constraint and data errors, a trigger's refusal, anything
//!   else while the same connection still answers `SELECT 1`): never retried. The write is
//!   repaired at once, part by part: an event that is refused is replaced by an `event_dropped`
//!   marker, a host row without its message, an end without its details (see [`repair`]). Each
//!   dropped part is logged and counted ([`DbHealth::repaired`], shown by `/readyz`), and the writes
//!   behind it go on at once.
//!
//! New tasks are inserted outside the queue and never retried: `/api/run` must answer at once,
//! `database unavailable, retry later`, rather than queue a task the caller was told failed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::NaiveDateTime;
use diesel::connection::SimpleConnection;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use slog::{error, info, warn, Logger};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::store::clean::Clean;
use crate::store::db::{DbConnection, Pool};
use crate::store::{self, Finish, HostState, NewEvent, NewTask, StoreError};

/// First retry delay; doubled after each failure up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(3);
/// Most writes applied in one transaction, and most events among them: queued writes are
/// committed together (one round of BEGIN/COMMIT and one trip to the blocking pool for all).
const MAX_BATCH_WRITES: usize = 64;
const MAX_BATCH_EVENTS: usize = 20_000;
/// Longest database message quoted in a repair marker or log line.
const MAX_REASON: usize = 300;

/// What the writer knows of the database, shared with `/readyz`.
#[derive(Debug, Default)]
pub struct DbHealth {
    up: AtomicBool,
    repaired: AtomicU64,
}

impl DbHealth {
    /// A health record that starts "up" with nothing repaired.
    pub fn new() -> Arc<DbHealth> {
        Arc::new(DbHealth {
            up: AtomicBool::new(true),
            repaired: AtomicU64::new(0),
        })
    }
    /// Parts of writes the database refused and that were dropped or replaced by a marker.
    pub fn repaired(&self) -> u64 {
        self.repaired.load(Ordering::Relaxed)
    }
    fn set(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::Relaxed)
    }
}

/// One ordered write.
#[derive(Debug, Clone)]
enum Write {
    Running(MarkRunning),
    Progress(SaveProgress),
    Finish(Finish),
    Repair(Vec<Truth>),
    /// Nothing to write: answers once every write before it has landed.
    Barrier,
}

impl Write {
    fn clean(&mut self) {
        match self {
            Write::Running(_) | Write::Barrier => {}
            Write::Progress(p) => {
                p.events.clean();
                p.hosts.clean();
            }
            Write::Finish(f) => f.clean(),
            Write::Repair(truths) => {
                for truth in truths {
                    if let Truth::Ended(f) = truth {
                        f.clean();
                    }
                }
            }
        }
    }
}

struct Queued {
    write: Write,
    reply: oneshot::Sender<Result<bool, StoreError>>,
    since: Instant,
}

/// The writer actor.
pub struct Persistence {
    pool: Pool,
    log: Logger,
    health: Arc<DbHealth>,
    metrics: Arc<Metrics>,
    /// Bumped after each commit of events or an end: event streams read again.
    committed: tokio::sync::watch::Sender<u64>,
    /// Shared queue: every end and every unclaimed insert sends `NOTIFY downlink_queue`.
    notify: bool,
    retry_for: Duration,
    queue: VecDeque<Queued>,
    busy: bool,
    backoff: Duration,
    /// Writes to apply one at a time (with retries and repairs) after a batch of them failed.
    singles: usize,
}

impl Persistence {
    /// A writer over `pool`; a queued write is given up after `retry_for` of failures.
    pub fn new(
        pool: Pool,
        log: Logger,
        health: Arc<DbHealth>,
        metrics: Arc<Metrics>,
        committed: tokio::sync::watch::Sender<u64>,
        retry_for: Duration,
    ) -> Self {
        Persistence {
            pool,
            log,
            health,
            metrics,
            committed,
            notify: false,
            retry_for,
            queue: VecDeque::new(),
            busy: false,
            backoff: MIN_BACKOFF,
            singles: 0,
        }
    }

    /// With the shared queue: ends and unclaimed inserts wake every agent.
    pub fn with_notify(mut self, notify: bool) -> Persistence {
        self.notify = notify;
        self
    }

    fn enqueue(
        &mut self,
        mut write: Write,
        ctx: &mut Context<Self>,
    ) -> ResponseFuture<Result<bool, StoreError>> {
        write.clean();
        let (reply, rx) = oneshot::channel();
        self.queue.push_back(Queued {
            write,
            reply,
            since: Instant::now(),
        });
        self.metrics.write_queue(self.queue.len());
        self.pump(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the writer stopped".into())))
        })
    }

    /// Takes the head of the queue off, counts what it committed and answers its sender.
    fn answer(&mut self, result: Result<bool, StoreError>) {
        let Some(done) = self.queue.pop_front() else {
            return;
        };
        self.metrics.write_queue(self.queue.len());
        match (&done.write, &result) {
            (Write::Progress(p), Ok(_)) => self.metrics.events(
                p.events.len(),
                p.events
                    .iter()
                    .filter(|e| e.kind == "events_truncated")
                    .count(),
            ),
            (Write::Finish(f), Ok(true)) => self
                .metrics
                .finished(f.status, f.hosts.iter().filter_map(|h| h.result.as_deref())),
            _ => {}
        }
        if matches!(done.write, Write::Progress(_) | Write::Finish(_)) {
            self.committed.send_modify(|n| *n = n.wrapping_add(1));
        }
        let _ = done.reply.send(result);
    }

    /// How many writes from the head of the queue go into the next transaction.
    fn batch_len(&self) -> usize {
        if self.singles > 0 {
            return 1;
        }
        let mut events = 0;
        let mut n = 0;
        for q in self.queue.iter().take(MAX_BATCH_WRITES) {
            events += match &q.write {
                Write::Progress(p) => p.events.len(),
                _ => 1,
            };
            if n > 0 && events > MAX_BATCH_EVENTS {
                break;
            }
            n += 1;
        }
        n
    }

    /// Applies the writes at the head of the queue in one transaction. If that fails, each of them
    /// is applied again on its own (where failures are retried or repaired).
    fn pump_batch(&mut self, n: usize, ctx: &mut Context<Self>) {
        self.busy = true;
        let writes: Vec<Write> = self.queue.iter().take(n).map(|q| q.write.clone()).collect();
        let pool = self.pool.clone();
        let notify = self.notify;
        let job = async move {
            tokio::task::spawn_blocking(move || apply_batch(&pool, &writes, notify))
                .await
                .ok()
                .flatten()
        };
        ctx.spawn(job.into_actor(self).map(move |applied, act, ctx| {
            act.busy = false;
            match applied {
                Some(results) => {
                    if !act.health.set(true) {
                        info!(act.log, "database reachable again, writes resumed"; "queued" => act.queue.len());
                    }
                    for result in results {
                        act.answer(Ok(result));
                    }
                }
                None => act.singles = n,
            }
            act.pump(ctx);
        }));
    }

    /// Applies the head of the queue, then the next, until the queue is empty or a write fails
    /// because the database is away.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let n = self.batch_len();
        if n > 1 {
            self.pump_batch(n, ctx);
            return;
        }
        let Some(head) = self.queue.front() else {
            return;
        };
        self.busy = true;
        let write = head.write.clone();
        let pool = self.pool.clone();
        let notify = self.notify;
        let job = async move {
            tokio::task::spawn_blocking(move || apply(&pool, &write, notify))
                .await
                .unwrap_or_else(|e| Applied::away(StoreError::Unavailable(e.to_string())))
        };
        ctx.spawn(job.into_actor(self).map(|applied, act, ctx| {
            act.busy = false;
            for part in &applied.repairs {
                act.health.repaired.fetch_add(1, Ordering::Relaxed);
                error!(act.log, "the database refused part of a write; dropped it and went on"; "part" => part);
            }
            match applied.result {
                Err(e) if applied.away && act.queue.front().is_some_and(|q| q.since.elapsed() < act.retry_for) => {
                    if act.health.set(false) {
                        warn!(act.log, "database write failed, holding writes and retrying"; "error" => %e, "queued" => act.queue.len());
                    }
                    act.metrics.write_retry();
                    let delay = act.backoff;
                    act.backoff = (act.backoff * 2).min(MAX_BACKOFF);
                    ctx.run_later(delay, |act, ctx| act.pump(ctx));
                }
                result => {
                    act.backoff = MIN_BACKOFF;
                    if let Err(e) = &result {
                        error!(act.log, "database write given up"; "error" => %e, "database_away" => applied.away);
                    } else if !act.health.set(true) {
                        info!(act.log, "database reachable again, writes resumed"; "queued" => act.queue.len());
                    }
                    act.answer(result);
                    act.singles = act.singles.saturating_sub(1);
                    act.pump(ctx);
                }
            }
        }));
    }
}

/// What became of one write.
struct Applied {
    result: Result<bool, StoreError>,
    /// The database was away: worth retrying.
    away: bool,
    /// Parts the database refused, dropped or replaced by a marker (one line each).
    repairs: Vec<String>,
}

impl Applied {
    fn away(e: StoreError) -> Applied {
        Applied {
            result: Err(e),
            away: true,
            repairs: Vec::new(),
        }
    }
}

/// Why a statement failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The database (or the way to it) is away: a later attempt may succeed.
    Away,
    /// The database answered and refused this data: the same write will always fail.
    Refused,
}

/// Classifies `e`; `conn` is the connection it happened on, probed when the error alone does not
/// say (diesel gives PostgreSQL's data exceptions, class 22, and trigger refusals no kind of their
/// own, and SQLite's trigger refusals likewise).
fn classify(conn: &mut DbConnection, e: &StoreError) -> Class {
    use DatabaseErrorKind as K;
    let answers = |conn: &mut DbConnection| {
        if conn.batch_execute("SELECT 1").is_ok() {
            Class::Refused
        } else {
            Class::Away
        }
    };
    match e {
        StoreError::Duplicate => Class::Refused,
        StoreError::Unavailable(_) => Class::Away,
        StoreError::Query(DieselError::DatabaseError(kind, info)) => match kind {
            K::ClosedConnection
            | K::UnableToSendCommand
            | K::SerializationFailure
            | K::ReadOnlyTransaction => Class::Away,
            K::UniqueViolation
            | K::ForeignKeyViolation
            | K::NotNullViolation
            | K::CheckViolation
            | K::RestrictViolation
            | K::ExclusionViolation => Class::Refused,
            _ if sqlite_transient(info.message()) => Class::Away,
            _ => answers(conn),
        },
        StoreError::Query(
            DieselError::NotFound
            | DieselError::SerializationError(_)
            | DieselError::DeserializationError(_)
            | DieselError::QueryBuilderError(_),
        ) => Class::Refused,
        StoreError::Query(_) => answers(conn),
    }
}

/// SQLite's messages for a database that is busy, locked or cannot be read or written just now.
fn sqlite_transient(message: &str) -> bool {
    const TRANSIENT: [&str; 5] = [
        "database is locked",
        "database table is locked",
        "disk I/O error",
        "database or disk is full",
        "unable to open database file",
    ];
    TRANSIENT.iter().any(|t| message.contains(t))
}

fn reason(e: &StoreError) -> String {
    crate::store::clean::text(&e.to_string())
        .chars()
        .take(MAX_REASON)
        .collect()
}

fn apply(pool: &Pool, write: &Write, notify: bool) -> Applied {
    let mut conn = match pool.get() {
        Ok(conn) => conn,
        Err(e) => return Applied::away(e.into()),
    };
    let c: &mut DbConnection = &mut conn;
    let mut repairs = Vec::new();
    let result = match run(c, write, notify) {
        Ok(v) => Ok(v),
        Err(e) if classify(c, &e) == Class::Away => return Applied::away(e),
        Err(e) => repair(c, write, &e, &mut repairs),
    };
    let away = match &result {
        Err(e) => classify(c, e) == Class::Away,
        Ok(_) => false,
    };
    Applied {
        result,
        away,
        repairs,
    }
}

/// Every write in one transaction; `None` if any of them (or the commit) failed, and then none
/// of them is stored.
fn apply_batch(pool: &Pool, writes: &[Write], notify: bool) -> Option<Vec<bool>> {
    let mut conn = pool.get().ok()?;
    store::in_one_transaction(&mut conn, |c| {
        writes.iter().map(|w| run(c, w, notify)).collect()
    })
    .ok()
}

fn run(c: &mut DbConnection, write: &Write, notify: bool) -> Result<bool, StoreError> {
    match write {
        Write::Running(m) => store::mark_running(
            c,
            m.task_id,
            &m.nodes,
            m.started_at,
            m.pid,
            m.pid_start_time,
            &m.instance,
            m.forks,
        ),
        Write::Progress(p) => {
            store::insert_events(c, p.task_id, &p.events, p.offset)?;
            if !p.hosts.is_empty() {
                store::update_hosts(c, p.task_id, &p.hosts)?;
            }
            Ok(true)
        }
        Write::Finish(f) => {
            let ended = store::finish(c, f)?;
            if ended && notify {
                // In the batch's transaction (sent at its commit), else right after the end's.
                crate::store::notify::queue(c)?;
            }
            Ok(ended)
        }
        Write::Repair(truths) => {
            for truth in truths {
                repair_row(c, truth)?;
            }
            Ok(true)
        }
        Write::Barrier => Ok(true),
    }
}

/// Writes a refused write again in smaller parts, dropping (or replacing with a marker) each part
/// the database still refuses. An error here is returned as the write's result.
fn repair(
    c: &mut DbConnection,
    write: &Write,
    first: &StoreError,
    repairs: &mut Vec<String>,
) -> Result<bool, StoreError> {
    match write {
        Write::Progress(p) => {
            for event in &p.events {
                let one = std::slice::from_ref(event);
                let Err(e) = store::insert_events(c, p.task_id, one, p.offset) else {
                    continue;
                };
                if classify(c, &e) == Class::Away {
                    return Err(e);
                }
                let marker = NewEvent {
                    kind: "event_dropped".into(),
                    host: None,
                    task_name: None,
                    payload: serde_json::json!({
                        "event": "event_dropped", "kind": &event.kind, "reason": reason(&e),
                    })
                    .to_string(),
                    ..event.clone()
                };
                repairs.push(format!(
                    "task {} event {} ({}): {}",
                    p.task_id,
                    event.seq,
                    event.kind,
                    reason(&e)
                ));
                if let Err(e) = store::insert_events(c, p.task_id, &[marker], p.offset) {
                    repairs.push(format!(
                        "task {} event {} marker: {}",
                        p.task_id,
                        event.seq,
                        reason(&e)
                    ));
                }
            }
            store::insert_events(c, p.task_id, &[], p.offset)?;
            for host in &p.hosts {
                if let Err(e) = store::update_hosts(c, p.task_id, std::slice::from_ref(host)) {
                    if classify(c, &e) == Class::Away {
                        return Err(e);
                    }
                    repairs.push(format!(
                        "task {} host {} progress: {}",
                        p.task_id,
                        host.host,
                        reason(&e)
                    ));
                    let bare = HostState {
                        msg: None,
                        ..host.clone()
                    };
                    if let Err(e) = store::update_hosts(c, p.task_id, &[bare]) {
                        repairs.push(format!(
                            "task {} host {} counters: {}",
                            p.task_id,
                            host.host,
                            reason(&e)
                        ));
                    }
                }
            }
            Ok(true)
        }
        Write::Running(m) => {
            repairs.push(format!(
                "task {} host rows at start: {}",
                m.task_id,
                reason(first)
            ));
            let bare = MarkRunning {
                nodes: Vec::new(),
                ..m.clone()
            };
            run(c, &Write::Running(bare), false)
        }
        Write::Finish(f) => {
            let plain = plain_end(f, first);
            repairs.push(format!("task {} end details: {}", f.id, reason(first)));
            match store::finish(c, &plain) {
                Err(e) if classify(c, &e) == Class::Refused => {
                    repairs.push(format!("task {} host rows at end: {}", f.id, reason(&e)));
                    store::finish(
                        c,
                        &Finish {
                            hosts: Vec::new(),
                            ..plain
                        },
                    )
                }
                other => other,
            }
        }
        Write::Repair(truths) => {
            for truth in truths {
                if let Err(e) = repair_row(c, truth) {
                    if classify(c, &e) == Class::Away {
                        return Err(e);
                    }
                    let (id, plain) = match truth {
                        Truth::Running(m) => (
                            m.task_id,
                            Truth::Running(MarkRunning {
                                nodes: Vec::new(),
                                ..m.clone()
                            }),
                        ),
                        Truth::Ended(f) => (
                            f.id,
                            Truth::Ended(Finish {
                                hosts: Vec::new(),
                                ..plain_end(f, &e)
                            }),
                        ),
                    };
                    repairs.push(format!("task {id} repair: {}", reason(&e)));
                    if let Err(e) = repair_row(c, &plain) {
                        repairs.push(format!("task {id} plain repair: {}", reason(&e)));
                    }
                }
            }
            Ok(true)
        }
        Write::Barrier => Ok(true),
    }
}

/// The end of a task without what the database refused: host messages dropped and `err` replaced
/// by a sentence that says so.
fn plain_end(f: &Finish, refused: &StoreError) -> Finish {
    Finish {
        err: f.err.as_ref().map(|_| {
            format!(
                "{}; the details of this end could not be stored: {}",
                f.status.name(),
                reason(refused)
            )
        }),
        hosts: f
            .hosts
            .iter()
            .map(|h| HostState {
                msg: None,
                ..h.clone()
            })
            .collect(),
        ..f.clone()
    }
}

/// Brings one row up to what the supervisor knows, if it is behind.
fn repair_row(c: &mut DbConnection, truth: &Truth) -> Result<bool, StoreError> {
    match truth {
        Truth::Running(m) => {
            let behind = store::get_task(c, m.task_id)?.is_some_and(|t| t.status == 1);
            if !behind {
                return Ok(false);
            }
            run(c, &Write::Running(m.clone()), false)
        }
        Truth::Ended(f) => store::finish(c, f),
    }
}

impl Actor for Persistence {
    type Context = Context<Self>;
}

/// Store a new task; answers its id once committed. Not queued, not retried.
#[derive(Message)]
#[rtype(result = "Result<i64, StoreError>")]
pub struct InsertTask(pub NewTask);

impl Handler<InsertTask> for Persistence {
    type Result = ResponseFuture<Result<i64, StoreError>>;
    fn handle(&mut self, msg: InsertTask, _: &mut Context<Self>) -> Self::Result {
        let pool = self.pool.clone();
        let log = self.log.clone();
        Box::pin(async move {
            let result = tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                let id = store::insert_task(&mut conn, &msg.0)?;
                if msg.0.agent.is_none() {
                    // Unclaimed: wake every agent of the shared queue (a lost one is covered by
                    // their claims every second).
                    let _ = crate::store::notify::queue(&mut conn);
                }
                Ok(id)
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Unavailable(e.to_string())));
            if let Err(e) = &result {
                if !matches!(e, StoreError::Duplicate) {
                    warn!(log, "cannot store a new task"; "error" => %e);
                }
            }
            result
        })
    }
}

/// Record that a task's process started; answers false if the task was no longer pending.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct MarkRunning {
    pub task_id: i64,
    pub nodes: Vec<String>,
    pub started_at: NaiveDateTime,
    pub pid: i32,
    pub pid_start_time: i64,
    /// Run-directory root the task runs under.
    pub instance: String,
    /// Forks it runs with (`--forks`), recorded in `tasks.forks`.
    pub forks: u32,
}

impl Handler<MarkRunning> for Persistence {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, m: MarkRunning, ctx: &mut Context<Self>) -> Self::Result {
        self.enqueue(Write::Running(m), ctx)
    }
}

/// Record new events, how far the events file has been read, and the host states they changed.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct SaveProgress {
    pub task_id: i64,
    pub events: Vec<NewEvent>,
    pub offset: i64,
    pub hosts: Vec<HostState>,
}

impl Handler<SaveProgress> for Persistence {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, m: SaveProgress, ctx: &mut Context<Self>) -> Self::Result {
        self.enqueue(Write::Progress(m), ctx)
    }
}

/// Record a task's end (hosts first, then the status, in one transaction); answers false if it
/// had already ended.
#[derive(Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct FinishTask(pub Finish);

impl Handler<FinishTask> for Persistence {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, m: FinishTask, ctx: &mut Context<Self>) -> Self::Result {
        self.enqueue(Write::Finish(m.0), ctx)
    }
}

/// Answers once every write sent before it has landed (or been given up).
#[derive(Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct Flush;

impl Handler<Flush> for Persistence {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) -> Self::Result {
        self.enqueue(Write::Barrier, ctx)
    }
}

/// What the supervisor knows of a task that its row may be behind on.
#[derive(Debug, Clone)]
pub enum Truth {
    /// Its process started.
    Running(MarkRunning),
    /// It ended so.
    Ended(Finish),
}

impl Truth {
    /// The task it is about.
    pub fn task_id(&self) -> i64 {
        match self {
            Truth::Running(m) => m.task_id,
            Truth::Ended(f) => f.id,
        }
    }
}

/// Bring rows that are behind up to these truths (rows already there are left alone); queued
/// like every write, so it never overtakes one sent before it.
#[derive(Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct Repair(pub Vec<Truth>);

impl Handler<Repair> for Persistence {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, m: Repair, ctx: &mut Context<Self>) -> Self::Result {
        self.enqueue(Write::Repair(m.0), ctx)
    }
}
