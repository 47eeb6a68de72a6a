//! `GET /api/tasks` and `GET /api/tasks/{id}`: tasks as operators look at them (what
//! `downlink tasks list` and `show` print). Times are RFC 3339 UTC; the contract's five endpoints
//! are untouched.

use actix_web::{web, HttpRequest, HttpResponse};
use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::check::HostRecord;
use super::{path_id, read_store, success, ApiError, AppState};
use crate::status::Status;
use crate::store::{self, TaskListing};
use crate::time;

/// Most tasks one list answers.
pub const MAX_LIMIT: i64 = 1000;
const DEFAULT_LIMIT: i64 = 50;

/// A task as `GET /api/tasks` lists it; the CLI reads it back.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskItem {
    pub id: i64,
    pub name: String,
    pub status: i32,
    pub status_name: Cow<'static, str>,
    pub source: String,
    pub agent: Option<String>,
    /// How many nodes the task has.
    pub nodes: usize,
    pub err: Option<String>,
    pub created_time: String,
    pub started_time: Option<String>,
    pub end_time: Option<String>,
    /// Who ran it: a token's name, or `local` without tokens (null: stored before this was kept).
    pub requested_by: Option<String>,
    /// Through what: `api`, `console` or `cli`.
    pub requested_via: Option<String>,
    /// Who first asked to stop it while it was live, and through what; null when nobody did.
    pub stop_requested_by: Option<String>,
    pub stop_requested_via: Option<String>,
}

impl TaskItem {
    fn of(t: TaskListing) -> TaskItem {
        let nodes = serde_json::from_str::<Vec<serde_json::Value>>(&t.nodes).map_or(0, |n| n.len());
        TaskItem {
            id: t.id,
            name: t.name,
            status: t.status,
            status_name: Cow::Borrowed(Status::name_of(t.status)),
            source: t.source,
            agent: t.agent,
            nodes,
            err: t.err,
            created_time: time::rfc3339(t.created_at),
            started_time: t.started_at.map(time::rfc3339),
            end_time: t.ended_at.map(time::rfc3339),
            requested_by: t.requested_by,
            requested_via: t.requested_via,
            stop_requested_by: t.stop_requested_by,
            stop_requested_via: t.stop_requested_via,
        }
    }
}

/// A task as `GET /api/tasks/{id}` shows it; the CLI reads it back.
#[derive(Debug, Serialize, Deserialize)]
pub struct Detail<'a> {
    #[serde(flatten)]
    pub task: TaskItem,
    /// The same records as `/api/check`'s `log`.
    pub hosts: Vec<HostRecord<'a>>,
}

/// A status given as its code (`4`) or its name (`success`).
pub fn status(value: &str) -> Result<i32, ApiError> {
    let by_code = value.parse::<i32>().ok().and_then(Status::from_code);
    let by_name = (1..=7)
        .filter_map(Status::from_code)
        .find(|s| s.name() == value);
    by_code
        .or(by_name)
        .map(Status::code)
        .ok_or_else(|| ApiError::param("status", "must be a status code 1-7 or its name"))
}

/// GET /api/tasks?status=S&source=S&limit=N
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (mut by_status, mut source, mut limit) = (None, None, DEFAULT_LIMIT);
    for (key, value) in url::form_urlencoded::parse(req.query_string().as_bytes()) {
        match key.as_ref() {
            "status" if !value.is_empty() => by_status = Some(status(&value)?),
            "source" if !value.is_empty() => source = Some(value.into_owned()),
            "limit" => {
                limit = value
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::param(
                            "limit",
                            format!("must be an integer from 1 to {MAX_LIMIT}"),
                        )
                    })?;
            }
            _ => {}
        }
    }
    let rows = read_store(&state, &state.log, move |c| {
        let filter = store::TaskFilter {
            status: by_status,
            source,
            limit,
            ..store::TaskFilter::default()
        };
        store::filter_tasks(c, &filter)
    })
    .await?;
    Ok(success(
        rows.into_iter().map(TaskItem::of).collect::<Vec<_>>(),
    ))
}

/// GET /api/tasks/{id}
pub async fn show(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let id = path_id(&req)?;
    let found = read_store(&state, &state.log, move |c| store::task_detail(c, id)).await?;
    let (task, hosts) = found.ok_or(ApiError::NotFound)?;
    Ok(success(Detail {
        task: TaskItem::of(task),
        hosts: hosts.iter().map(HostRecord::from).collect(),
    }))
}
