//! What operators see and steer: `/metrics` read by Prometheus's own parser.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use serde_json::{json, Value};

use crate::both_backends;
use crate::harness::{request, run_body, stream, Backend, BinServer, TestServer, DEAD, HOSTS};

both_backends!(
    metrics_after_a_mixed_run_match_the_tables,
    a_stream_from_zero_and_resumed_mid_way_holds_each_stored_event_once,
    retention_removes_exactly_the_old_tasks_events_and_directories,
    retention_without_the_audit_trail_deletes_the_old_tasks_rows,
);

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
    for &status in &crate::harness::STATUS_NAMES[1..] {
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
    let hashes = vec![downlink::api::auth::hash_token("s3cret")];
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

#[derive(QueryableByName, Debug, Clone, PartialEq)]
struct StoredEvent {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    seq: i32,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    host: Option<String>,
    #[diesel(sql_type = Text)]
    kind: String,
}

/// A task's events as plain SQL reads them.
fn stored_events(server: &TestServer, id: i64) -> Vec<StoredEvent> {
    let sql = format!("SELECT seq, host, kind FROM task_events WHERE task_id = {id} ORDER BY seq");
    server
        .view
        .read(move |c| Ok(diesel::sql_query(sql.clone()).load(c)?))
}

/// `(seq, host, kind)` of the event lines of an NDJSON stream, and its closing line.
fn ndjson_events(lines: &[String]) -> (Vec<StoredEvent>, Value) {
    let mut events = Vec::new();
    let mut end = Value::Null;
    for (i, line) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        match v["type"].as_str() {
            Some("event") => events.push(StoredEvent {
                seq: v["seq"].as_i64().unwrap() as i32,
                host: v["host"].as_str().map(str::to_owned),
                kind: v["kind"].as_str().unwrap().to_owned(),
            }),
            Some("end") => {
                assert_eq!(i, lines.len() - 1, "the end line is the last");
                end = v;
            }
            Some("keepalive") => {}
            other => panic!("unexpected line type {other:?}: {line}"),
        }
    }
    (events, end)
}

