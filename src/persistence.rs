//! Persistence: the only writer to the database.
//!
//! Task writes (running, progress, end) go through one ordered queue and are applied one at a time
//! on the blocking pool, so they land in the order they were sent. A write that fails because the
//! database is away (restart, network) stays at the head of the queue and is retried with backoff
//! until it lands or `db_retry_secs` have passed; the writes behind it wait their turn, so nothing
//! is reordered or lost. The queue stays small: a TaskActor has at most one progress write in
//! flight (the rest of its events wait in its `events.jsonl`, which is the real buffer).
//!
//! New tasks are inserted outside the queue and never retried: `/api/run` must answer at once,
//! `database unavailable, retry later`, rather than queue a task the caller was told failed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::NaiveDateTime;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use slog::{error, info, warn, Logger};
use tokio::sync::oneshot;

use crate::db::{DbConnection, Pool};
use crate::store::{self, Finish, HostState, NewEvent, NewTask, StoreError};

/// First retry delay; doubled after each failure up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(3);

/// Whether the last write (or probe) reached the database. Shared with `/readyz`.
#[derive(Debug, Default)]
pub struct DbHealth(AtomicBool);

impl DbHealth {
    /// A health flag that starts "up".
    pub fn new() -> Arc<DbHealth> {
        Arc::new(DbHealth(AtomicBool::new(true)))
    }
    /// Whether the database answered last time.
    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, up: bool) -> bool {
        self.0.swap(up, Ordering::Relaxed)
    }
}

/// One ordered write.
#[derive(Debug, Clone)]
enum Write {
    Running(MarkRunning),
    Progress(SaveProgress),
    Finish(Finish),
    /// Nothing to write: answers once every write before it has landed.
    Barrier,
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
    retry_for: Duration,
    queue: VecDeque<Queued>,
    busy: bool,
    backoff: Duration,
}

impl Persistence {
    /// A writer over `pool`; a queued write is given up after `retry_for` of failures.
    pub fn new(pool: Pool, log: Logger, health: Arc<DbHealth>, retry_for: Duration) -> Self {
        Persistence {
            pool,
            log,
            health,
            retry_for,
            queue: VecDeque::new(),
            busy: false,
            backoff: MIN_BACKOFF,
        }
    }

    fn enqueue(
        &mut self,
        write: Write,
        ctx: &mut Context<Self>,
    ) -> ResponseFuture<Result<bool, StoreError>> {
        let (reply, rx) = oneshot::channel();
        self.queue.push_back(Queued {
            write,
            reply,
            since: Instant::now(),
        });
        self.pump(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the writer stopped".into())))
        })
    }

    /// Applies the head of the queue, then the next, until the queue is empty or a write fails.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let Some(head) = self.queue.front() else {
            return;
        };
        self.busy = true;
        let write = head.write.clone();
        let pool = self.pool.clone();
        let job = async move {
            tokio::task::spawn_blocking(move || apply(&pool, &write))
                .await
                .unwrap_or_else(|e| Err(StoreError::Unavailable(e.to_string())))
        };
        ctx.spawn(job.into_actor(self).map(|result, act, ctx| {
            act.busy = false;
            match result {
                Err(e) if retryable(&e) && act.queue.front().is_some_and(|q| q.since.elapsed() < act.retry_for) => {
                    if act.health.set(false) {
                        warn!(act.log, "database write failed, holding writes and retrying"; "error" => %e, "queued" => act.queue.len());
                    }
                    let delay = act.backoff;
                    act.backoff = (act.backoff * 2).min(MAX_BACKOFF);
                    ctx.run_later(delay, |act, ctx| act.pump(ctx));
                }
                result => {
                    act.backoff = MIN_BACKOFF;
                    if let Err(e) = &result {
                        error!(act.log, "database write given up"; "error" => %e);
                    } else if !act.health.set(true) {
                        info!(act.log, "database reachable again, writes resumed"; "queued" => act.queue.len());
                    }
                    if let Some(done) = act.queue.pop_front() {
                        let _ = done.reply.send(result);
                    }
                    act.pump(ctx);
                }
            }
        }));
    }
}

/// Errors that a later attempt may not see: everything but a refused row.
fn retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Duplicate => false,
        StoreError::Unavailable(_) => true,
        StoreError::Query(DieselError::DatabaseError(kind, _)) => !matches!(
            kind,
            DatabaseErrorKind::UniqueViolation
                | DatabaseErrorKind::ForeignKeyViolation
                | DatabaseErrorKind::NotNullViolation
                | DatabaseErrorKind::CheckViolation
        ),
        StoreError::Query(DieselError::NotFound) => false,
        StoreError::Query(_) => true,
    }
}

fn apply(pool: &Pool, write: &Write) -> Result<bool, StoreError> {
    let mut conn = pool.get()?;
    let c: &mut DbConnection = &mut conn;
    match write {
        Write::Running(m) => store::mark_running(
            c,
            m.task_id,
            &m.nodes,
            m.started_at,
            m.pid,
            m.pid_start_time,
            &m.instance,
        ),
        Write::Progress(p) => {
            if !p.events.is_empty() {
                store::insert_events(c, p.task_id, &p.events, p.offset)?;
            }
            if !p.hosts.is_empty() {
                store::update_hosts(c, p.task_id, &p.hosts)?;
            }
            Ok(true)
        }
        Write::Finish(f) => store::finish(c, f),
        Write::Barrier => Ok(true),
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
                store::insert_task(&mut conn, &msg.0)
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
    pub instance: String,
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

/// Number of writes waiting (for tests and `/readyz`).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct QueueLen;

impl Handler<QueueLen> for Persistence {
    type Result = usize;
    fn handle(&mut self, _: QueueLen, _: &mut Context<Self>) -> usize {
        self.queue.len()
    }
}
