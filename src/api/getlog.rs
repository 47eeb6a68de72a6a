//! `/api/getlog`: the execution records of one host for one source, oldest first, as the
//! contract's text lines (`reuslt` misspelt as clients expect).

use actix_web::{web, HttpResponse};

use super::fields::{log_limit, search_text};
use super::{read_store, ApiError, ApiRequest, AppState};
use crate::store::{self, HostRow};
use crate::time;

/// POST /api/getlog
pub async fn handle(state: web::Data<AppState>, req: ApiRequest) -> Result<HttpResponse, ApiError> {
    let ApiRequest { body, log, .. } = req;
    let host = search_text(&body, "host")?.to_owned();
    let source = search_text(&body, "source")?.to_owned();
    let limit = log_limit(&body)?;
    let rows = read_store(&state, &log, move |c| {
        store::host_log(c, &host, &source, limit)
    })
    .await?;
    Ok(lines(&rows))
}

/// The bare JSON array of log lines of these rows.
pub fn lines(rows: &[HostRow]) -> HttpResponse {
    let lines: Vec<String> = rows.iter().map(line).collect();
    HttpResponse::Ok().json(lines)
}

/// One record as a line:
/// `global_id = 16-16, source = hubble, create_time = …Z, end_time = …Z, host = 127.0.0.1, reuslt = ok`.
/// A record of a running task has an empty `end_time` and `reuslt = running`.
pub fn line(row: &HostRow) -> String {
    let (end, result) = match &row.result {
        Some(result) => (
            row.ended_at.map(time::rfc3339).unwrap_or_default(),
            result.as_str(),
        ),
        None => (String::new(), "running"),
    };
    format!(
        "global_id = {}, source = {}, create_time = {}, end_time = {}, host = {}, reuslt = {}",
        row.correlation_id,
        row.source,
        time::rfc3339(row.created_at),
        end,
        row.host,
        result
    )
}
