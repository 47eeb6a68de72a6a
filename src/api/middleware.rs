//! The two layers every request passes before a handler: the request log (outer: logs and counts
//! every answer, refusals included) and the gate (inner: refuses callers that do not belong, by
//! token and allow-list, before any handler runs).

use std::time::Instant;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::AUTHORIZATION;
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpMessage, ResponseError};
use slog::{info, warn};

use super::auth::{is_console, operates, OPEN_PATHS};
use super::{ApiError, AppState, ErrorMessage};

/// Refuses a caller without a valid token or from outside the allow-list; `/healthz`, `/readyz`
/// (and `/metrics` with `metrics_open`) are open to every caller.
pub async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        // Every app of this server has its state; without one there is nothing to check against.
        let res =
            ApiError::Other("internal error: the server has no state".into()).error_response();
        return Ok(req.into_response(res).map_into_right_body());
    };
    let path = req.path();
    let open = OPEN_PATHS.contains(&path) || (state.settings.metrics_open && path == "/metrics");
    if !open {
        let peer = req.peer_addr().map(|a| a.ip());
        let authz = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
        let checked = if is_console(path) {
            state.access.check_network(peer).map(|()| None)
        } else {
            state.access.check(peer, authz).map(Some)
        };
        match checked {
            Err(why) => {
                warn!(state.log, "refused a caller"; "peer" => req.peer_addr().map(|a| a.to_string()),
                      "path" => path.to_owned(), "reason" => format!("{why:?}"));
                let res = ApiError::Unauthorized(why).error_response();
                return Ok(req.into_response(res).map_into_right_body());
            }
            Ok(None) => {}
            Ok(Some(who)) if !who.may_operate() && operates(req.method(), path) => {
                warn!(state.log, "refused a read token"; "token" => &who.name,
                      "path" => path.to_owned());
                let res = ApiError::ReadOnly.error_response();
                return Ok(req.into_response(res).map_into_right_body());
            }
            Ok(Some(who)) => {
                req.extensions_mut().insert(who);
            }
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// Logs every request with its answer, correlation id and source, and counts it in `/metrics`
/// by route pattern.
pub async fn log_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let method = req.method().to_string();
    let path = req.path().to_owned();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| printable(v.as_bytes()))
            .unwrap_or_default()
    };
    let correlation_id = header("X-CORRELATION-ID");
    let source = header("X-RESOURCE");
    let peer = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let res = next.call(req).await?;
    let Some(state) = state else {
        return Ok(res);
    };
    let endpoint = res.request().match_pattern();
    state.metrics.request(
        endpoint.as_deref().unwrap_or("unmatched"),
        res.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    let error = res
        .response()
        .extensions()
        .get::<ErrorMessage>()
        .map(|m| m.0.clone());
    info!(state.log, "request";
        "method" => method, "path" => path,
        "status" => res.status().as_u16(),
        "latency_ms" => started.elapsed().as_secs_f64() * 1000.0,
        "correlation_id" => correlation_id, "source" => source,
        "peer" => peer, "error" => error);
    Ok(res)
}

/// A header value for a log line: at most 256 characters, control characters replaced.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(256)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_values_are_cut_and_control_characters_replaced() {
        assert_eq!(super::printable(b"ab\ncd\x00"), "ab?cd?");
        assert_eq!(super::printable(&[b'x'; 300]).len(), 256);
        assert_eq!(super::printable(b"\xff"), "\u{fffd}");
    }
}
