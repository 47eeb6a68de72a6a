//! The wire contract: every endpoint and every error string, compared as whole response bodies.

use serde_json::json;

use crate::both_backends;
use crate::harness::{run_body, Backend, TestServer, DEAD, HOSTS};

/// The contract's HTTP date (`Wed, 17 Aug 2016 18:38:17 GMT`), written by chrono's pattern here:
/// never by the code under test.
fn http_date(t: chrono::NaiveDateTime) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// The contract's RFC 3339 date (`2017-07-27T16:37:04Z`), by chrono's pattern.
fn rfc3339(t: chrono::NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

const PING: &str = "- ping:\n";

/// The exact failure envelope.
fn failure(message: &str) -> String {
    json!({"code": -1, "message": message}).to_string()
}

both_backends!(
    every_error_string_is_exact_and_nothing_is_stored,
    run_check_and_getlog_answer_exact_bodies,
    original_examples_work_as_fixed,
    fifty_concurrent_runs_with_one_name_give_one_id,
    parallel_run_answers_one_line_per_node,
    stop_and_check_of_unknown_tasks,
);

fn every_error_string_is_exact_and_nothing_is_stored(backend: Backend) {
    let server = TestServer::start_with(backend, |s| s.body_limit = 2048);
    let good = run_body("t", &[HOSTS[0]], PING);
    let with = |field: &str, value: serde_json::Value| {
        let mut b = good.clone();
        b[field] = value;
        b.to_string()
    };
    let without = |field: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(field);
        b.to_string()
    };
    let param = |m: &str| failure(&format!("param error, error: {m}"));
    let cases: Vec<(&str, String, String)> = vec![
        ("/api/run", "{\"nodes\":[\"1.2.3.4\",],}".into(), failure("json encode error")),
        ("/api/run", "not json".into(), failure("json encode error")),
        ("/api/run", "[1,2]".into(), failure("json encode error")),
        ("/api/run", "\"str\"".into(), failure("json encode error")),
        ("/api/run", "".into(), failure("json encode error")),
        ("/api/run", without("nodes"), param("nodes: is required")),
        ("/api/run", with("nodes", json!([])), param("nodes: must not be empty")),
        ("/api/run", with("nodes", json!([1])), param("nodes: must be an array of strings")),
        ("/api/run", with("nodes", json!(["a;rm -rf /"])), param("nodes: `a;rm -rf /` is not an IP address or host name")),
        ("/api/run", with("user", json!("root$(id)")), param("user: must be a POSIX user name (letters, digits, '.', '_', '-'; at most 32)")),
        ("/api/run", with("user", json!(null)), param("user: must be a string")),
        ("/api/run", with("name", json!("")), param("name: must not be empty")),
        ("/api/run", with("name", json!("x".repeat(256))), param("name: longer than 255 characters")),
        ("/api/run", with("tasks", json!("- [unclosed")), param("tasks: not valid YAML: did not find expected ',' or ']' at line 2 column 1, while parsing a flow sequence at line 1 column 3")),
        ("/api/run", with("tasks", json!("key: value")), param("tasks: must be a YAML list of plays or of tasks")),
        ("/api/run", with("content", json!(PING)), param("tasks: give tasks or content, not both")),
        ("/api/run", without("tasks"), param("tasks: is required")),
        ("/api/run", with("params", json!("{broken")), param("params: is not a valid JSON object")),
        ("/api/run", with("params", json!([1])), param("params: must be a JSON object or a string")),
        ("/api/run", without("params"), param("params: is required")),
        ("/api/run", with("fork_num", json!(0)), param("fork_num: must be an integer from 1 to 500")),
        ("/api/run", with("fork_num", json!("100000000000000000000")), param("fork_num: must be an integer from 1 to 500")),
        ("/api/run", with("fork_num", json!("five")), param("fork_num: must be an integer from 1 to 500")),
        ("/api/run", with("tasks", json!("x".repeat(3000))), param("body too large")),
        ("/api/parallel_run", with("nodes", json!([])), param("nodes: must not be empty")),
        ("/api/stop", "{}".into(), param("id: is required")),
        ("/api/stop", json!({"id": "1", "name": "t"}).to_string(), param("id: must be a positive integer")),
        ("/api/stop", json!({"id": 1}).to_string(), param("name: is required")),
        ("/api/check", json!({"id": -4, "name": "t"}).to_string(), param("id: must be a positive integer")),
        ("/api/check", json!({"id": 1, "name": 5}).to_string(), param("name: must be a string")),
        ("/api/getlog", json!({"host": "h"}).to_string(), param("source: is required")),
        ("/api/getlog", json!({"host": "h", "source": "s", "limit": 10001}).to_string(), param("limit: must be an integer from 1 to 10000")),
        // Bad input is never reported as an outage ("retry later" would be retried for ever).
        ("/api/getlog", json!({"host": "h\u{0}x", "source": "s"}).to_string(), param("host: holds a NUL character")),
        ("/api/getlog", json!({"host": "h", "source": "\u{0}"}).to_string(), param("source: holds a NUL character")),
    ];
    for (path, body, want) in &cases {
        let (status, got) = server.post(path, body);
        assert_eq!(
            (status, got.as_str()),
            (200, want.as_str()),
            "{path} {body}"
        );
    }
    // Headers: missing, empty, too long, control characters.
    let long = "a".repeat(257);
    let header_cases: Vec<(Vec<(&str, &str)>, String)> = vec![
        (
            vec![("X-RESOURCE", "orion")],
            param("X-CORRELATION-ID: missing header"),
        ),
        (
            vec![("X-CORRELATION-ID", "1-1")],
            param("X-RESOURCE: missing header"),
        ),
        (
            vec![("X-CORRELATION-ID", ""), ("X-RESOURCE", "orion")],
            param("X-CORRELATION-ID: empty header"),
        ),
        (
            vec![("X-CORRELATION-ID", &long), ("X-RESOURCE", "orion")],
            param("X-CORRELATION-ID: longer than 256 bytes"),
        ),
        (
            vec![("X-CORRELATION-ID", "1-1"), ("X-RESOURCE", "or\tion")],
            param("X-RESOURCE: holds control characters"),
        ),
    ];
    for (headers, want) in &header_cases {
        let (status, got) = server.post_with("/api/run", headers, &good.to_string());
        assert_eq!((status, got.as_str()), (200, want.as_str()), "{headers:?}");
    }
    // Unknown path and wrong method keep the envelope.
    assert_eq!(server.post("/api/nope", "{}"), (404, failure("not found")));
    let (status, body) =
        crate::harness::request("GET", &format!("{}/api/run", server.base), &[], "");
    assert_eq!((status, body), (405, failure("method not allowed")));
    assert_eq!(server.task_count(), 0, "a refused request stored a task");
}

