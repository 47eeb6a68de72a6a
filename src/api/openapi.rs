//! The OpenAPI 3 description of the API, generated from these Rust types (utoipa) and served at
//! `GET /api/openapi.json`. It says what `CONTRACT.md` says: every answer of the envelope is
//! HTTP 200, either the endpoint's success or `{"code":-1,"message":…}`.

use std::collections::BTreeMap;

use actix_web::HttpResponse;
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::check::CheckContent;

/// `params`: a JSON object, a JSON object encoded in a string, or `key=value` text (`""` = none).
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Params {
    Text(String),
    Object(BTreeMap<String, serde_json::Value>),
}

/// `fork_num`: a number or a numeric string, 1..=`max_fork_num`.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ForkNum {
    Number(u32),
    Text(String),
}

/// Body of `/api/run` and `/api/parallel_run`. Give `tasks` or `content` (the playbook, YAML).
#[derive(Deserialize, Serialize, ToSchema)]
pub struct RunBody {
    /// IPv4/IPv6 literals or DNS host names; duplicates are dropped.
    #[schema(min_items = 1, example = json!(["192.201.11.31"]))]
    pub nodes: Vec<String>,
    /// Remote user: POSIX user-name characters.
    #[schema(example = "root")]
    pub user: String,
    /// Unique among all tasks ever stored.
    #[schema(min_length = 1, max_length = 255)]
    pub name: String,
    /// A playbook (list of plays) or a list of tasks, as YAML.
    #[schema(example = "- ping:\n")]
    pub tasks: Option<String>,
    /// Same as `tasks` (the original document's examples use this key).
    pub content: Option<String>,
    pub params: Params,
    pub fork_num: ForkNum,
}

/// Body of `/api/stop` and `/api/check`: both must name the same task.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct TaskRef {
    #[schema(minimum = 1)]
    pub id: i64,
    pub name: String,
}

/// Body of `/api/getlog`.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct GetlogBody {
    pub host: String,
    /// The `X-RESOURCE` of the requests that started the tasks.
    pub source: String,
    /// Newest records kept (default 1000).
    #[schema(minimum = 1, maximum = 10000)]
    pub limit: Option<i64>,
}

/// A refused or failed request.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct Failure {
    /// Always -1.
    #[schema(minimum = -1, maximum = -1)]
    pub code: i32,
    /// e.g. `json encode error`, `param error, error: nodes: must not be empty`,
    /// `task name is duplicate`, `task not found...`, `database unavailable, retry later`.
    pub message: String,
}

/// `content` of a `/api/run` success.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct RunContent {
    pub id: i64,
}

/// `/api/run` success.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct RunOk {
    #[schema(minimum = 0, maximum = 0)]
    pub code: i32,
    pub content: RunContent,
}

/// An empty object.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct Empty {}

/// `/api/stop` success.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct StopOk {
    #[schema(minimum = 0, maximum = 0)]
    pub code: i32,
    pub content: Empty,
}

/// `/api/check` success.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct CheckOk {
    #[schema(minimum = 0, maximum = 0)]
    pub code: i32,
    pub content: CheckContent,
}

/// Answer of `/api/run`.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum RunAnswer {
    Ok(RunOk),
    Failed(Failure),
}

/// Answer of `/api/stop`.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StopAnswer {
    Ok(StopOk),
    Failed(Failure),
}

/// Answer of `/api/check`.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
// The shape of the document (and of answers decoded in tests), never built by the server.
#[allow(clippy::large_enum_variant)]
pub enum CheckAnswer {
    Ok(CheckOk),
    Failed(Failure),
}

/// Answer of `/api/getlog` and `/api/parallel_run`: log lines
/// (`global_id = …, source = …, create_time = …, end_time = …, host = …, reuslt = …`), or a failure.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum LinesAnswer {
    Lines(Vec<String>),
    Failed(Failure),
}

macro_rules! endpoint {
    ($fn:ident, $path:literal, $body:ty, $answer:ty, $summary:literal) => {
        #[doc = $summary]
        #[utoipa::path(
            post,
            path = $path,
            request_body(content = $body, content_type = "application/json"),
            params(
                ("X-CORRELATION-ID" = String, Header, description = "Relation id, printed on every log line of the request (1..=256 bytes, no control characters)"),
                ("X-RESOURCE" = String, Header, description = "The caller, e.g. orion (1..=256 bytes, no control characters)"),
            ),
            responses(
                (status = 200, description = "The envelope: success or {code: -1, message}", body = $answer),
                (status = 401, description = "Missing or wrong bearer token", body = Failure),
                (status = 403, description = "Caller outside allow_networks, or a read token on run, parallel_run or stop", body = Failure),
            ),
            security((), ("bearer" = [])),
        )]
        #[allow(dead_code)]
        fn $fn() {}
    };
}

endpoint!(
    run,
    "/api/run",
    RunBody,
    RunAnswer,
    "Start a task; answers its id once stored."
);
endpoint!(
    stop,
    "/api/stop",
    TaskRef,
    StopAnswer,
    "Stop a task; answers once it is recorded as stopped."
);
endpoint!(
    check,
    "/api/check",
    TaskRef,
    CheckAnswer,
    "A task's status and host records."
);
endpoint!(
    getlog,
    "/api/getlog",
    GetlogBody,
    LinesAnswer,
    "Execution records of a host for a source."
);
endpoint!(
    parallel_run,
    "/api/parallel_run",
    RunBody,
    LinesAnswer,
    "Run a task and wait for its end; answers one log line per node."
);

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(title = "downlink", description = "Agent end of an orchestrator's dispatch channel (see CONTRACT.md)."),
    paths(run, stop, check, getlog, parallel_run),
    modifiers(&Bearer),
)]
pub struct ApiDoc;

/// GET /api/openapi.json
pub async fn handle() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_the_five_endpoints() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/api/run",
            "/api/stop",
            "/api/check",
            "/api/getlog",
            "/api/parallel_run",
        ] {
            assert!(paths[p]["post"]["responses"]["200"].is_object(), "{p}");
        }
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    }
}
