//! `/api/run`: validate, store, queue; answer the id once the row is committed.

use actix_web::{web, HttpResponse};
use serde_json::json;
use slog::{info, Logger};
use tokio::sync::oneshot;

use super::fields::RunRequest;
use super::{success, ApiError, ApiRequest, AppState, Caller};
use crate::status::Status;
use crate::store::persistence::InsertTask;
use crate::store::NewTask;
use crate::supervisor::Enqueue;
use crate::task::TaskSpec;
use crate::time;

/// POST /api/run
pub async fn handle(state: web::Data<AppState>, req: ApiRequest) -> Result<HttpResponse, ApiError> {
    let ApiRequest { caller, body, log } = req;
    let run = RunRequest::from_json(&body, &state.settings)?;
    let (id, _) = submit(&state, &log, &caller, run, false).await?;
    Ok(success(json!({ "id": id })))
}

/// Stores a validated task and queues it; with `wait`, also a receiver for its end. Shared with
/// `/api/parallel_run`.
pub async fn submit(
    state: &AppState,
    log: &Logger,
    caller: &Caller,
    run: RunRequest,
    wait: bool,
) -> Result<(i64, Option<oneshot::Receiver<()>>), ApiError> {
    if let Some(why) = state.disk.low() {
        return Err(ApiError::Other(why));
    }
    if !state.slots.take() {
        return Err(ApiError::Other("queue full, retry later".into()));
    }
    let now = time::now();
    let forks = run.forks(state.settings.max_forks);
    let new = NewTask {
        name: run.name.clone(),
        nodes: serde_json::to_string(&run.nodes).unwrap_or_default(),
        remote_user: run.user.clone(),
        content: run.content.clone(),
        params: if state.settings.store_params {
            serde_json::Value::Object(run.params.clone()).to_string()
        } else {
            "null".to_owned()
        },
        fork_num: i32::try_from(run.fork_num).unwrap_or(i32::MAX),
        forks: i32::try_from(forks).unwrap_or(i32::MAX),
        status: Status::Pending.code(),
        correlation_id: caller.correlation_id.clone(),
        source: caller.source.clone(),
        created_at: now,
        updated_at: now,
        // In the shared queue a task is nobody's until an agent claims it.
        agent: (!state.settings.shared_queue).then(|| state.settings.agent_name.clone()),
        requested_by: Some(caller.who.clone()),
        requested_via: Some(caller.via.to_owned()),
    };
    let inserted = state
        .persistence
        .send(InsertTask(new))
        .await
        .map_err(|_| ApiError::DbUnavailable)
        .and_then(|r| r.map_err(ApiError::from));
    let id = match inserted {
        Ok(id) => id,
        Err(e) => {
            state.slots.give_back();
            return Err(e);
        }
    };
    info!(log, "task accepted"; "task_id" => id, "task_name" => &run.name,
          "nodes" => run.nodes.len(), "forks" => forks);
    let spec = TaskSpec {
        id,
        name: run.name,
        nodes: run.nodes,
        remote_user: run.user,
        content: run.content,
        params: run.params,
        forks,
        correlation_id: caller.correlation_id.clone(),
        source: caller.source.clone(),
        created_at: now,
    };
    let rx = state
        .supervisor
        .send(Enqueue { spec, wait })
        .await
        .map_err(|_| ApiError::Other("the task supervisor is not running".into()))?;
    Ok((id, rx))
}