fn run_check_and_getlog_answer_exact_bodies(backend: Backend) {
    let server = TestServer::start(backend);
    let (status, body) = server.post(
        "/api/run",
        &run_body("exact", &[HOSTS[0], DEAD], PING).to_string(),
    );
    assert_eq!(
        (status, body.as_str()),
        (200, "{\"code\":0,\"content\":{\"id\":1}}")
    );
    let task = server.wait_end(1, 60);
    assert_eq!(task.status, 3);
    let hosts = server.hosts(1);
    let msg = hosts[1].msg.clone().expect("unreachable message");
    // Field order as in the contract (not alphabetical), so the expected text is written out.
    let record = |h: &downlink::store::HostRow, result: &str, counters: &str, msg: &str| {
        format!(
            "{{\"host\":\"{}\",\"result\":\"{result}\",{counters},\"create_time\":\"{}\",\"end_time\":\"{}\",\"msg\":{msg}}}",
            h.host,
            rfc3339(h.created_at),
            rfc3339(h.ended_at.unwrap())
        )
    };
    let expected_log = format!(
        "[{},{}]",
        record(&hosts[0], "ok", "\"ok\":1,\"changed\":0,\"failed\":0,\"unreachable\":0,\"skipped\":0,\"rescued\":0,\"ignored\":0", "null"),
        record(&hosts[1], "unreachable", "\"ok\":0,\"changed\":0,\"failed\":0,\"unreachable\":1,\"skipped\":0,\"rescued\":0,\"ignored\":0", &json!(msg).to_string()),
    );
    // `err` quotes the message on one line, cut at 200 characters.
    let quoted: String = msg
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect();
    let err = format!("1 of 2 hosts failed: {DEAD} unreachable ({quoted})");
    let expected = format!(
        "{{\"code\":0,\"content\":{{\"create_time\":\"{}\",\"err\":{},\"id\":1,\"log\":{},\"nodes\":{},\"status\":3,\"update_time\":\"{}\",\"queue_position\":null,\"waiting_for\":null,\"started_time\":\"{}\",\"end_time\":\"{}\",\"agent\":{}}}}}",
        http_date(task.created_at),
        json!(err),
        json!(expected_log),
        json!(format!("[\"{}\",\"{DEAD}\"]", HOSTS[0])),
        http_date(task.updated_at),
        http_date(task.started_at.expect("started")),
        http_date(task.ended_at.expect("ended")),
        json!(server.settings.agent_name),
    );
    let (_, got) = server.post("/api/check", &json!({"id": 1, "name": "exact"}).to_string());
    assert_eq!(got, expected);
    assert!(msg.contains("127.0.0.9"), "{msg}");

    let line = |h: &downlink::store::HostRow, result: &str| {
        format!(
            "global_id = 1-1, source = orion, create_time = {}, end_time = {}, host = {}, reuslt = {result}",
            rfc3339(h.created_at),
            rfc3339(h.ended_at.unwrap()),
            h.host
        )
    };
    let (_, got) = server.post(
        "/api/getlog",
        &json!({"host": HOSTS[0], "source": "orion"}).to_string(),
    );
    assert_eq!(got, json!([line(&hosts[0], "ok")]).to_string());
    // Another source sees nothing; the limit keeps the newest.
    let (_, got) = server.post(
        "/api/getlog",
        &json!({"host": HOSTS[0], "source": "hubble"}).to_string(),
    );
    assert_eq!(got, "[]");
    server.run(run_body("exact2", &[HOSTS[0]], PING));
    server.wait_end(2, 60);
    let newest = server.hosts(2);
    let (_, got) = server.post(
        "/api/getlog",
        &json!({"host": HOSTS[0], "source": "orion", "limit": 1}).to_string(),
    );
    assert_eq!(got, json!([line(&newest[0], "ok")]).to_string());
    let (_, got) = server.post(
        "/api/getlog",
        &json!({"host": HOSTS[0], "source": "orion"}).to_string(),
    );
    assert_eq!(
        got,
        json!([line(&hosts[0], "ok"), line(&newest[0], "ok")]).to_string()
    );
}

