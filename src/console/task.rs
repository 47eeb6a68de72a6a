//! `/ui/tasks/{id}`: a task as an operator looks at it: its status and times, who ran and who
//! stopped it, each host's counters and result, and ansible's own output, the text of its events
//! in order (`host=<ip>`: that host's lines, with the play and task headings they fall under).

use actix_web::{web, HttpRequest, HttpResponse};
use askama::Template;

use super::html;
use crate::api::{path_id, read_store, ApiError, AppState};
use crate::status::Status;
use crate::store::{self, HostRow, NewEvent, TaskListing};

/// Most events whose text one page shows (the newest); the stream has all of them.
const MAX_EVENTS: usize = 20_000;

/// One host's row.
struct Host {
    host: String,
    result: String,
    counters: [(&'static str, i32); 7],
    msg: String,
}

/// A host row's counters, named as the pages' `data-counter` hooks name them.
pub(super) fn counters(h: &HostRow) -> [(&'static str, i32); 7] {
    [
        ("ok", h.ok),
        ("changed", h.changed),
        ("failed", h.failed),
        ("skipped", h.skipped),
        ("unreachable", h.unreachable),
        ("rescued", h.rescued),
        ("ignored", h.ignored),
    ]
}

impl Host {
    fn of(h: &HostRow) -> Host {
        Host {
            host: h.host.clone(),
            result: h.result.clone().unwrap_or_else(|| "running".into()),
            counters: counters(h),
            msg: h.msg.clone().unwrap_or_default(),
        }
    }
}

#[derive(Template)]
#[template(path = "task.html")]
struct Page {
    css: &'static str,
    id: i64,
    name: String,
    status: &'static str,
    /// `(label, value)` of the task's facts, in order.
    facts: Vec<(&'static str, String)>,
    hosts: Vec<Host>,
    /// The host whose output alone is shown.
    only: Option<String>,
    output: String,
    /// Whether older events were left out of `output`.
    cut: bool,
    /// Whether this session may stop the task now (it is live, the token operates).
    may_stop: bool,
    /// The session's form token (the logout form), and whether it logged in with a token.
    form_token: String,
    logged_in: bool,
}

/// The facts a task's page lists.
fn facts(t: &TaskListing) -> Vec<(&'static str, String)> {
    let time = |t: Option<chrono::NaiveDateTime>| t.map(crate::time::rfc3339).unwrap_or_default();
    let who = |by: &Option<String>, via: &Option<String>| match (by, via) {
        (Some(by), Some(via)) => format!("{by} ({via})"),
        (Some(by), None) => by.clone(),
        _ => String::new(),
    };
    vec![
        ("Source", t.source.clone()),
        ("Agent", t.agent.clone().unwrap_or_default()),
        ("Correlation id", t.correlation_id.clone()),
        ("Created", crate::time::rfc3339(t.created_at)),
        ("Started", time(t.started_at)),
        ("Ended", time(t.ended_at)),
        ("Run by", who(&t.requested_by, &t.requested_via)),
        (
            "Stop asked by",
            who(&t.stop_requested_by, &t.stop_requested_via),
        ),
        ("Error", t.err.clone().unwrap_or_default()),
    ]
}

/// The text ansible printed, from the events in order: every event's `stdout`, or, for one host,
/// that host's events and the headings (events of no host).
fn output(events: &[NewEvent], only: Option<&str>) -> (String, bool) {
    let wanted: Vec<&NewEvent> = events
        .iter()
        .filter(|e| match only {
            None => true,
            Some(h) => e.host.as_deref().is_none_or(|eh| eh == h),
        })
        .collect();
    let cut = wanted.len() > MAX_EVENTS;
    let mut out = String::new();
    for e in &wanted[wanted.len().saturating_sub(MAX_EVENTS)..] {
        #[derive(serde::Deserialize)]
        struct Printed {
            stdout: Option<String>,
        }
        if let Ok(Printed { stdout: Some(text) }) = serde_json::from_str(&e.payload) {
            out.push_str(&text);
            out.push('\n');
        }
    }
    (out, cut)
}

/// GET /ui/tasks/{id}
pub async fn page(
    state: web::Data<AppState>,
    session: web::ReqData<super::session::Session>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&req)?;
    let only = url::form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, v)| k == "host" && !v.is_empty())
        .map(|(_, v)| v.into_owned());
    let found = read_store(&state, &state.log, move |c| {
        let Some((task, hosts)) = store::task_detail(c, id)? else {
            return Ok(None);
        };
        Ok(Some((task, hosts, store::task_events(c, id)?)))
    })
    .await?;
    let Some((task, hosts, events)) = found else {
        return Ok(super::error_page(
            actix_web::http::StatusCode::NOT_FOUND,
            "No such task",
            &format!("No task has the id {id}."),
        ));
    };
    let (output, cut) = output(&events, only.as_deref());
    let live = Status::is_live(task.status);
    html(
        Page {
            may_stop: live && session.who.may_operate(),
            form_token: session.form_token.clone(),
            logged_in: state.access.wants_token(),
            css: super::assets::CSS,
            id: task.id,
            status: Status::name_of(task.status),
            facts: facts(&task),
            name: task.name,
            hosts: hosts.iter().map(Host::of).collect(),
            only,
            output,
            cut,
        }
        .render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i32, host: Option<&str>, stdout: &str) -> NewEvent {
        NewEvent {
            task_id: 1,
            seq,
            host: host.map(str::to_owned),
            kind: "k".into(),
            task_name: None,
            payload: serde_json::json!({ "stdout": stdout }).to_string(),
            created_at: crate::time::now(),
        }
    }

    #[test]
    fn one_hosts_output_keeps_the_headings() {
        let events = [
            ev(1, None, "TASK [ping]"),
            ev(2, Some("a"), "ok: [a]"),
            ev(3, Some("b"), "ok: [b]"),
            ev(4, Some("a"), ""),
        ];
        assert_eq!(output(&events, None).0, "TASK [ping]\nok: [a]\nok: [b]\n\n");
        assert_eq!(output(&events, Some("b")).0, "TASK [ping]\nok: [b]\n");
    }
}
