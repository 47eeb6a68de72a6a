//! `GET /metrics`: the Prometheus text of [`crate::metrics`]. Behind the API's auth unless
//! `metrics_open`. A database that does not answer leaves the table's gauges at their last values
//! (logged), so a scrape still shows the rest while it is away.

use actix_web::{web, HttpResponse};
use slog::warn;

use super::{read_store, ApiError, AppState};
use crate::metrics::{Snapshot, CONTENT_TYPE};
use crate::supervisor::GetLoad;

/// GET /metrics
pub async fn handle(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let load = state
        .supervisor
        .send(GetLoad)
        .await
        .map_err(|_| ApiError::Other("the task supervisor is not running".into()))?;
    let mut snapshot = Snapshot {
        queued: load.queued,
        forks_in_use: load.forks_in_use,
        forks_budget: load.forks_budget,
        ..Snapshot::default()
    };
    match read_store(&state, &state.log, crate::store::task_counts).await {
        Ok(counts) => {
            snapshot.tasks_by_status = Some(counts.by_status);
            snapshot.oldest_pending_secs = Some(counts.oldest_pending.map_or(0.0, |t| {
                (crate::time::now() - t).num_milliseconds() as f64 / 1000.0
            }));
        }
        Err(e) => warn!(state.log, "metrics: the tasks table's counts are not read"; "error" => %e),
    }
    Ok(HttpResponse::Ok()
        .content_type(CONTENT_TYPE)
        .body(state.metrics.render(&snapshot)))
}