fn original_examples_work_as_fixed(backend: Backend) {
    let server = TestServer::start(backend);
    // /api/run as in the original, with its JSON fixed and real content; no Content-Type header.
    let name = "192.201.11.31_install_nginx_1501169594802406967";
    let body = format!(
        "{{\n\t\"nodes\":[\"{}\"],\n\t\"user\":\"root\",\n\t\"name\":\"{name}\",\n\t\"content\":\"- ping:\\n\",\n\t\"params\":\"{{\\\"pkg\\\": \\\"nginx\\\"}}\",\n\t\"fork_num\":5\n}}",
        HOSTS[0]
    );
    let (_, got) = server.post_with(
        "/api/run",
        &[("X-CORRELATION-ID", "1-1"), ("X-RESOURCE", "orion")],
        &body,
    );
    assert_eq!(got, "{\"code\":0,\"content\":{\"id\":1}}");
    assert_eq!(server.wait_end(1, 60).status, 4);
    let extra = std::fs::read_to_string(server.run_dir(1).join("extra_vars.json")).unwrap();
    assert_eq!(extra, "{\"pkg\":\"nginx\"}");
    // The same name again.
    let (_, got) = server.post("/api/run", &body);
    assert_eq!(got, failure("task name is duplicate"));
    // /api/stop and /api/check examples (task1 does not exist).
    let (_, got) = server.post("/api/stop", "{\n    \"id\":1,\n    \"name\":\"task1\"\n}");
    assert_eq!(got, failure("task not found..."));
    let (_, got) = server.post("/api/check", "{\n\t \"id\":1,\n\t \"name\":\"task1\"\n}");
    assert_eq!(got, failure("task not found..."));
    // /api/getlog example: no records for that host and source.
    let (_, got) = server.post(
        "/api/getlog",
        "{\n\t \"host\":\"127.0.0.1\",\n\t \"source\":\"hubble\"\n}",
    );
    assert_eq!(got, "[]");
    // /api/parallel_run example, at its real path, fork_num as a string as the tables say.
    let body = json!({"nodes": [HOSTS[1]], "user": "root", "name": "pr", "content": PING,
                      "params": "", "fork_num": "5"});
    let (_, got) = server.post("/api/parallel_run", &body.to_string());
    // (PostgreSQL spent an id on the refused duplicate: look the task up by name.)
    let hosts = server.hosts(server.id_of("pr"));
    assert_eq!(
        got,
        json!([format!(
            "global_id = 1-1, source = orion, create_time = {}, end_time = {}, host = {}, reuslt = ok",
            rfc3339(hosts[0].created_at),
            rfc3339(hosts[0].ended_at.unwrap()),
            HOSTS[1]
        )])
        .to_string()
    );
    // Stopping a finished task is not an error and changes nothing.
    let before = server.task(1);
    let (_, got) = server.post("/api/stop", &json!({"id": 1, "name": name}).to_string());
    assert_eq!(got, "{\"code\":0,\"content\":{}}");
    let after = server.task(1);
    assert_eq!(
        (after.status, after.updated_at),
        (before.status, before.updated_at)
    );
}

