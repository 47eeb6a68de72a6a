//! What operators see and steer: `/metrics` read by Prometheus's own parser.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use serde_json::json;

use crate::both_backends;
use crate::harness::{request, run_body, Backend, TestServer, DEAD, HOSTS};

both_backends!(metrics_after_a_mixed_run_match_the_tables);

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// `(name, labels)` → value of every sample of a scrape, as `prometheus_client`'s OpenMetrics
/// parser (Python, the Prometheus project's own client) reads it; the parse fails on any text
/// that is not valid OpenMetrics.
fn scrape(server: &TestServer) -> BTreeMap<(String, String), f64> {
    let (status, text) = request("GET", &format!("{}/metrics", server.base), &[], "");
    assert_eq!(status, 200, "{text}");
    let python = std::env::var("DLTEST_PY_TOOLS")
        .expect("DLTEST_PY_TOOLS is not set: run the tests with scripts/test (scripts/py-tools)");
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out.append([s.name, labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the scrape:\n{text}"
    );
    let samples: Vec<(String, String, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    samples
        .into_iter()
        .map(|(name, labels, v)| ((name, labels), v))
        .collect()
}

fn counts(server: &TestServer, sql: &'static str) -> BTreeMap<String, i64> {
    let rows: Vec<Count> = server.view.read(|c| Ok(diesel::sql_query(sql).load(c)?));
    rows.into_iter().map(|r| (r.key, r.n)).collect()
}

/// A success, a failure with an unreachable host, a stop and a time limit; then every figure of
/// `/metrics` that the tables also hold is compared with them (plain SQL).
fn metrics_after_a_mixed_run_match_the_tables(backend: Backend) {
    let server = TestServer::start_with(backend, |s| {
        s.task_time_limit_secs = 15;
        s.stop_grace_secs = 2;
    });
    let ok = server.run(run_body("m-ok", &HOSTS, "- ping:\n"));
    let failing = server.run(run_body("m-fail", &[HOSTS[0], DEAD], "- ping:\n"));
    let sleep = "- command: sleep 600\n";
    let stopped = server.run(run_body("m-stop", &[HOSTS[1]], sleep));
    let limited = server.run(run_body("m-limit", &[HOSTS[2]], sleep));
    server.wait_status(stopped, &[2], 30);
    let answer = server.call("/api/stop", json!({"id": stopped, "name": "m-stop"}));
    assert_eq!(answer["code"], json!(0), "{answer}");
    for id in [ok, failing, stopped, limited] {
        server.wait_end(id, 90);
    }
    let m = scrape(&server);
    let get = |name: &str, labels: &str| -> f64 {
        *m.get(&(name.to_owned(), labels.to_owned()))
            .unwrap_or_else(|| panic!("no sample {name}{{{labels}}} in {m:?}"))
    };

    let by_status = counts(
        &server,
        "SELECT s.name AS key, count(*) AS n FROM tasks t JOIN task_statuses s ON s.code = t.status GROUP BY s.name",
    );
    assert_eq!(
        by_status,
        BTreeMap::from([
            ("failed".into(), 1),
            ("stopped".into(), 1),
            ("success".into(), 1),
            ("timeout".into(), 1)
        ])
    );
    for status in [
        "pending",
        "running",
        "failed",
        "success",
        "stopped",
        "timeout",
        "interrupted",
    ] {
        let rows = by_status.get(status).copied().unwrap_or(0) as f64;
        assert_eq!(get("downlink_tasks", &format!("status={status}")), rows);
        if rows > 0.0 {
            let label = format!("status={status}");
            assert_eq!(
                get("downlink_tasks_finished_total", &label),
                rows,
                "{status}"
            );
        }
    }
    let results = counts(
        &server,
        "SELECT result AS key, count(*) AS n FROM task_hosts WHERE result IS NOT NULL GROUP BY result",
    );
    assert_eq!(results.values().sum::<i64>(), 7, "{results:?}");
    for (result, n) in &results {
        let label = format!("result={result}");
        assert_eq!(get("downlink_host_results_total", &label), *n as f64);
    }
    let events = counts(
        &server,
        "SELECT 'all' AS key, count(*) AS n FROM task_events",
    );
    assert_eq!(
        get("downlink_events_stored_total", ""),
        events["all"] as f64
    );
    assert!(events["all"] > 10, "{events:?}");
    assert_eq!(get("downlink_task_kills_total", "reason=stop"), 1.0);
    assert_eq!(get("downlink_task_kills_total", "reason=time_limit"), 1.0);
    assert_eq!(
        get("downlink_http_requests_total", "code=200,endpoint=/api/run"),
        4.0
    );
    assert_eq!(
        get(
            "downlink_http_request_duration_seconds_count",
            "endpoint=/api/run"
        ),
        4.0
    );
    assert_eq!(get("downlink_task_queue_wait_seconds_count", ""), 4.0);
    assert_eq!(get("downlink_task_run_duration_seconds_count", ""), 4.0);
    // The time-limited task ran at least its limit.
    assert!(get("downlink_task_run_duration_seconds_sum", "") >= 15.0);
    assert_eq!(get("downlink_queue_length", ""), 0.0);
    assert_eq!(get("downlink_forks_in_use", ""), 0.0);
    assert_eq!(
        get("downlink_forks_budget", ""),
        f64::from(server.settings.max_forks)
    );
    assert_eq!(get("downlink_oldest_pending_task_age_seconds", ""), 0.0);
    assert_eq!(get("downlink_db_write_queue_depth", ""), 0.0);
}

/// `/metrics` takes the API's token unless `metrics_open`.
#[test]
fn metrics_are_behind_the_token_unless_open() {
    let hashes = vec![downlink::auth::hash_token("s3cret")];
    let closed = TestServer::start_with(Backend::Sqlite, |s| s.auth_token_hashes = hashes.clone());
    let url = format!("{}/metrics", closed.base);
    assert_eq!(request("GET", &url, &[], "").0, 401);
    let (status, text) = request("GET", &url, &[("Authorization", "Bearer s3cret")], "");
    assert_eq!(status, 200);
    assert!(text.ends_with("# EOF\n"), "{text}");
    let open = TestServer::start_with(Backend::Sqlite, |s| {
        s.auth_token_hashes = hashes;
        s.metrics_open = true;
    });
    let (status, text) = request("GET", &format!("{}/metrics", open.base), &[], "");
    assert_eq!(status, 200);
    assert!(text.contains("downlink_forks_budget 50\n"), "{text}");
    // Only /metrics is opened.
    let check = json!({"id": 1, "name": "x"}).to_string();
    assert_eq!(open.post("/api/check", &check).0, 401);
}
