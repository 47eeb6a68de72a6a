//! `/ui/`: the tasks, newest first, in keyset pages: `before=<id>` starts a page below that id,
//! so the thousandth page costs what the first does. Filters: `status` (code or name), `source`
//! (`X-RESOURCE`), `name` (its start) and `agent`.

use actix_web::{web, HttpRequest, HttpResponse};
use askama::Template;

use super::html;
use crate::api::{read_store, ApiError, AppState};
use crate::status::Status;
use crate::store::{self, TaskFilter};
use crate::supervisor::WhereInQueue;

/// Tasks on a page.
const PAGE: i64 = 50;

/// One row of the list.
struct Row {
    id: i64,
    name: String,
    status: &'static str,
    source: String,
    agent: String,
    nodes: usize,
    created: String,
    /// What a pending task waits for, or why an ended one failed.
    note: String,
}

#[derive(Template)]
#[template(path = "tasks.html")]
struct Page {
    css: &'static str,
    rows: Vec<Row>,
    /// Every status name, and whether it is the one filtered by.
    statuses: Vec<(&'static str, bool)>,
    source: String,
    name: String,
    agent: String,
    /// The next (older) page's URL.
    next: Option<String>,
    form_token: String,
    logged_in: bool,
}

/// GET /ui/
pub async fn page(
    state: web::Data<AppState>,
    session: web::ReqData<super::session::Session>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let mut filter = TaskFilter {
        limit: PAGE + 1,
        ..TaskFilter::default()
    };
    for (key, value) in url::form_urlencoded::parse(req.query_string().as_bytes()) {
        let value = value.trim().to_owned();
        if value.is_empty() {
            continue;
        }
        match key.as_ref() {
            "status" => filter.status = Some(crate::api::tasks::status(&value)?),
            "source" => filter.source = Some(value),
            "name" => filter.name = Some(value),
            "agent" => filter.agent = Some(value),
            "before" => {
                let id = value.parse::<i64>().ok().filter(|id| *id > 0);
                filter.before =
                    Some(id.ok_or_else(|| ApiError::param("before", "must be a task id"))?);
            }
            _ => {}
        }
    }
    let query = filter.clone();
    let mut tasks = read_store(&state, &state.log, move |c| store::filter_tasks(c, &query)).await?;
    let more = tasks.len() > PAGE as usize;
    tasks.truncate(PAGE as usize);
    let next = match (more, tasks.last()) {
        (true, Some(last)) => Some(page_url(&filter, last.id)),
        _ => None,
    };
    let mut rows = Vec::with_capacity(tasks.len());
    for t in tasks {
        let status = Status::name_of(t.status);
        let note = if t.status == crate::status::Status::Pending.code() {
            waiting_for(&state, t.id).await
        } else {
            t.err.clone().unwrap_or_default()
        };
        rows.push(Row {
            id: t.id,
            status,
            nodes: serde_json::from_str::<Vec<serde_json::Value>>(&t.nodes).map_or(0, |n| n.len()),
            agent: t.agent.unwrap_or_default(),
            created: crate::time::rfc3339(t.created_at),
            name: t.name,
            source: t.source,
            note,
        });
    }
    let chosen = filter.status.map(Status::name_of);
    html(
        Page {
            css: super::assets::CSS,
            rows,
            statuses: (1..=7)
                .map(Status::name_of)
                .map(|s| (s, Some(s) == chosen))
                .collect(),
            source: filter.source.unwrap_or_default(),
            name: filter.name.unwrap_or_default(),
            agent: filter.agent.unwrap_or_default(),
            next,
            form_token: session.form_token.clone(),
            logged_in: state.access.wants_token(),
        }
        .render(),
    )
}

/// What a pending task waits for, as `/api/check` says it.
async fn waiting_for(state: &AppState, id: i64) -> String {
    if state.settings.shared_queue {
        return "an agent with free forks, in the shared queue".to_owned();
    }
    match state.supervisor.send(WhereInQueue(id)).await {
        Ok(Some(place)) => place.waiting_for,
        _ => "the server is starting or shutting down".to_owned(),
    }
}

/// The URL of the page of the same filters that starts below `before`.
fn page_url(f: &TaskFilter, before: i64) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(s) = f.status {
        q.append_pair("status", Status::name_of(s));
    }
    for (key, value) in [
        ("source", &f.source),
        ("name", &f.name),
        ("agent", &f.agent),
    ] {
        if let Some(v) = value {
            q.append_pair(key, v);
        }
    }
    q.append_pair("before", &before.to_string());
    format!("/ui/?{}", q.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_keeps_the_filters() {
        let f = TaskFilter {
            status: Some(3),
            name: Some("a b&c".into()),
            ..TaskFilter::default()
        };
        assert_eq!(
            page_url(&f, 42),
            "/ui/?status=failed&name=a+b%26c&before=42"
        );
        assert_eq!(page_url(&TaskFilter::default(), 7), "/ui/?before=7");
    }
}