/// Read live from 0 while a real ansible-playbook runs, then again from the middle (NDJSON, and
/// SSE resumed by `Last-Event-ID`), and with a host filter: each is exactly the stored events
/// after the cursor, once each, in order, closed by the row's final status.
fn a_stream_from_zero_and_resumed_mid_way_holds_each_stored_event_once(backend: Backend) {
    let server = TestServer::start(backend);
    let play = "- ping:\n- command: sleep 2\n- command: \"true\"\n- debug:\n    msg: hello\n";
    let id = server.run(run_body("stream", &[HOSTS[0], HOSTS[1]], play));
    let (content_type, lines) = stream(
        &server.base,
        &format!("/api/tasks/{id}/events?after=0"),
        &[],
    );
    // Read the row right after the end line arrived: its status is already committed.
    let row = server.view.task(id);
    assert_eq!(content_type, "application/x-ndjson");
    let (live, end) = ndjson_events(&lines);
    assert_eq!(row.status, 4, "{:?}", row.err);
    assert_eq!(end["status"], json!(4), "{end}");
    assert_eq!(end["status_name"], json!("success"));
    assert_eq!(end["task_id"], json!(id));
    let stored = stored_events(&server, id);
    assert!(stored.len() > 10, "{stored:?}");
    assert_eq!(
        live, stored,
        "the live stream is the stored events, once each"
    );
    assert_eq!(stored.last().unwrap().kind, "stats");

    let mid = stored[stored.len() / 2].seq;
    let rest: Vec<StoredEvent> = stored.iter().filter(|e| e.seq > mid).cloned().collect();
    let (_, lines) = stream(
        &server.base,
        &format!("/api/tasks/{id}/events?after={mid}"),
        &[],
    );
    let (resumed, end) = ndjson_events(&lines);
    assert_eq!(resumed, rest);
    assert_eq!(end["status"], json!(4));

    // SSE: `Last-Event-ID` wins over `after`; `id:` is each event's seq.
    let last = mid.to_string();
    let (content_type, lines) = stream(
        &server.base,
        &format!("/api/tasks/{id}/events?after=0"),
        &[("Accept", "text/event-stream"), ("Last-Event-ID", &last)],
    );
    assert_eq!(content_type, "text/event-stream");
    let ids: Vec<i32> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(ids, rest.iter().map(|e| e.seq).collect::<Vec<_>>());
    let tail = &lines[lines.len() - 3..];
    assert_eq!(tail[0], "event: end");
    let end: Value = serde_json::from_str(tail[1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(end["status"], json!(4));
    assert_eq!(tail[2], "");

    let (_, lines) = stream(
        &server.base,
        &format!("/api/tasks/{id}/events?after=0&host={}", HOSTS[1]),
        &[],
    );
    let (filtered, _) = ndjson_events(&lines);
    let of_host: Vec<StoredEvent> = stored
        .iter()
        .filter(|e| e.host.as_deref() == Some(HOSTS[1]))
        .cloned()
        .collect();
    assert!(of_host.len() >= 4, "{of_host:?}");
    assert_eq!(filtered, of_host);

    // Errors before the stream: the API's envelope.
    let missing = request(
        "GET",
        &format!("{}/api/tasks/999999/events", server.base),
        &[],
        "",
    );
    assert_eq!(
        missing,
        (
            200,
            "{\"code\":-1,\"message\":\"task not found...\"}".into()
        )
    );
    let bad = request(
        "GET",
        &format!("{}/api/tasks/{id}/events?after=-1", server.base),
        &[],
        "",
    );
    assert_eq!(
        bad,
        (200, "{\"code\":-1,\"message\":\"param error, error: after: must be a non-negative integer\"}".into())
    );
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A task stores 50,000 events while its client reads slowly: the client gets every one of them
/// once, a keep-alive while the task is quiet, and the end; the server's RSS (read from /proc)
/// grows by less than 20 MB, because the database is the buffer.
#[test]
fn a_slow_client_of_50000_events_loses_none_and_costs_the_server_no_memory() {
    use std::io::BufRead;
    let dir = crate::harness::TempDir::new();
    let db = crate::harness::TestDb::new(Backend::Postgres, &dir.0);
    let mut settings = crate::harness::test_settings(&dir.0);
    settings.database_url = db.url.clone();
    settings.ansible_playbook = crate::hostile::standin(&dir.0);
    settings.event_stream_keepalive_secs = 2;
    let server = BinServer::start(&settings, &dir.0);
    let pid = server.child.id();
    let before = rss_kb(pid);
    let body = json!({
        "nodes": ["h1.example"], "user": "root", "name": "many", "tasks": "- ping:\n", "fork_num": 1,
        // Quiet for longer than the reading takes plus a keep-alive, after its events.
        "params": {"standin_generate": {"count": 50000, "host": "h1.example"}, "standin_sleep": 15},
    });
    let (_, answer) = server.post("/api/run", &body.to_string());
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let id = answer["content"]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("{answer}"));
    let res = ureq::get(&format!("{}/api/tasks/{id}/events?after=0", server.base))
        .call()
        .unwrap();
    let mut reader = std::io::BufReader::with_capacity(4096, res.into_reader());
    let (mut seqs, mut keepalives, mut end, mut peak) = (Vec::new(), 0, Value::Null, before);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        let v: Value = serde_json::from_str(&line).unwrap();
        match v["type"].as_str() {
            Some("event") => {
                seqs.push(v["seq"].as_i64().unwrap());
                // About 5,000 events a second: slower than they are stored.
                if seqs.len() % 500 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    peak = peak.max(rss_kb(pid));
                }
            }
            Some("keepalive") => keepalives += 1,
            Some("end") => end = v,
            other => panic!("unexpected {other:?}"),
        }
        line.clear();
    }
    peak = peak.max(rss_kb(pid));
    assert_eq!(seqs.len(), 50000, "every event once");
    assert!(
        seqs.windows(2).all(|w| w[0] + 1 == w[1]),
        "in order, no gap"
    );
    assert!(keepalives >= 1, "a keep-alive while the task was quiet");
    crate::harness::figure(
        "event stream: server RSS at start / peak while a slow client read 50,000 events",
        format!(
            "{:.1} / {:.1} MB",
            before as f64 / 1024.0,
            peak as f64 / 1024.0
        ),
    );
    assert!(end["status"].as_i64().is_some_and(|s| s >= 3), "{end}");
    let grew_mb = (peak.saturating_sub(before)) as f64 / 1024.0;
    crate::harness::figure(
        "event stream RSS growth (50,000 events, slow client)",
        format!("{grew_mb:.1} MB"),
    );
    assert!(grew_mb < 20.0, "the server's RSS grew {grew_mb:.1} MB");
}

