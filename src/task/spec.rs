//! What a task is to its actor: the stored task it runs, where its process comes from, and
//! what it reports to the supervisor.

use actix::prelude::*;
use chrono::NaiveDateTime;
use serde_json::{Map, Value};

use crate::ansible::events::{Ending, Hosts};
use crate::status::Status;
use crate::store::persistence::MarkRunning;
use crate::store::{Finish, Task};

/// Everything needed to run a stored task.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub id: i64,
    pub name: String,
    pub nodes: Vec<String>,
    pub remote_user: String,
    pub content: String,
    pub params: Map<String, Value>,
    pub forks: u32,
    pub correlation_id: String,
    pub source: String,
    /// When the task was stored (its queue wait starts here).
    pub created_at: NaiveDateTime,
}

impl TaskSpec {
    /// The spec of a stored task (after a restart).
    pub fn from_row(task: &Task) -> Result<TaskSpec, String> {
        let nodes: Vec<String> =
            serde_json::from_str(&task.nodes).map_err(|e| format!("nodes: {e}"))?;
        // `null`: not stored (store_params = false); an adopted task no longer needs them.
        let params: Option<Map<String, Value>> =
            serde_json::from_str(&task.params).map_err(|e| format!("params: {e}"))?;
        let params = params.unwrap_or_default();
        Ok(TaskSpec {
            id: task.id,
            name: task.name.clone(),
            nodes,
            remote_user: task.remote_user.clone(),
            content: task.content.clone(),
            params,
            forks: u32::try_from(task.forks).unwrap_or(1).max(1),
            correlation_id: task.correlation_id.clone(),
            source: task.source.clone(),
            created_at: task.created_at,
        })
    }
}

/// `err` of a task killed at its time limit.
pub fn timeout_err(secs: u64) -> String {
    format!("killed after running past its time limit of {secs} s")
}

/// The end of a task that has no run of its own to report (stopped while pending, never
/// readable, or ended for an agent that was lost): every node ends as `ending` says, with no exit
/// code and nothing measured.
pub fn end_without_run(
    id: i64,
    nodes: &[String],
    status: Status,
    ending: Ending,
    err: String,
) -> Finish {
    Finish {
        id,
        status,
        err: Some(err),
        exit_code: None,
        ended_at: crate::time::now(),
        hosts: Hosts::new(nodes).finish(ending),
        usage: Default::default(),
    }
}

/// What a TaskActor tells its supervisor (through a `Recipient`, so this module does not depend
/// on the supervisor's).
#[derive(Message)]
#[rtype(result = "()")]
pub enum TaskReport {
    /// Its process started (the same record it sent to Persistence).
    Started(MarkRunning),
    /// It ended; `unrecorded` is the end the database did not take (the reconciler writes it).
    Ended { id: i64, unrecorded: Option<Finish> },
    /// The actor went away without recording an end (its code panicked); `killed` if the task's
    /// process group was killed then.
    Lost { id: i64, killed: bool },
}

/// Where the task's process comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Start `ansible-playbook` now.
    Spawn,
    /// A process started by an earlier server: follow it (or record its end if it is gone).
    Adopt {
        pid: i32,
        start_time: i64,
        /// Bytes of events.jsonl already stored.
        stored_offset: u64,
    },
}
