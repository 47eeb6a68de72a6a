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
use slog::{info, warn};

use super::check::find;
use super::fields::id_and_name;
use super::{read_store, success, ApiError, ApiRequest, AppState};
use crate::status::Status;
use crate::store::persistence::RecordStopRequest;
use crate::supervisor::{EndOutcome, EndReason, EndTask};

/// How long a stop waits for a task that is stored but not yet queued (the instant between the
/// insert and the queueing of a concurrent `/api/run`).
const SETTLE: Duration = Duration::from_secs(5);

/// POST /api/stop
pub async fn handle(state: web::Data<AppState>, req: ApiRequest) -> Result<HttpResponse, ApiError> {
    let ApiRequest { body, log, caller } = req;
    let (id, name) = id_and_name(&body)?;
    stop(&state, &log, id, name, &caller.who, caller.via).await
}

/// Stops task `id` (if it has this name) for `who`, through `via`; shared with the console.
pub async fn stop(
    state: &AppState,
    log: &slog::Logger,
    id: i64,
    name: String,
    who: &str,
    via: &str,
) -> Result<HttpResponse, ApiError> {
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut recorded = false;
    loop {
        let checked = match find(state, log, id, name.clone()).await {
            Ok((task, _)) => {
                if Status::from_code(task.status).is_none_or(Status::is_terminal) {
                    return Ok(success(json!({})));
                }
                if !recorded {
                    // Committed before the stop, so before the end it leads to.
                    recorded = true;
                    let asked = RecordStopRequest {
                        task_id: id,
                        by: who.to_owned(),
                        via: via.to_owned(),
                    };
                    if state.persistence.send(asked).await.is_err() {
                        warn!(log, "cannot record who asked to stop a task: the writer is not running"; "task_id" => id);
                    }
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
            // In the shared queue, or run by another agent.
            EndOutcome::NotLive if state.settings.shared_queue && !unchecked => {
                end_elsewhere(state, log, id, &name, EndReason::Stop).await?;
                return Ok(success(json!({})));
            }
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

/// How often a stop through another agent reads whether its task has ended.
const POLL: Duration = Duration::from_millis(100);

/// Shared queue, a task this agent does not hold (a stop, or a `parallel_run` deadline): an
/// unclaimed one is taken out of the queue and ended here; a claimed or running one gets a stop
/// request in its row, which its agent applies (woken by `NOTIFY downlink_stop`, else at its next
/// heartbeat). Answers once the end is recorded, or says in one sentence that the agent running it
/// is lost (the request stays recorded and is applied when it starts again).
pub async fn end_elsewhere(
    state: &AppState,
    log: &slog::Logger,
    id: i64,
    name: &str,
    reason: EndReason,
) -> Result<(), ApiError> {
    let me = state.settings.agent_name.clone();
    let taken = read_store(state, log, move |c| {
        crate::cluster::claim::take_for_stop(c, id, &me)
    })
    .await?;
    if taken {
        let (task, _) = find(state, log, id, name.to_owned()).await?;
        let nodes: Vec<String> = serde_json::from_str(&task.nodes).unwrap_or_default();
        let (status, ending, err) = reason.outcome(&state.settings);
        let fin = crate::task::end_without_run(id, &nodes, status, ending, err);
        let written = state
            .persistence
            .send(crate::store::persistence::FinishTask(fin))
            .await;
        return match written {
            Ok(Ok(_)) => {
                info!(log, "pending task taken out of the shared queue and ended"; "task_id" => id, "reason" => reason.as_str());
                Ok(())
            }
            _ => Err(ApiError::DbUnavailable),
        };
    }
    let why = reason.as_str();
    let owner = read_store(state, log, move |c| {
        crate::cluster::claim::request_stop(c, id, why)
    })
    .await?;
    let Some(owner) = owner else {
        // Ended meanwhile (or not claimed yet: the caller asks again).
        let (task, _) = find(state, log, id, name.to_owned()).await?;
        if Status::from_code(task.status).is_none_or(Status::is_terminal) {
            return Ok(());
        }
        return Err(ApiError::Other(
            "task is being claimed by an agent; retry the stop".into(),
        ));
    };
    info!(log, "stop asked of the agent that runs the task"; "task_id" => id, "agent" => &owner);
    let s = &state.settings;
    let wait = Duration::from_secs(s.stop_grace_secs + s.remote_cleanup_secs + 30);
    let lease = Duration::from_secs(
        s.heartbeat_secs.max(1) * crate::cluster::agents::LEASE_HEARTBEATS as u64,
    );
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (task, _) = find(state, log, id, name.to_owned()).await?;
        if Status::from_code(task.status).is_none_or(Status::is_terminal) {
            info!(log, "task stopped by the agent that runs it"; "task_id" => id, "agent" => &owner);
            return Ok(());
        }
        let agent = owner.clone();
        let silent = read_store(state, log, move |c| {
            Ok(crate::cluster::agents::list(c)?
                .into_iter()
                .find(|a| a.name == agent)
                .map(|a| a.silent_ms))
        })
        .await?;
        if let Some(ms) = silent.filter(|ms| *ms > lease.as_millis() as i64) {
            return Err(ApiError::Other(format!(
                "task {id} runs on agent {owner}, which has not been heard from for {} s: the stop is recorded and is applied when that agent starts again",
                ms / 1000
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::Other(format!(
                "the stop is recorded, but agent {owner} has not ended task {id} in {} s",
                wait.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}
