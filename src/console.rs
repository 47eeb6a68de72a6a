//! The console: pages for people, under `/ui/`, rendered on the server from typed templates
//! (askama, `templates/`), readable without JavaScript. A layer above `api`: it reads through the
//! same store functions and stands behind the same gate (with tokens configured a browser is
//! refused until the console's login exists). Every asset is in the binary (`assets.rs`): nothing
//! is loaded from another origin.
//!
//! - `/ui/` ([`list`]): the tasks, newest first, filtered by status, source, name and agent, in
//!   keyset pages (`before=<id>`), pending ones with what they wait for.
//! - `/ui/tasks/{id}` ([`task`]): a task, its hosts' counters and results, and ansible's own
//!   output (the events' `stdout`), for the whole task or one host (`host=<ip>`).
//! - `/ui/hosts/{ip}` ([`host`]): every task that ran on a host, with its result there.

pub mod assets;
mod gate;
mod host;
mod list;
mod login;
pub mod session;
mod stop;
mod task;

pub use session::Sessions;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpResponse};

use crate::api::ApiError;

/// The console's routes, behind its gate (a session, or the login).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/ui", web::get().to(to_list)).service(
        web::scope("/ui")
            .wrap(actix_web::middleware::from_fn(gate::gate))
            .route("/", web::get().to(list::page))
            .route("/login", web::get().to(login::form))
            .route("/login", web::post().to(login::login))
            .route("/logout", web::post().to(login::logout))
            .route("/tasks/{id}", web::get().to(task::page))
            .route("/hosts/{ip}", web::get().to(host::page))
            .route("/tasks/{id}/stop", web::get().to(stop::confirm))
            .route("/tasks/{id}/stop", web::post().to(stop::stop))
            .route("/assets/{name}", web::get().to(assets::serve)),
    );
}

async fn to_list() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header((header::LOCATION, "/ui/"))
        .finish()
}

/// A rendered page: HTML that loads nothing from elsewhere and runs no inline script.
fn html(rendered: Result<String, askama::Error>) -> Result<HttpResponse, ApiError> {
    let body = rendered.map_err(|e| ApiError::Other(format!("internal error: a page: {e}")))?;
    let mut res = HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(body);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

#[derive(askama::Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    css: &'static str,
    title: &'a str,
    message: &'a str,
}

/// A page that says what went wrong, with its HTTP status.
fn error_page(status: actix_web::http::StatusCode, title: &str, message: &str) -> HttpResponse {
    use askama::Template;
    let page = ErrorPage {
        css: assets::CSS,
        title,
        message,
    };
    match html(page.render()) {
        Ok(mut res) => {
            *res.status_mut() = status;
            res
        }
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}
