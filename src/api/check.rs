//! `/api/check`: a task's status, with its host records and nodes as JSON encoded in strings.

use actix_web::{web, HttpResponse};
use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::fields::id_and_name;
use super::{read_either, success, ApiError, ApiRequest, AppState};
use crate::store::{self, HostRow, TaskSummary};
use crate::supervisor::WhereInQueue;
use crate::time;

/// The `content` of a check answer, keys in the contract's order.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CheckContent {
    /// HTTP date, e.g. `Wed, 17 Aug 2016 18:38:17 GMT`.
    pub create_time: String,
    /// Why the task failed, timed out, was stopped or interrupted.
    pub err: Option<String>,
    pub id: i64,
    /// JSON encoded in a string: the per-host records.
    pub log: String,
    /// JSON encoded in a string: the nodes.
    pub nodes: String,
    /// 1 pending, 2 running, 3 failed, 4 success, 5 stopped, 6 timeout, 7 interrupted.
    #[schema(minimum = 1, maximum = 7)]
    pub status: i32,
    /// HTTP date of the last change.
    pub update_time: String,
    /// While pending: 1 for the next task to start, 2 behind it, and so on; otherwise null.
    /// Additive (not in the original contract).
    pub queue_position: Option<usize>,
    /// While pending, what the task waits for, e.g. `needs 5 forks, 2 of 50 free; 3 tasks ahead`;
    /// otherwise null. Additive.
    pub waiting_for: Option<String>,
    /// HTTP date the task started running, null before. Additive.
    pub started_time: Option<String>,
    /// HTTP date the task ended, null before. Additive.
    pub end_time: Option<String>,
    /// The `agent_name` of the agent that runs or ran the task; null while it is pending.
    /// Additive.
    pub agent: Option<String>,
}

/// One element of `log` (and of `hosts` in `GET /api/tasks/{id}`); the CLI reads it back.
#[derive(Debug, Serialize, Deserialize)]
pub struct HostRecord<'a> {
    pub host: Cow<'a, str>,
    pub result: Cow<'a, str>,
    pub ok: i32,
    pub changed: i32,
    pub failed: i32,
    pub unreachable: i32,
    pub skipped: i32,
    pub rescued: i32,
    pub ignored: i32,
    pub create_time: String,
    pub end_time: Option<String>,
    pub msg: Option<Cow<'a, str>>,
}

impl<'a> From<&'a HostRow> for HostRecord<'a> {
    fn from(r: &'a HostRow) -> Self {
        HostRecord {
            host: Cow::Borrowed(&r.host),
            result: Cow::Borrowed(r.result.as_deref().unwrap_or("running")),
            ok: r.ok,
            changed: r.changed,
            failed: r.failed,
            unreachable: r.unreachable,
            skipped: r.skipped,
            rescued: r.rescued,
            ignored: r.ignored,
            create_time: time::rfc3339(r.created_at),
            end_time: r.result.as_ref().and(r.ended_at).map(time::rfc3339),
            msg: r.msg.as_deref().map(Cow::Borrowed),
        }
    }
}

/// The task with this id if it also has this name.
pub async fn find(
    state: &AppState,
    log: &slog::Logger,
    id: i64,
    name: String,
) -> Result<(TaskSummary, Vec<HostRow>), ApiError> {
    let pooled = name.clone();
    let found = read_either(
        state,
        log,
        |c| async move { crate::store::readers::task_with_hosts(&c, id, &name).await },
        move |c| store::task_with_hosts(c, id, &pooled),
    )
    .await?;
    found.ok_or(ApiError::NotFound)
}

/// POST /api/check
pub async fn handle(state: web::Data<AppState>, req: ApiRequest) -> Result<HttpResponse, ApiError> {
    let ApiRequest { body, log, .. } = req;
    let (id, name) = id_and_name(&body)?;
    let (task, hosts) = find(&state, &log, id, name).await?;
    let pending = task.status == crate::status::Status::Pending.code();
    let place = match (pending, state.settings.shared_queue) {
        (true, false) => Some(
            state
                .supervisor
                .send(WhereInQueue(id))
                .await
                .ok()
                .flatten()
                .unwrap_or(crate::supervisor::QueuePlace {
                    position: None,
                    waiting_for: "the server is starting or shutting down".to_owned(),
                }),
        ),
        (true, true) => shared_place(&state, &log, &task).await,
        (false, _) => None,
    };
    let records: Vec<HostRecord> = hosts.iter().map(HostRecord::from).collect();
    Ok(success(CheckContent {
        create_time: time::http_date(task.created_at),
        err: task.err,
        id: task.id,
        log: serde_json::to_string(&records).unwrap_or_else(|_| "[]".into()),
        nodes: task.nodes,
        status: task.status,
        update_time: time::http_date(task.updated_at),
        queue_position: place.as_ref().and_then(|p| p.position),
        waiting_for: place.map(|p| p.waiting_for),
        started_time: task.started_at.map(time::http_date),
        end_time: task.ended_at.map(time::http_date),
        agent: task.agent.filter(|_| !pending),
    }))
}

/// A pending task's place in the shared queue (`shared_queue`), read from the table: unclaimed
/// tasks before it, or the agent that claimed it and is starting it.
async fn shared_place(
    state: &AppState,
    log: &slog::Logger,
    task: &TaskSummary,
) -> Option<crate::supervisor::QueuePlace> {
    if let Some(agent) = &task.agent {
        return Some(crate::supervisor::QueuePlace {
            position: Some(1),
            waiting_for: format!("claimed by {agent}, starting"),
        });
    }
    let id = task.id;
    let ahead = match super::read_store(state, log, move |c| crate::cluster::claim::ahead_of(c, id))
        .await
    {
        Ok(ahead) => ahead,
        Err(_) => {
            return Some(crate::supervisor::QueuePlace {
                position: None,
                waiting_for:
                    "an agent with free forks; its place in the shared queue cannot be read now"
                        .to_owned(),
            })
        }
    };
    let before = match ahead {
        0 => "first in the shared queue".to_owned(),
        1 => "1 task ahead in the shared queue".to_owned(),
        n => format!("{n} tasks ahead in the shared queue"),
    };
    Some(crate::supervisor::QueuePlace {
        position: Some(usize::try_from(ahead).unwrap_or(0) + 1),
        waiting_for: format!("an agent with free forks; {before}"),
    })
}
