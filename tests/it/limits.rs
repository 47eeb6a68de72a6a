//! Bounded resources and secrets: each limit answers its exact error and stores nothing; params
//! stay out of the logs and, when asked, out of the database; `no_log` results stay censored.

use serde_json::json;

use crate::both_backends;

use crate::harness::{run_body, task_dir, Backend, TestServer, HOSTS};

fn failure(message: &str) -> String {
    json!({"code": -1, "message": message}).to_string()
}

#[test]
fn each_limit_answers_its_error_and_stores_nothing() {
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.max_nodes = 2;
        s.max_playbook_bytes = 100;
        s.body_limit = 2048;
    });
    let cases = [
        (
            run_body("n", &HOSTS, "- ping:\n"),
            "param error, error: nodes: more than 2 nodes",
        ),
        (
            run_body(
                "p",
                &[HOSTS[0]],
                &format!("- debug: {{msg: {}}}\n", "x".repeat(100)),
            ),
            "param error, error: tasks: larger than 100 bytes",
        ),
        (
            run_body(
                "b",
                &[HOSTS[0]],
                &format!("# {}\n- ping:\n", "x".repeat(3000)),
            ),
            "param error, error: body too large",
        ),
    ];
    for (body, want) in cases {
        assert_eq!(
            server.post("/api/run", &body.to_string()),
            (200, failure(want))
        );
    }
    let long = "a".repeat(300);
    let (_, got) = server.post_with(
        "/api/run",
        &[("X-CORRELATION-ID", &long), ("X-RESOURCE", "orion")],
        &run_body("h", &[HOSTS[0]], "- ping:\n").to_string(),
    );
    assert_eq!(
        got,
        failure("param error, error: X-CORRELATION-ID: longer than 256 bytes")
    );
    assert_eq!(server.task_count(), 0);
}

#[test]
fn a_full_queue_refuses_before_storing() {
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.max_forks = 1;
        s.max_queued = 1;
    });
    let running = server.run(run_body("running", &[HOSTS[0]], "- command: sleep 60\n"));
    server.wait_status(running, &[2], 30);
    let waiting = server.run(run_body("waiting", &[HOSTS[1]], "- ping:\n"));
    let (_, got) = server.post(
        "/api/run",
        &run_body("refused", &[HOSTS[2]], "- ping:\n").to_string(),
    );
    assert_eq!(got, failure("queue full, retry later"));
    assert_eq!(server.task_count(), 2);
    // A place frees when a task leaves the queue.
    server.call("/api/stop", json!({"id": waiting, "name": "waiting"}));
    server.run(run_body("accepted", &[HOSTS[2]], "- ping:\n"));
    server.call("/api/stop", json!({"id": running, "name": "running"}));
}

#[test]
fn events_are_bounded_per_task_and_in_size_with_a_marker() {
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.max_events_per_task = 8;
        s.max_event_bytes = 300;
    });
    // The long message's results are events 6 and 7 (after the playbook, play and task starts
    // and each host's start).
    let play = "- debug: {msg: \"{{ 'y' * 2000 }}\"}\n- ping:\n- ping:\n- ping:\n- ping:\n";
    let id = server.run(run_body("chatty", &HOSTS[..2], play));
    let task = server.wait_end(id, 60);
    assert_eq!(task.status, 4);
    let events = server.events(id);
    assert_eq!(events.len(), 9, "eight events and the marker");
    assert_eq!(events[8].kind, "events_truncated");
    assert!(events
        .iter()
        .all(|e| e.payload.len() <= 300 || e.kind == "events_truncated"));
    // A cut payload is still JSON and says it was cut.
    let payloads: Vec<serde_json::Value> = events
        .iter()
        .map(|e| serde_json::from_str(&e.payload).expect("every payload is JSON"))
        .collect();
    assert!(
        payloads
            .iter()
            .any(|p| p["truncated"]["bytes"].as_u64() > Some(2000)
                && p["stdout"]
                    .as_str()
                    .is_some_and(|s| s.ends_with("...[truncated]"))),
        "{events:?}"
    );
    // Host results still count every event.
    let hosts = server.hosts(id);
    assert!(
        hosts
            .iter()
            .all(|h| h.ok == 5 && h.result.as_deref() == Some("ok")),
        "{hosts:?}"
    );
}

