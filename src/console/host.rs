//! `/ui/hosts/{ip}`: every task that ran on a host, newest first, with the host's result in each
//! (what `/api/getlog` says, over every source, for people); `before=<task id>` pages on.

use actix_web::{web, HttpRequest, HttpResponse};
use askama::Template;

use super::html;
use crate::api::{read_store, ApiError, AppState};
use crate::status::Status;
use crate::store;

/// Records on a page.
const PAGE: i64 = 100;

struct Row {
    task_id: i64,
    task: String,
    task_status: &'static str,
    source: String,
    result: String,
    counters: [(&'static str, i32); 7],
    msg: String,
    created: String,
}

#[derive(Template)]
#[template(path = "host.html")]
struct Page {
    css: &'static str,
    host: String,
    rows: Vec<Row>,
    next: Option<String>,
}

/// GET /ui/hosts/{ip}
pub async fn page(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let host = req.match_info().get("ip").unwrap_or_default().to_owned();
    let before = url::form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == "before")
        .map(|(_, v)| {
            v.parse::<i64>()
                .map_err(|_| ApiError::param("before", "must be a task id"))
        })
        .transpose()?;
    let key = host.clone();
    let mut found = read_store(&state, &state.log, move |c| {
        store::host_history(c, &key, before, PAGE + 1)
    })
    .await?;
    let more = found.len() > PAGE as usize;
    found.truncate(PAGE as usize);
    let next = match (more, found.last()) {
        (true, Some((last, _, _))) => Some(format!(
            "/ui/hosts/{}?before={}",
            url::form_urlencoded::byte_serialize(host.as_bytes()).collect::<String>(),
            last.task_id
        )),
        _ => None,
    };
    let rows = found
        .into_iter()
        .map(|(h, task, status)| Row {
            task_id: h.task_id,
            task,
            task_status: Status::name_of(status),
            source: h.source.clone(),
            result: h.result.clone().unwrap_or_else(|| "running".into()),
            counters: super::task::counters(&h),
            msg: h.msg.clone().unwrap_or_default(),
            created: crate::time::rfc3339(h.created_at),
        })
        .collect();
    html(
        Page {
            css: super::assets::CSS,
            host,
            rows,
            next,
        }
        .render(),
    )
}
