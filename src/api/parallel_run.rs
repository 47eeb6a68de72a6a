//! `/api/parallel_run`: run like `/api/run`, then wait for the end and answer the task's log lines,
//! one per node. Past `parallel_run_timeout_secs` the task is killed with status 6. A client that
//! disconnects does not stop the task (dropping this future leaves it running).

use std::time::Duration;

use actix_web::{web, HttpResponse};
use slog::warn;

use super::fields::RunRequest;
use super::getlog::lines;
use super::run::submit;
use super::{read_either, ApiError, ApiRequest, AppState};
use crate::store;
use crate::supervisor::{EndOutcome, EndReason, EndTask};

/// Completes when the task has ended: told by this agent's supervisor, or (shared queue, where
/// another agent may run it) read from its row every [`POLL`].
async fn ended_anywhere(
    state: &AppState,
    log: &slog::Logger,
    id: i64,
    mut here: tokio::sync::oneshot::Receiver<()>,
) {
    if !state.settings.shared_queue {
        // Answered at the task's end, or dropped at shutdown: either way the wait is over.
        here.await.ok();
        return;
    }
    loop {
        tokio::select! {
            _ = &mut here => return,
            _ = tokio::time::sleep(POLL) => {
                let status = super::read_store(state, log, move |c| store::task_status(c, id)).await;
                if let Ok(Some(code)) = status {
                    if crate::status::Status::from_code(code).is_some_and(crate::status::Status::is_terminal) {
                        return;
                    }
                }
            }
        }
    }
}

/// How often a `parallel_run` on the shared queue reads its task's status.
const POLL: Duration = Duration::from_millis(250);

/// POST /api/parallel_run
pub async fn handle(state: web::Data<AppState>, req: ApiRequest) -> Result<HttpResponse, ApiError> {
    let ApiRequest { caller, body, log } = req;
    let run = RunRequest::from_json(&body, &state.settings)?;
    let name = run.name.clone();
    let (id, ended) = submit(&state, &log, &caller, run, true).await?;
    let timeout = Duration::from_secs(state.settings.parallel_run_timeout_secs);
    let mut closing = state.closing.clone();
    let finished = match ended {
        Some(rx) => tokio::select! {
            done = tokio::time::timeout(timeout, ended_anywhere(&state, &log, id, rx)) => done.is_ok(),
            _ = closing.wait_for(|c| *c) => {
                return Err(ApiError::Other(format!(
                    "downlink is shutting down; task {id} goes on, check it later with /api/check"
                )));
            }
        },
        None => true,
    };
    if !finished {
        warn!(log, "parallel_run deadline passed, killing the task"; "task_id" => id);
        let outcome = state
            .supervisor
            .send(EndTask {
                id,
                name: None,
                reason: EndReason::Timeout,
            })
            .await
            .map_err(|_| ApiError::Other("the task supervisor is not running".into()))?;
        match outcome {
            EndOutcome::Failed(_) => return Err(ApiError::DbUnavailable),
            // Run by another agent (shared queue): it kills it, asked through the task's row.
            EndOutcome::NotLive if state.settings.shared_queue => {
                super::stop::end_elsewhere(&state, &log, id, &name, EndReason::Timeout).await?;
            }
            _ => {}
        }
    }
    let rows = read_either(
        &state,
        &log,
        |c| async move { crate::store::readers::task_hosts(&c, id).await },
        move |c| store::task_hosts(c, id),
    )
    .await?;
    Ok(lines(&rows))
}