/// `downlink tasks …` run as a separate process against a live server with a token.
fn tasks_cli(server: &TestServer, token_file: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_downlink"))
        .arg("tasks")
        .args(["--server", &server.base, "--token-file"])
        .arg(token_file)
        .args(args)
        .env_remove("DOWNLINK_DATABASE_URL")
        .env_remove("DOWNLINK_TOKEN")
        .output()
        .expect("downlink runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.is_empty() || out.status.code() != Some(0),
        "{stderr}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &stderr,
    )
}

/// list, show, watch to the end and stop, through the API with its token: what they print is
/// what the rows hold (plain SQL), and a stop leaves no process of the task.
#[test]
fn the_tasks_cli_lists_shows_watches_and_stops_through_the_api() {
    let server = TestServer::start_with(Backend::Postgres, |s| {
        s.auth_token_hashes = vec![downlink::api::auth::hash_token("cli-s3cret")];
    });
    let token = server.dir.0.join("token");
    std::fs::write(&token, "cli-s3cret\n").unwrap();
    let wrong = server.dir.0.join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let auth = [
        ("X-CORRELATION-ID", "1-1"),
        ("X-RESOURCE", "cli-src"),
        ("Authorization", "Bearer cli-s3cret"),
    ];
    let run = |body: Value| -> i64 {
        let (status, text) = server.post_with("/api/run", &auth, &body.to_string());
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["content"]["id"].as_i64().unwrap_or_else(|| panic!("{v}"))
    };
    let play = "- ping:\n- command: sleep 2\n- command: \"false\"\n  when: inventory_hostname == '127.0.0.3'\n";
    let mixed = run(run_body("cli-mixed", &[HOSTS[0], HOSTS[1], DEAD], play));

    // watch, started while the task runs, follows it to its end.
    let (code, watched) = tasks_cli(&server, &token, &["watch", &mixed.to_string()]);
    let row = server.view.task(mixed);
    assert_eq!(row.status, 3);
    assert_eq!(code, 3, "3: the task did not succeed\n{watched}");
    let stored = stored_events(&server, mixed);
    let logged: Vec<i32> = watched
        .lines()
        .map_while(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(logged, stored.iter().map(|e| e.seq).collect::<Vec<_>>());
    assert!(
        watched.contains(&format!("task {mixed} \"cli-mixed\": failed (3)")),
        "{watched}"
    );
    // The per-host table (watch ends with it, show prints it) is the rows.
    let (code, shown) = tasks_cli(&server, &token, &["show", &mixed.to_string()]);
    assert_eq!(code, 0, "{shown}");
    assert!(
        watched.ends_with(&shown),
        "watch ends with show's table:\n{watched}\n{shown}"
    );
    #[derive(QueryableByName)]
    struct HostLine {
        #[diesel(sql_type = Text)]
        host: String,
        #[diesel(sql_type = Text)]
        result: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        ok: i32,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        failed: i32,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        unreachable: i32,
    }
    let sql = format!(
        "SELECT host, result, ok, failed, unreachable FROM task_hosts WHERE task_id = {mixed} ORDER BY id"
    );
    let rows: Vec<HostLine> = server
        .view
        .read(move |c| Ok(diesel::sql_query(sql.clone()).load(c)?));
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let line = shown
            .lines()
            .find(|l| l.starts_with(&format!("{} ", r.host)))
            .unwrap_or_else(|| panic!("no line for {} in\n{shown}", r.host));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], r.result, "{line}");
        assert_eq!(cols[2], r.ok.to_string(), "{line}");
        assert_eq!(cols[4], r.failed.to_string(), "{line}");
        assert_eq!(cols[5], r.unreachable.to_string(), "{line}");
    }

    // stop: answered once recorded; nothing of the task is left on this machine.
    let sleeper = run(run_body("cli-sleep", &[HOSTS[2]], "- command: sleep 600\n"));
    server.wait_status(sleeper, &[2], 30);
    let run_dir = server.run_dir(sleeper);
    assert!(!crate::harness::task_processes(&run_dir).is_empty());
    let (code, stopped) = tasks_cli(&server, &token, &["stop", &sleeper.to_string()]);
    assert_eq!(code, 0, "{stopped}");
    assert_eq!(
        stopped,
        format!("task {sleeper} \"cli-sleep\": stopped (5)\n")
    );
    assert_eq!(server.view.task(sleeper).status, 5);
    assert_eq!(crate::harness::task_processes(&run_dir), Vec::<i32>::new());
    // Who ran it and who stopped it, as plain SQL reads them: the token (unnamed, so named by
    // its hash), through the API and through the CLI.
    let token_name = format!(
        "token-{}",
        &downlink::api::auth::hash_token("cli-s3cret").to_string()[..8]
    );
    assert_eq!(
        crate::auth::who_asked(&server, sleeper),
        [
            Some(token_name.clone()),
            Some("api".into()),
            Some(token_name),
            Some("cli".into())
        ]
    );

    // list: newest first, filtered by status and source, the rows' values.
    let (code, listed) = tasks_cli(&server, &token, &["list"]);
    assert_eq!(code, 0, "{listed}");
    let ids: Vec<i64> = listed
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids, [sleeper, mixed]);
    assert!(
        listed.lines().nth(1).unwrap().contains(" stopped "),
        "{listed}"
    );
    let (_, failed) = tasks_cli(
        &server,
        &token,
        &["list", "--status", "failed", "--source", "cli-src"],
    );
    assert_eq!(failed.lines().count(), 2, "{failed}");
    assert!(
        failed.lines().nth(1).unwrap().ends_with(" cli-mixed"),
        "{failed}"
    );
    let (_, none) = tasks_cli(&server, &token, &["list", "--source", "elsewhere"]);
    assert_eq!(none.lines().count(), 1, "{none}");

    // Without the right token: refused, saying so.
    let (code, refused) = tasks_cli(&server, &wrong, &["list"]);
    assert_eq!(code, 1);
    assert_eq!(
        refused,
        format!(
            "downlink: {} answered HTTP 401: unauthorized\n",
            server.base
        )
    );
    let (code, missing) = tasks_cli(&server, &token, &["show", "999999"]);
    assert_eq!(
        (code, missing.as_str()),
        (1, "downlink: task not found...\n")
    );
}

