//! Database outages: PostgreSQL restarted or stopped under a running server. A test binary of its
//! own because it takes PostgreSQL away from everything else (cargo runs test binaries one after
//! another), and its tests hold a lock so they never overlap either.

#[path = "it/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "it/procwatch.rs"]
#[allow(dead_code)]
mod procwatch;

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use harness::{run_body, Backend, TestServer, DEAD, HOSTS};
use serde_json::json;

static POSTGRES: Mutex<()> = Mutex::new(());

fn pg_ctl(action: &str) {
    let cluster = std::env::var("DLTEST_PG_CLUSTER")
        .expect("DLTEST_PG_CLUSTER is not set: run the tests with scripts/test");
    let mut args: Vec<&str> = cluster.split_whitespace().collect();
    args.push(action);
    let out = Command::new("pg_ctlcluster")
        .args(&args)
        .output()
        .expect("pg_ctlcluster runs (as root)");
    assert!(
        out.status.success(),
        "pg_ctlcluster {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (name, nodes) of the 20 tasks.
fn twenty() -> Vec<(String, Vec<&'static str>)> {
    (0..20)
        .map(|i| {
            let nodes = if i % 4 == 0 {
                vec![HOSTS[0], DEAD]
            } else {
                HOSTS.to_vec()
            };
            (format!("outage-{i}"), nodes)
        })
        .collect()
}

const PLAY: &str = "- ping:\n- command: sleep 2\n- ping:\n";

type Rows = Vec<(String, i32, Option<String>, Vec<String>, Vec<String>)>;

/// Every row of the 20 tasks, without times and ids: status, err, hosts, events.
fn rows(server: &TestServer) -> Rows {
    twenty()
        .into_iter()
        .map(|(name, _)| {
            let id = server.id_of(&name);
            let task = server.wait_end(id, 300);
            let rows = server.hosts(id);
            // ansible words an unreachable host's message differently from run to run ("Connection
            // refused" or "Broken pipe", depending on which write finds the closed socket first):
            // compare that it is such a message, not its words.
            let mut err = task.err.clone();
            let mut unreachable = |msg: &Option<String>| -> Option<String> {
                let m = msg.as_deref()?;
                assert!(
                    m.starts_with("Task failed: Data could not be sent to remote host"),
                    "{m}"
                );
                err = err.as_ref().map(|e| e.replace(m, "<unreachable>"));
                Some("<unreachable>".to_owned())
            };
            let msgs: Vec<Option<String>> = rows
                .iter()
                .map(|h| {
                    if h.unreachable > 0 {
                        unreachable(&h.msg)
                    } else {
                        h.msg.clone()
                    }
                })
                .collect();
            let hosts = rows
                .iter()
                .zip(msgs)
                .map(|(h, msg)| {
                    format!(
                        "{} {:?} {} {} {} {} {} {} {} {:?}",
                        h.host,
                        h.result,
                        h.ok,
                        h.changed,
                        h.failed,
                        h.unreachable,
                        h.skipped,
                        h.rescued,
                        h.ignored,
                        msg
                    )
                })
                .collect();
            let stored = server.events(id);
            assert!(
                stored
                    .iter()
                    .enumerate()
                    .all(|(i, e)| e.seq == i as i32 + 1),
                "{name}: event sequence has gaps or repeats"
            );
            // Hosts answer in any order from run to run: compare the events as a sorted list.
            let mut events: Vec<String> = stored
                .iter()
                .map(|e| format!("{:?} {} {:?}", e.host, e.kind, e.task_name))
                .collect();
            events.sort();
            (name, task.status, err, hosts, events)
        })
        .collect()
}

fn start_all(server: &TestServer) {
    for (name, nodes) in twenty() {
        server.run(run_body(&name, &nodes, PLAY));
    }
}

#[test]
fn postgres_restart_while_twenty_tasks_run_loses_no_row() {
    let _only = POSTGRES.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    let reference = TestServer::start_with(Backend::Postgres, |s| s.max_forks = 100);
    start_all(&reference);
    let expected = rows(&reference);
    drop(reference);
    harness::figure("twenty_tasks_reference_run_ms", t.elapsed().as_millis());

    let server = TestServer::start_with(Backend::Postgres, |s| s.max_forks = 100);
    start_all(&server);
    // Restart while the tasks are mid-way (their sleep 2 is running).
    let first = server.id_of("outage-0");
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.events(first).len() < 4 {
        assert!(Instant::now() < deadline, "tasks did not get going");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    pg_ctl("restart");
    harness::figure("postgres_restart_ms", t.elapsed().as_millis());
    let got = rows(&server);
    harness::figure(
        "twenty_tasks_with_postgres_restart_ms",
        t.elapsed().as_millis(),
    );
    let lost: usize = expected
        .iter()
        .zip(&got)
        .map(|(e, g)| {
            usize::from(e.1 != g.1 || e.2 != g.2)
                + e.3.iter().filter(|h| !g.3.contains(h)).count()
                + e.4.iter().filter(|ev| !g.4.contains(ev)).count()
        })
        .sum();
    harness::figure("rows_lost_across_postgres_restart", lost);
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(
            g, e,
            "task {} differs from the run without the restart",
            e.0
        );
    }
}

#[test]
fn readyz_and_run_follow_postgres_down_and_up() {
    let _only = POSTGRES.lock().unwrap_or_else(|e| e.into_inner());
    let server = TestServer::start(Backend::Postgres);
    let ready =
        |server: &TestServer| harness::request("GET", &format!("{}/readyz", server.base), &[], "");
    let (status, body) = ready(&server);
    let mut body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tracking = body["content"]
        .as_object_mut()
        .and_then(|c| c.remove("process_tracking"));
    assert!(
        tracking
            .as_ref()
            .and_then(|t| t.as_str())
            .is_some_and(|t| t.starts_with("cgroup v2 under ") || t.starts_with("fallback: ")),
        "{tracking:?}"
    );
    assert_eq!(
        (status, body),
        (
            200,
            json!({"code": 0, "content": {"database": "ok", "migrations": "ok", "ansible": "ok", "db_writes_repaired": 0}})
        )
    );
    let id = server.run(run_body("before", &[HOSTS[0]], "- ping:\n"));
    server.wait_end(id, 60);
    pg_ctl("stop");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (status, body) = ready(&server);
        assert_eq!(status, 503, "{body}");
        assert!(
            body.starts_with("{\"code\":-1,\"message\":\"not ready: database unreachable"),
            "{body}"
        );
        let unavailable =
            json!({"code": -1, "message": "database unavailable, retry later"}).to_string();
        let (_, body) = server.post(
            "/api/run",
            &run_body("during", &[HOSTS[0]], "- ping:\n").to_string(),
        );
        assert_eq!(body, unavailable);
        let (_, body) = server.post(
            "/api/check",
            &json!({"id": id, "name": "before"}).to_string(),
        );
        assert_eq!(body, unavailable);
        assert_eq!(
            harness::request("GET", &format!("{}/healthz", server.base), &[], "").0,
            200
        );
    }));
    pg_ctl("start");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(&server).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again after PostgreSQL came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(server.task_count(), 1, "the refused run stored nothing");
    // The HTTP workers' own read connections were cut by the restart: a check opens new ones.
    for _ in 0..4 {
        let (_, body) = server.post(
            "/api/check",
            &json!({"id": id, "name": "before"}).to_string(),
        );
        assert!(body.starts_with("{\"code\":0,"), "{body}");
    }
    let id = server.run(run_body("after", &[HOSTS[0]], "- ping:\n"));
    assert_eq!(server.wait_end(id, 60).status, 4);
}
