//! The writer cannot be held: a write the database refuses is repaired and the writes behind it
//! go on at once; an end that could not be written while the database was away is written when
//! it answers (and a stopped pending task never runs); a TaskActor that panics still ends its
//! task, frees its forks and answers its waiters.

use std::path::Path;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::Connection;
use serde_json::{json, Value};

use crate::both_backends;
use crate::harness::{figure, request, run_body, wait_until, Backend, TestServer, HOSTS};

both_backends!(
    rows_the_database_refuses_are_repaired_and_the_writer_goes_on,
    a_panicking_task_actor_still_ends_its_task,
);

/// Triggers that refuse what a playbook can make a task write: an event of a task named
/// `poison`, a host row and an `err` that carry the message `poison-msg`. The refusal is the
/// database's own (PostgreSQL RAISE, SQLSTATE P0001; SQLite RAISE(ABORT)).
fn install_refusals(server: &TestServer, backend: Backend) {
    let sql = match backend {
        Backend::Postgres => {
            r#"
            CREATE FUNCTION refuse() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION 'refused by a test trigger'; END; $$ LANGUAGE plpgsql;
            CREATE TRIGGER refuse_event BEFORE INSERT ON task_events FOR EACH ROW
                WHEN (NEW.task_name = 'poison') EXECUTE FUNCTION refuse();
            CREATE TRIGGER refuse_host BEFORE UPDATE ON task_hosts FOR EACH ROW
                WHEN (NEW.msg LIKE '%poison-msg%') EXECUTE FUNCTION refuse();
            CREATE TRIGGER refuse_err BEFORE UPDATE ON tasks FOR EACH ROW
                WHEN (NEW.err LIKE '%poison-msg%') EXECUTE FUNCTION refuse();
            "#
        }
        Backend::Sqlite => {
            r#"
            CREATE TRIGGER refuse_event BEFORE INSERT ON task_events
                WHEN NEW.task_name = 'poison' BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END;
            CREATE TRIGGER refuse_host BEFORE UPDATE ON task_hosts
                WHEN NEW.msg LIKE '%poison-msg%' BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END;
            CREATE TRIGGER refuse_err BEFORE UPDATE ON tasks
                WHEN NEW.err LIKE '%poison-msg%' BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END;
            "#
        }
    };
    server
        .conn()
        .batch_execute(sql)
        .expect("install test triggers");
}

fn readyz(server: &TestServer) -> Value {
    let (_, body) = request("GET", &format!("{}/readyz", server.base), &[], "");
    serde_json::from_str(&body).unwrap()
}

fn rows_the_database_refuses_are_repaired_and_the_writer_goes_on(backend: Backend) {
    let server = TestServer::start(backend);
    install_refusals(&server, backend);
    let play = "- ping:\n- name: poison\n  ping:\n- fail: {msg: poison-msg}\n  when: inventory_hostname == '127.0.0.3'\n";
    let t = Instant::now();
    let id = server.run(run_body("refused", &HOSTS[..2], play));
    let ordinary = server.run(run_body("ordinary", &[HOSTS[2]], "- ping:\n"));
    let task = server.wait_end(id, 90);
    let other = server.wait_end(ordinary, 90);
    figure(
        &format!("task_with_refused_rows_recorded_ms_{backend:?}"),
        t.elapsed().as_millis(),
    );
    assert_eq!(other.status, 4, "the task behind it ran and was recorded");
    // The end is recorded with its status; the err the database refused is replaced by a
    // sentence that says so.
    assert_eq!(task.status, 3);
    let err = task.err.unwrap();
    assert!(
        err.starts_with("failed; the details of this end could not be stored: database error: refused by a test trigger"),
        "{err}"
    );
    let hosts = server.hosts(id);
    let results: Vec<_> = hosts
        .iter()
        .map(|h| {
            (
                h.host.as_str(),
                h.result.as_deref(),
                h.msg.as_deref(),
                h.failed,
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("127.0.0.2", Some("ok"), None, 0),
            ("127.0.0.3", Some("failed"), None, 1)
        ]
    );
    // The refused events became markers; the others are stored, in order.
    let events = server.events(id);
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let dropped = kinds.iter().filter(|k| **k == "event_dropped").count();
    assert_eq!(
        dropped, 5,
        "task_start, two runner_start and two runner_ok of `poison`: {kinds:?}"
    );
    assert!(events
        .iter()
        .all(|e| e.task_name.as_deref() != Some("poison")));
    assert_eq!(kinds.last(), Some(&"stats"));
    let seqs: Vec<i32> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i32).collect::<Vec<_>>());
    // Counted where an operator looks.
    let ready = readyz(&server);
    assert!(
        ready["content"]["db_writes_repaired"].as_u64().unwrap_or(0) >= 5,
        "{ready}"
    );
}

