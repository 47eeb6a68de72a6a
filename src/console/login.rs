//! `/ui/login` and `/ui/logout`: a token for a session, and the session's end.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use askama::Template;
use serde::Deserialize;

use super::gate::{cookie, secure};
use super::session::{Session, Sessions, COOKIE};
use super::{error_page, html};
use crate::api::{ApiError, AppState};

#[derive(Template)]
#[template(path = "login.html")]
struct Page {
    css: &'static str,
    problem: &'static str,
}

fn page(status: StatusCode, problem: &'static str) -> Result<HttpResponse, ApiError> {
    let mut res = html(
        Page {
            css: super::assets::CSS,
            problem,
        }
        .render(),
    )?;
    *res.status_mut() = status;
    Ok(res)
}

/// GET /ui/login
pub async fn form(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if !state.access.wants_token() {
        return Ok(see_other("/ui/"));
    }
    page(StatusCode::OK, "")
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

/// POST /ui/login: a session for a token of ours; the login again, for anything else.
pub async fn login(
    state: web::Data<AppState>,
    sessions: web::Data<Sessions>,
    form: web::Form<Login>,
) -> Result<HttpResponse, ApiError> {
    let Some(who) = state.access.token(form.token.trim()) else {
        slog::warn!(state.log, "the console refused a token");
        return page(StatusCode::UNAUTHORIZED, "That token is not accepted here.");
    };
    let Some((id, _)) = sessions.open(who) else {
        return Ok(error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "No session",
            "The operating system's random generator failed; no session can be made.",
        ));
    };
    let mut res = see_other("/ui/");
    if let Err(e) = res.add_cookie(&cookie(&id, secure(&state))) {
        return Err(ApiError::Other(format!(
            "internal error: the session cookie: {e}"
        )));
    }
    Ok(res)
}

#[derive(Deserialize)]
pub struct Posted {
    #[serde(default)]
    pub form_token: String,
}

/// POST /ui/logout: ends the session (its form token proves the page was ours).
pub async fn logout(
    req: HttpRequest,
    sessions: web::Data<Sessions>,
    session: web::ReqData<Session>,
    form: web::Form<Posted>,
) -> HttpResponse {
    if !session.owns_form(&form.form_token) {
        return error_page(
            StatusCode::FORBIDDEN,
            "Refused",
            "This form is not from this session.",
        );
    }
    if let Some(c) = req.cookie(COOKIE) {
        sessions.close(c.value());
    }
    let mut res = see_other("/ui/login");
    let mut gone = cookie("", false);
    gone.make_removal();
    // The session is closed already: a cookie left in the browser opens nothing.
    res.add_cookie(&gone).ok();
    res
}

pub fn see_other(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, to.to_owned()))
        .finish()
}