#[test]
fn params_stay_out_of_logs_and_no_log_results_stay_censored() {
    let dir = crate::harness::TempDir::new();
    let db = crate::harness::TestDb::new(Backend::Sqlite, &dir.0);
    let mut settings = crate::harness::test_settings(&dir.0);
    settings.database_url = db.url.clone();
    settings.store_params = false;
    let server = crate::harness::BinServer::start(&settings, &dir.0);
    let play = "- command: echo {{ secret }}\n  no_log: true\n";
    let mut body = run_body("secret", &[HOSTS[0]], play);
    body["params"] = json!("secret=hunter2");
    let (_, got) = server.post("/api/run", &body.to_string());
    assert_eq!(got, "{\"code\":0,\"content\":{\"id\":1}}");
    let target = downlink::store::db::Target::parse(&db.url).unwrap();
    let pool = downlink::store::db::pool(
        &target,
        2,
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let task = loop {
        let t = downlink::store::get_task(&mut pool.get().unwrap(), 1)
            .unwrap()
            .unwrap();
        if t.status > 2 {
            break t;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(task.status, 4);
    assert_eq!(task.params, "null", "params were stored");
    let events = downlink::store::task_events(&mut pool.get().unwrap(), 1).unwrap();
    assert!(
        events.iter().any(|e| e.payload.contains("censored")),
        "{events:?}"
    );
    assert!(events.iter().all(|e| !e.payload.contains("hunter2")));
    let log = std::fs::read_to_string(&server.log_path).unwrap();
    assert!(log.contains("task accepted"));
    assert!(!log.contains("hunter2"), "a param reached the log");
    // The extra vars file is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let run_dir = task_dir(&settings, 1);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&run_dir), 0o700);
    assert_eq!(mode(&run_dir.join("extra_vars.json")), 0o600);
    assert_eq!(mode(&run_dir.join("output.log")), 0o600);
}

#[test]
fn a_client_that_never_sends_its_body_is_cut_off() {
    use std::io::{Read, Write};
    let server = TestServer::start_with(Backend::Sqlite, |s| s.client_timeout_secs = 1);
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .write_all(b"POST /api/run HTTP/1.1\r\nHost: x\r\nX-CORRELATION-ID: 1-1\r\nX-RESOURCE: orion\r\nContent-Length: 100\r\n\r\n{\"nodes\":")
        .unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("}") {
        let n = stream
            .read(&mut buf)
            .expect("an answer before the read timeout");
        assert!(n > 0, "connection closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.ends_with(&failure("param error, error: body not received in time")),
        "{text}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(server.task_count(), 0);
}

#[test]
fn output_and_events_files_are_held_to_their_limits() {
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.max_output_bytes = 4096;
        s.max_events_file_bytes = 65536;
    });
    let play = "- debug: {msg: \"{{ 'z' * 12000 }}\"}\n".repeat(12);
    let id = server.run(run_body("loud", &[HOSTS[0]], &play));
    let task = server.wait_end(id, 90);
    assert_eq!(task.status, 4, "{:?}", task.err);
    // Host results still come from ansible's final stats, which are always written.
    let hosts = server.hosts(id);
    assert_eq!((hosts[0].ok, hosts[0].result.as_deref()), (12, Some("ok")));
    let dir = server.run_dir(id);
    let output = std::fs::read(dir.join("output.log")).unwrap();
    let text = String::from_utf8_lossy(&output);
    let note = text
        .rfind("\n[downlink] output.log reached max_output_bytes (4096 bytes): ")
        .expect("closing note");
    assert!(
        note <= 4096,
        "kept at most the limit before the note: {note}"
    );
    assert!(text.ends_with("more bytes of ansible's output were not kept\n"));
    let events_len = std::fs::metadata(dir.join("events.jsonl")).unwrap().len();
    assert!(
        events_len <= 65536 + 4096,
        "events.jsonl is {events_len} bytes"
    );
    let events = server.events(id);
    let marker = events
        .iter()
        .find(|e| e.kind == "events_file_limit")
        .expect("marker stored");
    let v: serde_json::Value = serde_json::from_str(&marker.payload).unwrap();
    assert!(v["dropped"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(events.last().map(|e| e.kind.as_str()), Some("stats"));
}

both_backends!(extra_vars_leave_the_disk_when_the_task_ends);

fn extra_vars_leave_the_disk_when_the_task_ends(backend: Backend) {
    let server = TestServer::start_with(backend, |s| {
        s.remove_extra_vars_at_end = true;
    });
    // The assertion proves the playbook got the param (by its SHA-1, so that the playbook itself
    // does not hold the secret); it prints no value.
    let play = "- assert:\n    that: secret | hash('sha1') == 'f3bbbd66a63d4bf1747940578ec3d0103530e21d'\n    quiet: true\n";
    let mut body = run_body("secret", &[HOSTS[0]], play);
    body["params"] = json!("secret=hunter2");
    let id = server.run(body);
    assert_eq!(server.wait_end(id, 60).status, 4);
    let run_dir = server.run_dir(id);
    let mut left = Vec::new();
    for entry in std::fs::read_dir(&run_dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        if bytes.windows(7).any(|w| w == b"hunter2") {
            left.push(name.clone());
        }
        assert_ne!(name, "extra_vars.json");
    }
    assert!(left.is_empty(), "the secret is still in {left:?}");
    assert!(
        run_dir.join("end.json").exists(),
        "the run directory is kept"
    );
}
