//! What the events carry: every loop item, retry and warning is an event of its own, each event
//! holds the text ansible printed for it, and results are JSON objects. Judged against ansible's
//! own output (`output.log`, what its stdout callback printed), rows read with plain SQL and the
//! stream as a client reads it.

use diesel::sql_types::{Integer, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl};
use serde_json::Value;

use crate::both_backends;
use crate::harness::{run_body, stream, Backend, TestServer, HOSTS};

#[derive(QueryableByName, Debug)]
struct Row {
    #[diesel(sql_type = Integer)]
    seq: i32,
    #[diesel(sql_type = Nullable<Text>)]
    host: Option<String>,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    payload: String,
}

fn rows(server: &TestServer, id: i64) -> Vec<Row> {
    let sql = format!(
        "SELECT seq, host, kind, payload FROM task_events WHERE task_id = {id} ORDER BY seq"
    );
    server
        .view
        .read(move |c| Ok(diesel::sql_query(sql.clone()).load(c)?))
}

/// The non-blank lines of a text.
fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

both_backends!(a_loop_is_an_event_per_item_and_the_events_hold_ansibles_own_output);

/// A 40-item loop on 3 hosts is 120 item events; an `until` retry and an ignored failure are
/// events too. Joined in order, the events' `stdout` is ansible's own
/// output line for line, and every result is a JSON object, in the table and in the stream.
fn a_loop_is_an_event_per_item_and_the_events_hold_ansibles_own_output(backend: Backend) {
    let server = TestServer::start(backend);
    let playbook = r#"
- debug:
    msg: "item {{ item }}"
  loop: "{{ range(40) | list }}"
- shell: "test -e {{ flag }} || { touch {{ flag }}; exit 1; }"
  vars:
    flag: "/tmp/downlink-retry-{{ inventory_hostname }}-{{ 1000000 | random }}"
  register: r
  until: r.rc == 0
  retries: 2
  delay: 0
- fail:
    msg: boom
  ignore_errors: true
- debug:
    msg: "{{ 'x' * 30000 }}"
"#;
    let id = server.run(run_body("items", &HOSTS, playbook));
    let task = server.view.wait_end(id, 120);
    assert_eq!(task.status, 4, "{:?}", task.err);
    server.assert_hosts_match_recap(id);

    let rows = rows(&server, id);
    let count = |kind: &str| rows.iter().filter(|r| r.kind == kind).count();
    assert_eq!(count("runner_item_ok"), 120, "40 items x 3 hosts");
    for host in HOSTS {
        let items = rows
            .iter()
            .filter(|r| r.kind == "runner_item_ok" && r.host.as_deref() == Some(host))
            .count();
        assert_eq!(items, 40, "{host}");
    }
    assert_eq!(count("runner_retry"), 3, "one retry on each host");
    assert!(count("runner_start") >= 12, "each task starts on each host");

    // Every payload is JSON, every result an object; the 30,000-character one is cut and says so.
    let payloads: Vec<Value> = rows
        .iter()
        .map(|r| serde_json::from_str(&r.payload).unwrap_or_else(|e| panic!("{e}: {}", r.payload)))
        .collect();
    for (r, p) in rows.iter().zip(&payloads) {
        if let Some(result) = p.get("result") {
            assert!(
                result.is_object(),
                "seq {} {}: result {result}",
                r.seq,
                r.kind
            );
        }
        assert!(r.payload.len() <= server.settings.max_event_bytes);
    }
    assert!(
        payloads.iter().any(|p| p.get("truncated").is_some()),
        "the long debug message was cut to max_event_bytes"
    );

    // ansible's own output, from its stdout and stderr, against the events' text joined in order.
    let output =
        std::fs::read_to_string(server.run_dir(id).join("output.log")).expect("output.log");
    let printed: Vec<String> = payloads
        .iter()
        .filter_map(|p| p["stdout"].as_str().map(str::to_owned))
        .collect();
    let printed = printed.join("\n");
    let (ours, theirs) = (lines(&printed), lines(&output));
    // The long message's event was cut: up to it, and from the next task on, line for line.
    let cut_at = ours.iter().position(|l| l.ends_with("...[truncated]"));
    match cut_at {
        None => assert_eq!(ours, theirs),
        Some(i) => {
            assert_eq!(ours[..i], theirs[..i]);
            let resume = theirs
                .iter()
                .position(|l| l.starts_with("PLAY RECAP"))
                .expect("ansible printed its recap");
            assert!(ours.ends_with(&theirs[resume..]), "the recap");
        }
    }
    assert!(theirs.iter().any(|l| l.starts_with("FAILED - RETRYING: [")));
    assert!(theirs.iter().any(|l| l.contains("=> (item=39)")));

    // The stream sends the same payloads as JSON objects.
    let (_, lines) = stream(
        &server.base,
        &format!("/api/tasks/{id}/events?after=0"),
        &[],
    );
    let streamed: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["type"] == "event")
        .collect();
    assert_eq!(streamed.len(), rows.len());
    for (line, stored) in streamed.iter().zip(&payloads) {
        assert_eq!(&line["payload"], stored);
    }
}
