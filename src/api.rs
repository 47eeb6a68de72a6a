//! The HTTP API of `CONTRACT.md`: one file per endpoint, and here what they share: the route
//! table, the envelope, the contract's error strings (rendered in exactly one place), the two
//! required headers and the body, which is read as JSON whatever its `Content-Type`.

pub mod auth;
pub mod health;
pub mod middleware;

pub mod check;
pub mod events;
pub mod fields;
pub mod getlog;
pub mod metrics;
pub mod openapi;
pub mod parallel_run;
pub mod run;
pub mod stop;
pub mod tasks;

use std::sync::Arc;

use actix::Addr;
use actix_web::body::BoxBody;
use actix_web::dev::Payload;
use actix_web::http::StatusCode;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{Map, Value};
use slog::{o, warn, Logger};

use crate::settings::Settings;
use crate::store::db::Pool;
use crate::store::persistence::Persistence;
use crate::store::StoreError;
use crate::supervisor::TaskSupervisor;

/// What every handler reaches: settings, the read pool and the actors.
pub struct AppState {
    /// Who may call (tokens, allow-list).
    pub access: crate::api::auth::Access,
    pub settings: Arc<Settings>,
    pub pool: Pool,
    /// The HTTP workers' own PostgreSQL read connections, when the URL allows them.
    pub readers: Option<crate::store::readers::Readers>,
    pub persistence: Addr<Persistence>,
    pub supervisor: Addr<TaskSupervisor>,
    pub log: Logger,
    /// Turns true when the server starts shutting down.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// `/readyz` checks.
    pub health: crate::api::health::Checks,
    /// What the writer knows of the database.
    pub db_health: Arc<crate::store::persistence::DbHealth>,
    /// How task processes are tracked (`exec::Tracking::describe`).
    pub process_tracking: String,
    /// Places left in the pending queue.
    pub slots: Arc<crate::supervisor::QueueSlots>,
    /// What `/metrics` shows.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Changes after each commit of events or a task's end (event streams wait on it).
    pub committed: tokio::sync::watch::Receiver<u64>,
    /// The run directory's disk (new tasks are refused while it is low).
    pub disk: Arc<crate::disk::Watch>,
}

/// The route table.
pub fn routes(cfg: &mut web::ServiceConfig) {
    let endpoint = |path: &str, handler| {
        web::resource(path)
            .route(handler)
            .default_service(web::to(method_not_allowed))
    };
    cfg.service(endpoint("/api/run", web::post().to(run::handle)))
        .service(endpoint("/api/stop", web::post().to(stop::handle)))
        .service(endpoint("/api/check", web::post().to(check::handle)))
        .service(endpoint("/api/getlog", web::post().to(getlog::handle)))
        .service(endpoint(
            "/api/parallel_run",
            web::post().to(parallel_run::handle),
        ))
        .service(endpoint(
            "/api/openapi.json",
            web::get().to(openapi::handle),
        ))
        .service(endpoint("/api/tasks", web::get().to(tasks::list)))
        .service(endpoint("/api/tasks/{id}", web::get().to(tasks::show)))
        .service(endpoint(
            "/api/tasks/{id}/events",
            web::get().to(events::handle),
        ))
        .service(endpoint("/metrics", web::get().to(metrics::handle)));
}

/// An answer of the API that is not a success: the contract's `{"code":-1,"message":…}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("json encode error")]
    Json,
    #[error("param error, error: {0}")]
    Param(String),
    #[error("task name is duplicate")]
    Duplicate,
    #[error("task not found...")]
    NotFound,
    #[error("database unavailable, retry later")]
    DbUnavailable,
    #[error("not found")]
    NoRoute,
    #[error("method not allowed")]
    Method,
    #[error("unauthorized")]
    Unauthorized(crate::api::auth::Refusal),
    #[error("forbidden: this token may only read; running and stopping tasks need a token with the operate role")]
    ReadOnly,
    #[error("{0}")]
    Other(String),
}

impl ApiError {
    /// A missing, mistyped or out-of-range field.
    pub fn param(field: &str, reason: impl std::fmt::Display) -> ApiError {
        ApiError::Param(format!("{field}: {reason}"))
    }
}

/// The message of an error answer, kept on the response for the request log line.
#[derive(Debug, Clone)]
pub struct ErrorMessage(pub String);

#[derive(Serialize)]
struct Failure<'a> {
    code: i32,
    message: &'a str,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            // Existing clients read `code` and some raise on 4xx: every envelope answer is 200.
            ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::Method => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(crate::api::auth::Refusal::Token) => StatusCode::UNAUTHORIZED,
            ApiError::Unauthorized(crate::api::auth::Refusal::Network) | ApiError::ReadOnly => {
                StatusCode::FORBIDDEN
            }
            _ => StatusCode::OK,
        }
    }

    fn error_response(&self) -> HttpResponse<BoxBody> {
        let message = self.to_string();
        let mut res = HttpResponse::build(self.status_code()).json(Failure {
            code: -1,
            message: &message,
        });
        if let ApiError::Unauthorized(crate::api::auth::Refusal::Token) = self {
            res.headers_mut().insert(
                actix_web::http::header::WWW_AUTHENTICATE,
                actix_web::http::header::HeaderValue::from_static("Bearer"),
            );
        }
        res.extensions_mut().insert(ErrorMessage(message));
        res
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Duplicate => ApiError::Duplicate,
            StoreError::Refused(why) => ApiError::Param(why),
            StoreError::Unavailable(_) | StoreError::Query(_) => ApiError::DbUnavailable,
        }
    }
}

#[derive(Serialize)]
struct Success<T: Serialize> {
    code: i32,
    content: T,
}

