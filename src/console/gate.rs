//! The console's gate: every page but the login and the style sheet needs a session (see
//! `session.rs`). Without one, a page asks for the login, and a form post is refused; the API's
//! gate has already checked the allow-list.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpMessage, HttpResponse};

use super::session::{Session, Sessions, COOKIE, LIFE};
use crate::api::auth::Identity;
use crate::api::AppState;

/// The session cookie for this id.
pub fn cookie(id: &str, secure: bool) -> Cookie<'static> {
    Cookie::build(COOKIE, id.to_owned())
        .path("/ui")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(actix_web::cookie::time::Duration::seconds(
            i64::try_from(LIFE.as_secs()).unwrap_or(i64::MAX),
        ))
        .finish()
}

/// Whether the server speaks HTTPS (the cookie is then `Secure`).
pub fn secure(state: &AppState) -> bool {
    !state.settings.tls_cert_file.is_empty()
}

pub async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let path = req.path();
    if path == "/ui/login" || path.starts_with("/ui/assets/") {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body);
    }
    let (Some(state), Some(sessions)) = (
        req.app_data::<web::Data<AppState>>().cloned(),
        req.app_data::<web::Data<Sessions>>().cloned(),
    ) else {
        let res = HttpResponse::InternalServerError().body("the console has no state");
        return Ok(req.into_response(res).map_into_right_body());
    };
    let found = req.cookie(COOKIE).and_then(|c| sessions.get(c.value()));
    if let Some(session) = found {
        req.extensions_mut().insert(session);
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body);
    }
    if state.access.wants_token() {
        let res = if req.method() == Method::GET {
            HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/ui/login"))
                .finish()
        } else {
            super::error_page(
                StatusCode::UNAUTHORIZED,
                "Log in first",
                "This needs a session: log in with a token.",
            )
        };
        return Ok(req.into_response(res).map_into_right_body());
    }
    // No tokens: a session of `local`, for the forms' token.
    let Some((id, session)) = sessions.open(Identity::local()) else {
        let res = super::error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "No session",
            "The operating system's random generator failed; no session can be made.",
        );
        return Ok(req.into_response(res).map_into_right_body());
    };
    let cookie = cookie(&id, secure(&state));
    req.extensions_mut().insert::<Session>(session);
    let mut res = next.call(req).await?;
    if let Err(e) = res.response_mut().add_cookie(&cookie) {
        slog::warn!(state.log, "cannot set the console's session cookie"; "error" => %e);
    }
    Ok(res.map_into_left_body())
}
