//! `/ui/tasks/{id}/stop`: a page that asks to confirm, and the form it posts, which stops the task
//! as `/api/stop` does, recorded as asked by the session's token through the console. A post is
//! refused unless it carries the session's form token and, when the browser says where it comes
//! from (`Origin`), comes from this server; the session cookie is `SameSite=Strict`, so another
//! site's page cannot send it at all.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use askama::Template;

use super::login::{see_other, Posted};
use super::session::Session;
use super::{error_page, html};
use crate::api::{path_id, read_store, ApiError, AppState};
use crate::status::Status;
use crate::store;

#[derive(Template)]
#[template(path = "stop.html")]
struct Confirm {
    css: &'static str,
    id: i64,
    name: String,
    form_token: String,
}

fn read_only() -> HttpResponse {
    error_page(
        StatusCode::FORBIDDEN,
        "Read only",
        "This session's token may only read: stopping a task needs a token with the operate role.",
    )
}

/// The task's name if it is live.
async fn live_name(state: &AppState, id: i64) -> Result<Option<String>, ApiError> {
    let found = read_store(state, &state.log, move |c| store::task_detail(c, id)).await?;
    Ok(found
        .filter(|(t, _)| Status::is_live(t.status))
        .map(|(t, _)| t.name))
}

/// GET /ui/tasks/{id}/stop
pub async fn confirm(
    state: web::Data<AppState>,
    session: web::ReqData<Session>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&req)?;
    if !session.who.may_operate() {
        return Ok(read_only());
    }
    let Some(name) = live_name(&state, id).await? else {
        return Ok(see_other(&format!("/ui/tasks/{id}")));
    };
    html(
        Confirm {
            css: super::assets::CSS,
            id,
            name,
            form_token: session.form_token.clone(),
        }
        .render(),
    )
}

/// Whether the request's `Origin`, when it has one, is this server.
fn same_origin(req: &HttpRequest) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let info = req.connection_info();
    origin
        .to_str()
        .is_ok_and(|o| o == format!("{}://{}", info.scheme(), info.host()))
}

/// POST /ui/tasks/{id}/stop
pub async fn stop(
    state: web::Data<AppState>,
    session: web::ReqData<Session>,
    req: HttpRequest,
    form: web::Form<Posted>,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&req)?;
    if !same_origin(&req) || !session.owns_form(&form.form_token) {
        slog::warn!(state.log, "the console refused a stop from elsewhere"; "task_id" => id);
        return Ok(error_page(
            StatusCode::FORBIDDEN,
            "Refused",
            "This stop did not come from this server's own page.",
        ));
    }
    if !session.who.may_operate() {
        return Ok(read_only());
    }
    if let Some(name) = live_name(&state, id).await? {
        let log = state.log.new(slog::o!("source" => "console"));
        crate::api::stop::stop(&state, &log, id, name, &session.who.name, "console").await?;
    }
    Ok(see_other(&format!("/ui/tasks/{id}")))
}