/// Processes whose working directory is the task's run directory (ansible-playbook and its
/// workers), read from /proc: an oracle independent of downlink's own process tracking.
fn processes_in(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
            {
                out.push(pid);
            }
        }
    }
    out
}

fn a_panicking_task_actor_still_ends_its_task(backend: Backend) {
    // Enabled only in test builds (the `fail` dev-dependency turns fail points on); it fires only
    // for tasks whose name starts with "failpoint-panic".
    fail::cfg("task-consume", "panic").unwrap();
    let server = TestServer::start_with(backend, |s| s.max_forks = 2);
    let name = format!("failpoint-panic-{backend:?}");
    let base = server.base.clone();
    let body = run_body(&name, &HOSTS[..2], "- command: sleep 30\n");
    let waiter = std::thread::spawn(move || {
        request(
            "POST",
            &format!("{base}/api/parallel_run"),
            &[("X-CORRELATION-ID", "9-9"), ("X-RESOURCE", "orion")],
            &body.to_string(),
        )
    });
    // Queued behind it (it holds both forks): runs only if the forks are given back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let found: Option<i64> = {
            use diesel::prelude::*;
            use downlink::store::schema::tasks;
            tasks::table
                .filter(tasks::name.eq(&name))
                .select(tasks::id)
                .first(&mut server.conn())
                .ok()
        };
        if let Some(id) = found {
            break id;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    };
    let behind = server.run(run_body("behind-the-panic", &HOSTS[..2], "- ping:\n"));
    let task = server.wait_end(id, 60);
    assert_eq!(task.status, 7, "{:?}", task.err);
    assert_eq!(
        task.err.as_deref(),
        Some("downlink's supervision of this task failed unexpectedly (an internal error, see the server log); ansible-playbook was killed")
    );
    let results: Vec<_> = server.hosts(id).into_iter().map(|h| h.result).collect();
    assert_eq!(
        results,
        [
            Some("interrupted".to_string()),
            Some("interrupted".to_string())
        ]
    );
    // The waiter is answered, with the task's lines.
    let (status, text) = waiter.join().unwrap();
    assert_eq!(status, 200);
    let lines: Vec<String> = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines.iter().all(|l| l.ends_with("reuslt = interrupted")),
        "{lines:?}"
    );
    // Its forks came back: the task behind it ran.
    assert_eq!(server.wait_end(behind, 60).status, 4);
    // Nothing of it is left running here.
    let dir = server.run_dir(id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_in(&dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes left in {}: {:?}",
            dir.display(),
            processes_in(&dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Makes the test database refuse connections (and drops the ones it has), as if it were down,
/// without touching the other tests' databases on the same PostgreSQL.
fn database_away(url: &str, away: bool) {
    let admin = std::env::var("DLTEST_PG_URL").expect("DLTEST_PG_URL");
    let name = url.rsplit('/').next().unwrap();
    let mut conn = diesel::PgConnection::establish(&admin).expect("admin connection");
    let sql = if away {
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';")
    } else {
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true;")
    };
    conn.batch_execute(&sql).expect("toggle the test database");
}

#[test]
fn ends_given_up_during_an_outage_are_written_when_the_database_returns() {
    let server = TestServer::start_with(Backend::Postgres, |s| {
        s.max_forks = 1;
        s.db_retry_secs = 1;
        s.reconcile_secs = 1;
    });
    let running = server.run(run_body(
        "ends-in-the-outage",
        &[HOSTS[0]],
        "- command: sleep 4\n",
    ));
    server.wait_status(running, &[2], 60);
    let pending = server.run(run_body("stopped-in-the-outage", &[HOSTS[1]], "- ping:\n"));
    database_away(server.db_url(), true);
    // The stop cannot be recorded now: said so, and the task is out of the queue for good.
    let (_, body) = server.post(
        "/api/stop",
        &json!({"id": pending, "name": "stopped-in-the-outage"}).to_string(),
    );
    assert_eq!(
        body,
        json!({"code": -1, "message": "database unavailable, retry later"}).to_string()
    );
    // The running task ends meanwhile (its end.json is written beside it) ...
    wait_until("the running task ends in the outage", 30, || {
        server.run_dir(running).join("end.json").exists()
            && crate::harness::task_processes(&server.run_dir(running)).is_empty()
    });
    // ... and the write of its end is given up once db_retry_secs have passed: a timeout is the
    // condition here, so it is waited for as one.
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    database_away(server.db_url(), false);
    let ended = server.wait_end(running, 30);
    figure(
        "end_written_after_the_database_returned_ms",
        t.elapsed().as_millis(),
    );
    assert_eq!(ended.status, 4, "{:?}", ended.err);
    assert!(server
        .hosts(running)
        .iter()
        .all(|h| h.result.as_deref() == Some("ok") && h.ok == 1));
    let stopped = server.wait_end(pending, 30);
    assert_eq!(stopped.status, 5);
    assert_eq!(stopped.err.as_deref(), Some("stopped through /api/stop"));
    assert_eq!(stopped.started_at, None, "it never ran");
    assert!(
        !server.run_dir(pending).join("output.log").exists(),
        "it never ran"
    );
    // And it stays so: a task queued after it runs and ends, and it never ran.
    let after = server.run(run_body("after-the-outage", &[HOSTS[1]], "- ping:\n"));
    assert_eq!(server.wait_end(after, 60).status, 4);
    assert_eq!(server.task(pending).status, 5);
    assert!(!server.run_dir(pending).join("output.log").exists());
}

#[test]
fn a_pending_task_stopped_while_the_database_is_away_never_runs_even_after_a_restart() {
    use crate::harness::{test_settings, BinServer, DbView, TempDir, TestDb};
    let dir = TempDir::new();
    let db = TestDb::new(Backend::Postgres, &dir.0);
    let mut settings = test_settings(&dir.0);
    settings.database_url = db.url.clone();
    settings.max_forks = 1;
    settings.db_retry_secs = 1;
    let view = DbView::open(&db.url);
    let mut first = BinServer::start(&settings, &dir.0);
    let post = |server: &BinServer, path: &str, body: Value| server.post(path, &body.to_string()).1;
    let id_of = |text: String| -> i64 {
        serde_json::from_str::<Value>(&text).unwrap()["content"]["id"]
            .as_i64()
            .unwrap()
    };
    let holder = id_of(post(
        &first,
        "/api/run",
        run_body("holder", &[HOSTS[0]], "- command: sleep 3\n"),
    ));
    view.wait_status(holder, &[2], 30);
    let pending = id_of(post(
        &first,
        "/api/run",
        run_body("never-runs", &[HOSTS[1]], "- ping:\n"),
    ));
    database_away(&db.url, true);
    let answer = post(
        &first,
        "/api/stop",
        json!({"id": pending, "name": "never-runs"}),
    );
    assert_eq!(
        answer,
        json!({"code": -1, "message": "database unavailable, retry later"}).to_string()
    );
    // The agent goes down before the database comes back: only end.json knows of the stop.
    first.signal(nix::sys::signal::Signal::SIGTERM);
    first.wait_exit(60);
    database_away(&db.url, false);
    let _second = BinServer::start(&settings, &dir.0);
    let task = view.wait_end(pending, 30);
    assert_eq!(
        (task.status, task.err.as_deref()),
        (5, Some("stopped through /api/stop"))
    );
    assert_eq!(task.started_at, None, "it never ran");
    assert_eq!(view.wait_end(holder, 30).status, 4);
}