fn fifty_concurrent_runs_with_one_name_give_one_id(backend: Backend) {
    let server = TestServer::start(backend);
    let body = run_body("same", &[DEAD], PING).to_string();
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|_| s.spawn(|| server.post("/api/run", &body).1))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ids: Vec<&String> = answers
        .iter()
        .filter(|a| a.starts_with("{\"code\":0"))
        .collect();
    let dups = answers
        .iter()
        .filter(|a| **a == failure("task name is duplicate"))
        .count();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(dups, 49, "{answers:?}");
    assert_eq!(server.task_count(), 1);
    let id: serde_json::Value = serde_json::from_str(ids[0]).unwrap();
    server.wait_end(id["content"]["id"].as_i64().unwrap(), 60);
}

fn parallel_run_answers_one_line_per_node(backend: Backend) {
    let server = TestServer::start(backend);
    let nodes = [HOSTS[0], HOSTS[1], HOSTS[2], DEAD];
    let body = run_body("parallel", &nodes, PING);
    let (status, got) = server.post("/api/parallel_run", &body.to_string());
    assert_eq!(status, 200);
    let task = server.task(1);
    assert_eq!(task.status, 3, "the answer comes after the end");
    let lines: Vec<String> = server
        .hosts(1)
        .iter()
        .map(|h| {
            format!(
                "global_id = 1-1, source = orion, create_time = {}, end_time = {}, host = {}, reuslt = {}",
                rfc3339(h.created_at),
                rfc3339(h.ended_at.unwrap()),
                h.host,
                h.result.as_deref().unwrap()
            )
        })
        .collect();
    assert_eq!(got, json!(lines).to_string());
    let parsed: Vec<String> = serde_json::from_str(&got).unwrap();
    assert_eq!(parsed.len(), 4);
    for (line, node) in parsed.iter().zip(nodes) {
        assert!(line.contains(&format!("host = {node}, ")), "{line}");
    }
    assert!(parsed[3].ends_with("reuslt = unreachable"));
}

fn stop_and_check_of_unknown_tasks(backend: Backend) {
    let server = TestServer::start(backend);
    let id = server.run(run_body("known", &[DEAD], PING));
    server.wait_end(id, 60);
    for (path, body) in [
        ("/api/check", json!({"id": 99, "name": "known"})),
        ("/api/check", json!({"id": id, "name": "other"})),
        ("/api/stop", json!({"id": 99, "name": "known"})),
        ("/api/stop", json!({"id": id, "name": "other"})),
    ] {
        let (_, got) = server.post(path, &body.to_string());
        assert_eq!(got, failure("task not found..."), "{path} {body}");
    }
}
