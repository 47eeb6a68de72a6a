//! `/api/stop`: a pending task leaves the queue; a running one gets SIGTERM, then SIGKILL after the
//! grace period. The answer comes once the task is recorded as ended. Stopping a finished task is
//! not an error and changes nothing.
//!
//! While the database is away the stop still lands: the supervisor knows its own queued and
//! running tasks by id and name. The task is ended at once (a pending one never runs), and the
//! answer says `database unavailable, retry later` until the end is recorded, which the
//! reconciler does as soon as the database answers.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;
use slog::info;

use super::check::find;
use super::fields::id_and_name;
use super::{success, ApiError, ApiRequest, AppState};
use crate::status::Status;
use crate::supervisor::{EndOutcome, EndReason, EndTask};

/// How long a stop waits for a task that is stored but not yet queued (the instant between the
/// insert and the queueing of a concurrent `/api/run`).
const SETTLE: Duration = Duration::from_secs(5);

/// POST /api/stop
pub async fn handle(state: web::Data<AppState>, req: ApiRequest) -> Result<HttpResponse, ApiError> {
    let ApiRequest { body, log, .. } = req;
    let (id, name) = id_and_name(&body)?;
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let checked = match find(&state, &log, id, name.clone()).await {
            Ok((task, _)) => {
                if Status::from_code(task.status).is_none_or(Status::is_terminal) {
                    return Ok(success(json!({})));
                }
                None
            }
            Err(ApiError::DbUnavailable) => Some(name.clone()),
            Err(e) => return Err(e),
        };
        let unchecked = checked.is_some();
        let outcome = state
            .supervisor
            .send(EndTask {
                id,
                name: checked,
                reason: EndReason::Stop,
            })
            .await
            .map_err(|_| ApiError::Other("the task supervisor is not running".into()))?;
        match outcome {
            EndOutcome::Ended => {
                info!(log, "task stopped"; "task_id" => id, "task_name" => &name);
                return Ok(success(json!({})));
            }
            EndOutcome::Failed(_) => return Err(ApiError::DbUnavailable),
            // Not known here, and the database cannot say whether it exists.
            EndOutcome::NotLive if unchecked => return Err(ApiError::DbUnavailable),
            EndOutcome::NotLive if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            EndOutcome::NotLive => {
                return Err(ApiError::Other(
                    "task is not queued or running in this server".into(),
                ))
            }
        }
    }
}
