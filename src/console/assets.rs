//! The console's static files, compiled into the binary and served with a long cache life (their
//! URLs carry the binary's version, so a new binary is a new URL).

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpResponse};

/// The style sheet's URL, as pages link it.
pub const CSS: &str = concat!("/ui/assets/console-", env!("CARGO_PKG_VERSION"), ".css");

const CSS_TEXT: &str = include_str!("../../assets/console.css");

/// GET /ui/assets/{name}
pub async fn serve(name: web::Path<String>) -> HttpResponse {
    let (body, kind) = match format!("/ui/assets/{name}").as_str() {
        CSS => (CSS_TEXT, "text/css; charset=utf-8"),
        _ => return HttpResponse::NotFound().finish(),
    };
    let mut res = HttpResponse::Ok().content_type(kind).body(body);
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    res
}
