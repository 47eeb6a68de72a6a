//! The messages the writer answers: a new task (inserted at once, never retried) and the ordered
//! writes of running tasks (queued, retried while the database is away).

use actix::prelude::*;
use chrono::NaiveDateTime;
use slog::warn;

use super::{Persistence, Write};
use crate::store::{self, Finish, HostState, NewEvent, NewTask, StoreError};

/// Store a new task; answers its id once committed. Not queued, not retried.
#[derive(Message)]
#[rtype(result = "Result<i64, StoreError>")]
pub struct InsertTask(pub NewTask);

impl Handler<InsertTask> for Persistence {
    type Result = ResponseFuture<Result<i64, StoreError>>;
    fn handle(&mut self, msg: InsertTask, _: &mut Context<Self>) -> Self::Result {
        let pool = self.pool.clone();
        let log = self.log.clone();
        let log_notify = self.log.clone();
        Box::pin(async move {
            let result = tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                let id = store::insert_task(&mut conn, &msg.0)?;
                if msg.0.agent.is_none() {
                    // Unclaimed: wake every agent of the shared queue (a lost one is covered by
                    // their claims every second).
                    if let Err(e) = crate::store::notify::queue(&mut conn) {
                        warn!(log_notify, "stored a task but cannot wake the other agents; they claim it within a second"; "error" => %e);
                    }
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

/// Record who first asked to stop a live task, and through what. Not queued, not retried: the
/// stop itself does not wait for it (a failure is logged).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct RecordStopRequest {
    pub task_id: i64,
    pub by: String,
    pub via: String,
}

impl Handler<RecordStopRequest> for Persistence {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: RecordStopRequest, _: &mut Context<Self>) -> Self::Result {
        let pool = self.pool.clone();
        let log = self.log.clone();
        Box::pin(async move {
            let id = msg.task_id;
            let written = tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                store::record_stop_request(&mut conn, msg.task_id, &msg.by, &msg.via)
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Unavailable(e.to_string())));
            if let Err(e) = written {
                warn!(log, "cannot record who asked to stop a task"; "task_id" => id, "error" => %e);
            }
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
    /// Its mark on the nodes (`tasks.remote_mark`), when known.
    pub remote_mark: Option<String>,
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