/// Rows of a table for one task, by plain SQL.
fn rows_of(server: &TestServer, table: &str, id: i64) -> i64 {
    let sql = format!("SELECT 'n' AS key, count(*) AS n FROM {table} WHERE task_id = {id}");
    let rows: Vec<Count> = server
        .view
        .read(move |c| Ok(diesel::sql_query(sql.clone()).load(c)?));
    rows[0].n
}

fn sql_time(t: chrono::NaiveDateTime) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn exec(server: &TestServer, sql: String) {
    server
        .view
        .read(move |c| Ok(diesel::sql_query(sql.clone()).execute(c)?));
}

/// Waits until plain SQL finds `sql`'s count at `want`.
fn wait_count(server: &TestServer, sql: &str, want: i64, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let query = sql.to_owned();
        let rows: Vec<Count> = server
            .view
            .read(move |c| Ok(diesel::sql_query(query.clone()).load(c)?));
        if rows[0].n == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{sql}: {} after {secs} s, not {want}",
            rows[0].n
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Two tasks ended 40 days ago lose their events and run directories and keep their rows; a
/// recent one and one still running keep everything. On PostgreSQL a month partition that only
/// old tasks' events fall in is dropped whole, and one that a still-running task may have events
/// in is kept.
fn retention_removes_exactly_the_old_tasks_events_and_directories(backend: Backend) {
    let server = TestServer::start_with(backend, |s| {
        s.retention_days = 30;
        s.retention_check_secs = 1;
    });
    let ping = "- ping:\n";
    let old_a = server.run(run_body("ret-a", &[HOSTS[0]], ping));
    let old_b = server.run(run_body("ret-b", &[HOSTS[1]], ping));
    let recent = server.run(run_body("ret-c", &[HOSTS[2]], ping));
    let running = server.run(run_body("ret-d", &[HOSTS[0]], "- command: sleep 600\n"));
    for id in [old_a, old_b, recent] {
        server.wait_end(id, 60);
    }
    server.wait_status(running, &[2], 30);
    let now = chrono::Utc::now().naive_utc();
    let days = |n: i64| now - chrono::Duration::days(n);
    let month = |t: chrono::NaiveDateTime| t.date().with_day(1).unwrap();
    use chrono::Datelike;
    let mut partitions = Vec::new();
    if backend == Backend::Postgres {
        // Months a long-running agent made partitions for: one only the old tasks have events in
        // (droppable) and one the still-running task started in (kept).
        for (t, task) in [(days(110), old_a), (days(70), old_b)] {
            let m = month(t);
            let next = (m + chrono::Duration::days(32)).with_day(1).unwrap();
            let name = format!("task_events_{:04}_{:02}", m.year(), m.month());
            exec(&server, format!("CREATE TABLE {name} PARTITION OF task_events FOR VALUES FROM ('{m}') TO ('{next}')"));
            exec(&server, format!(
                "INSERT INTO task_events (task_id, seq, kind, payload, created_at) VALUES ({task}, 1000, 'old', '{{}}', '{}')",
                sql_time(t)
            ));
            partitions.push(name);
        }
    }
    let hosts_before: Vec<i64> = [old_a, old_b, recent, running]
        .iter()
        .map(|id| rows_of(&server, "task_hosts", *id))
        .collect();
    let events_before: Vec<i64> = [recent, running]
        .iter()
        .map(|id| rows_of(&server, "task_events", *id))
        .collect();
    assert!(events_before.iter().all(|n| *n > 0));
    for id in [old_a, old_b] {
        exec(&server, format!(
            "UPDATE tasks SET created_at = '{}', started_at = '{}', ended_at = '{}' WHERE id = {id}",
            sql_time(days(41)), sql_time(days(41)), sql_time(days(40))
        ));
    }
    exec(
        &server,
        format!(
            "UPDATE tasks SET started_at = '{}' WHERE id = {running}",
            sql_time(days(75))
        ),
    );

    wait_count(
        &server,
        &format!("SELECT 'n' AS key, count(*) AS n FROM tasks WHERE purged_at IS NOT NULL AND id IN ({old_a}, {old_b})"),
        2,
        30,
    );
    for id in [old_a, old_b] {
        assert_eq!(rows_of(&server, "task_events", id), 0);
        assert!(!server.run_dir(id).exists(), "run directory of {id} left");
    }
    assert_eq!(
        [old_a, old_b, recent, running]
            .map(|id| rows_of(&server, "task_hosts", id))
            .to_vec(),
        hosts_before,
        "every task_hosts row stays"
    );
    assert_eq!(
        [recent, running]
            .map(|id| rows_of(&server, "task_events", id))
            .to_vec(),
        events_before
    );
    for id in [recent, running] {
        assert!(server.run_dir(id).exists());
    }
    let purged = counts(
        &server,
        "SELECT 'n' AS key, count(*) AS n FROM tasks WHERE purged_at IS NOT NULL",
    );
    assert_eq!(purged["n"], 2);
    if backend == Backend::Postgres {
        #[derive(QueryableByName)]
        struct Present {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            present: bool,
        }
        let present = |name: &str| {
            let sql = format!("SELECT to_regclass('{name}') IS NOT NULL AS present");
            let r: Vec<Present> = server
                .view
                .read(move |c| Ok(diesel::sql_query(sql.clone()).load(c)?));
            r[0].present
        };
        assert!(!present(&partitions[0]), "{} is dropped", partitions[0]);
        assert!(
            present(&partitions[1]),
            "{} is kept: a running task started in it",
            partitions[1]
        );
    }
    server.call("/api/stop", json!({"id": running, "name": "ret-d"}));
}

/// With `retention_keep_tasks = false` the old task's rows go too (task_hosts by cascade).
fn retention_without_the_audit_trail_deletes_the_old_tasks_rows(backend: Backend) {
    let server = TestServer::start_with(backend, |s| {
        s.retention_days = 30;
        s.retention_check_secs = 1;
        s.retention_keep_tasks = false;
    });
    let old = server.run(run_body("gone", &[HOSTS[0]], "- ping:\n"));
    let kept = server.run(run_body("kept", &[HOSTS[1]], "- ping:\n"));
    server.wait_end(old, 60);
    server.wait_end(kept, 60);
    let ended = chrono::Utc::now().naive_utc() - chrono::Duration::days(31);
    exec(
        &server,
        format!(
            "UPDATE tasks SET ended_at = '{}' WHERE id = {old}",
            sql_time(ended)
        ),
    );
    wait_count(
        &server,
        &format!("SELECT 'n' AS key, count(*) AS n FROM tasks WHERE id = {old}"),
        0,
        30,
    );
    assert_eq!(rows_of(&server, "task_hosts", old), 0);
    assert_eq!(rows_of(&server, "task_events", old), 0);
    assert!(!server.run_dir(old).exists());
    assert_eq!(server.view.task(kept).name, "kept");
    assert!(rows_of(&server, "task_events", kept) > 0);
    assert!(server.run_dir(kept).exists());
}
