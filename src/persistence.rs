//! Persistence: the only writer to the database. It runs on one `SyncArbiter` thread, so writes
//! are applied in the order they were sent, blocking calls never touch an async thread, and a
//! task's messages (running, progress, end) land in the order the task sent them.

use actix::prelude::*;
use chrono::NaiveDateTime;
use slog::{error, Logger};

use crate::db::Pool;
use crate::store::{self, Finish, HostState, NewEvent, NewTask, StoreError};

/// The writer actor.
pub struct Persistence {
    pool: Pool,
    log: Logger,
}

impl Persistence {
    /// Starts the writer on its own thread.
    pub fn start(pool: Pool, log: Logger) -> Addr<Persistence> {
        SyncArbiter::start(1, move || Persistence {
            pool: pool.clone(),
            log: log.clone(),
        })
    }

    fn with_conn<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut crate::db::DbConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = self
            .pool
            .get()
            .map_err(StoreError::from)
            .and_then(|mut c| f(&mut c));
        if let Err(e) = &result {
            if !matches!(e, StoreError::Duplicate) {
                error!(self.log, "database write failed"; "write" => what, "error" => %e);
            }
        }
        result
    }
}

impl Actor for Persistence {
    type Context = SyncContext<Self>;
}

/// Store a new task; answers its id once committed.
#[derive(Message)]
#[rtype(result = "Result<i64, StoreError>")]
pub struct InsertTask(pub NewTask);

impl Handler<InsertTask> for Persistence {
    type Result = Result<i64, StoreError>;
    fn handle(&mut self, msg: InsertTask, _: &mut Self::Context) -> Self::Result {
        self.with_conn("insert task", |c| store::insert_task(c, &msg.0))
    }
}

/// Record that a task's process started; answers false if the task was no longer pending.
#[derive(Message)]
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
    type Result = Result<bool, StoreError>;
    fn handle(&mut self, m: MarkRunning, _: &mut Self::Context) -> Self::Result {
        self.with_conn("mark running", |c| {
            store::mark_running(
                c,
                m.task_id,
                &m.nodes,
                m.started_at,
                m.pid,
                m.pid_start_time,
                &m.instance,
            )
        })
    }
}

/// Record new events and the host states they changed.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct SaveProgress {
    pub task_id: i64,
    pub events: Vec<NewEvent>,
    pub offset: i64,
    pub hosts: Vec<HostState>,
}

impl Handler<SaveProgress> for Persistence {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, m: SaveProgress, _: &mut Self::Context) -> Self::Result {
        self.with_conn("save progress", |c| {
            if !m.events.is_empty() {
                store::insert_events(c, m.task_id, &m.events, m.offset)?;
            }
            if !m.hosts.is_empty() {
                store::update_hosts(c, m.task_id, &m.hosts)?;
            }
            Ok(())
        })
    }
}

/// Record a task's end (hosts first, then the status, in one transaction); answers false if it
/// had already ended.
#[derive(Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct FinishTask(pub Finish);

impl Handler<FinishTask> for Persistence {
    type Result = Result<bool, StoreError>;
    fn handle(&mut self, m: FinishTask, _: &mut Self::Context) -> Self::Result {
        self.with_conn("finish task", |c| store::finish(c, &m.0))
    }
}