/// The `{id}` of a path such as `/api/tasks/{id}`.
pub fn path_id(req: &actix_web::HttpRequest) -> Result<i64, ApiError> {
    req.match_info()
        .get("id")
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::param("id", "must be a positive integer"))
}

/// `{"code":0,"content":…}`.
pub fn success<T: Serialize>(content: T) -> HttpResponse {
    HttpResponse::Ok().json(Success { code: 0, content })
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::Method)
}

/// Answer to any path that is not an endpoint.
pub async fn no_route() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NoRoute)
}

/// Who is calling: the two required headers, the token the call was accepted for, and through
/// what it came.
#[derive(Debug, Clone)]
pub struct Caller {
    pub correlation_id: String,
    pub source: String,
    /// The token's name (`local` without tokens): recorded as who ran or stopped a task.
    pub who: String,
    /// `api`, or `cli` for `downlink tasks …` (it says so in `X-Downlink-Via`); the console's
    /// own calls are `console`.
    pub via: &'static str,
}

/// The `X-Downlink-Via` header the CLI sends.
pub const VIA_HEADER: &str = "X-Downlink-Via";

const MAX_HEADER: usize = 256;

/// A required header's value, or the contract's param error saying what is wrong with it.
fn required_header(req: &HttpRequest, name: &str) -> Result<String, ApiError> {
    let Some(value) = req.headers().get(name) else {
        return Err(ApiError::param(name, "missing header"));
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::param(name, "empty header"));
    }
    if bytes.len() > MAX_HEADER {
        return Err(ApiError::param(
            name,
            format!("longer than {MAX_HEADER} bytes"),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| ApiError::param(name, "not UTF-8"))?;
    if text.chars().any(char::is_control) {
        return Err(ApiError::param(name, "holds control characters"));
    }
    Ok(text.trim().to_owned())
}

impl Caller {
    /// Reads and checks `X-CORRELATION-ID` and `X-RESOURCE`.
    pub fn from_request(req: &HttpRequest) -> Result<Caller, ApiError> {
        use actix_web::HttpMessage;
        let who = req
            .extensions()
            .get::<auth::Identity>()
            .map_or_else(|| auth::LOCAL.to_owned(), |i| i.name.clone());
        let cli = req
            .headers()
            .get(VIA_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cli"));
        Ok(Caller {
            correlation_id: required_header(req, "X-CORRELATION-ID")?,
            source: required_header(req, "X-RESOURCE")?,
            who,
            via: if cli { "cli" } else { "api" },
        })
    }

    /// A child logger carrying the caller's context.
    pub fn logger(&self, log: &Logger) -> Logger {
        log.new(
            o!("correlation_id" => self.correlation_id.clone(), "source" => self.source.clone()),
        )
    }
}

/// A request of the API, read the same way for every endpoint: the two required headers, then the
/// body (bounded by `body_limit`), which must be a JSON object whatever the `Content-Type` says.
pub struct ApiRequest {
    pub caller: Caller,
    pub body: Map<String, Value>,
    /// A logger carrying the caller's `correlation_id` and `source`.
    pub log: Logger,
}

impl FromRequest for ApiRequest {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<ApiRequest, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let caller = Caller::from_request(req);
        let declared = req
            .headers()
            .get(actix_web::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::Other("server not configured".into()))?;
            let caller = caller?;
            let limit = state.settings.body_limit;
            let too_large = || ApiError::Param("body too large".to_owned());
            if declared.is_some_and(|n| n > limit) {
                return Err(too_large());
            }
            let mut body = web::BytesMut::new();
            let read = async {
                while let Some(chunk) = payload.next().await {
                    let chunk = chunk.map_err(|_| ApiError::Json)?;
                    if body.len() + chunk.len() > limit {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(())
            };
            // A client that trickles its body must not hold a worker forever.
            let timeout = std::time::Duration::from_secs(state.settings.client_timeout_secs);
            tokio::time::timeout(timeout, read)
                .await
                .map_err(|_| ApiError::Param("body not received in time".to_owned()))??;
            let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else {
                return Err(ApiError::Json);
            };
            let log = caller.logger(&state.log);
            Ok(ApiRequest { caller, body, log })
        })
    }
}

/// Runs blocking store work on the blocking pool; any database failure is the contract's
/// "database unavailable", with the real error logged.
pub async fn read_store<T, F>(state: &AppState, log: &Logger, f: F) -> Result<T, ApiError>
where
    F: FnOnce(&mut crate::store::db::DbConnection) -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    let pool = state.pool.clone();
    let result = web::block(move || {
        let mut conn = pool.get()?;
        f(&mut conn)
    })
    .await
    .map_err(|e| ApiError::Other(format!("internal error: {e}")))?;
    read_failed(log, result)
}

/// A read on the HTTP worker's own PostgreSQL connections when it has them (`readers`), else
/// `on_pool` through the pool; a failure is logged and answered as [`read_store`] does.
pub async fn read_either<T, R, Fut, P>(
    state: &AppState,
    log: &Logger,
    on_reader: R,
    on_pool: P,
) -> Result<T, ApiError>
where
    R: FnOnce(std::rc::Rc<crate::store::readers::ReadConn>) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
    P: FnOnce(&mut crate::store::db::DbConnection) -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    match &state.readers {
        Some(readers) => read_failed(log, readers.read(on_reader).await),
        None => read_store(state, log, on_pool).await,
    }
}

/// A read's result, with a failure logged and turned into the API's error.
fn read_failed<T>(log: &Logger, result: Result<T, StoreError>) -> Result<T, ApiError> {
    result.map_err(|e| {
        warn!(log, "database read failed"; "error" => %e);
        ApiError::from(e)
    })
}
