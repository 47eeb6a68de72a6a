//! Real execution: ansible-playbook over SSH to the test hosts, per-host results against ansible's
//! own PLAY RECAP, the forks budget, stop, time limits and ansible's own failures.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::both_backends;
use crate::harness::{play_recap, run_body, task_processes, Backend, TestServer, DEAD, HOSTS};

both_backends!(
    per_host_results_match_play_recap,
    forks_budget_is_never_exceeded_and_queue_is_fifo,
    stop_of_a_pending_task_leaves_the_queue,
    stop_of_a_running_task_kills_every_process,
    task_over_its_time_limit_ends_with_timeout,
    parallel_run_past_its_deadline_kills_the_task,
    ansible_failures_fail_the_task_with_the_reason,
    queue_position_counts_down_as_tasks_end,
    the_dba_views_show_last_results_and_task_times,
    a_pending_task_always_says_what_it_waits_for,
);

/// Checked the moment `/api/run` answers (and while it starts), a pending task always has a
/// `queue_position` or a `waiting_for`; never both null.
fn a_pending_task_always_says_what_it_waits_for(backend: Backend) {
    let server = TestServer::start_with(backend, |s| s.max_forks = 2);
    let mut seen_pending = 0;
    for i in 0..12 {
        let name = format!("placed-{i}");
        let id = server.run(run_body(&name, &[HOSTS[i % 3]], "- ping:\n"));
        for _ in 0..3 {
            let c = checked(&server, id, &name);
            if c["status"] == json!(1) {
                seen_pending += 1;
                assert!(
                    c["queue_position"].is_u64() || c["waiting_for"].is_string(),
                    "a pending task without a place: {c}"
                );
            }
        }
    }
    assert!(seen_pending > 0, "no check saw a pending task");
}

/// ok on .2, changed on .3, failed on .4, unreachable on the dead address.
const MIXED: &str = r#"
- hosts: all
  gather_facts: false
  tasks:
    - ping:
    - command: "true"
      changed_when: inventory_hostname == '127.0.0.3'
    - command: "false"
      when: inventory_hostname == '127.0.0.4'
    - debug:
        msg: "{{ greeting }}"
"#;

fn per_host_results_match_play_recap(backend: Backend) {
    let server = TestServer::start(backend);
    let mut body = run_body("mixed", &[HOSTS[0], HOSTS[1], HOSTS[2], DEAD], MIXED);
    body["params"] = json!("greeting=hello");
    let id = server.run(body);
    let task = server.wait_end(id, 90);
    assert_eq!(task.status, 3);
    assert_eq!(task.exit_code, Some(4), "4: a host was unreachable");
    let err = task.err.unwrap();
    assert!(
        err.starts_with(
            "2 of 4 hosts failed: 127.0.0.4 failed (non-zero return code); 127.0.0.9 unreachable ("
        ),
        "{err}"
    );
    let output = std::fs::read_to_string(server.run_dir(id).join("output.log")).unwrap();
    let recap = play_recap(&output);
    assert_eq!(recap.len(), 4, "{output}");
    let hosts = server.hosts(id);
    assert_eq!(hosts.len(), 4);
    server.assert_hosts_match_recap(id);
    let results: Vec<(&str, &str)> = hosts
        .iter()
        .map(|h| (h.host.as_str(), h.result.as_deref().unwrap()))
        .collect();
    assert_eq!(
        results,
        [
            (HOSTS[0], "ok"),
            (HOSTS[1], "ok"),
            (HOSTS[2], "failed"),
            (DEAD, "unreachable")
        ]
    );
    assert_eq!(hosts[1].changed, 1);
    assert_eq!(hosts[2].msg.as_deref(), Some("non-zero return code"));
    // The extra var reached the play.
    assert!(output.contains("\"msg\": \"hello\""), "{output}");
    // Events were recorded in order and end with the stats.
    let events = server.events(id);
    assert_eq!(events.first().unwrap().kind, "playbook_start");
    assert_eq!(events.last().unwrap().kind, "stats");
    assert!(events.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
    // /api/check and /api/getlog say the same.
    let check = server.call("/api/check", json!({"id": id, "name": "mixed"}));
    let log: serde_json::Value =
        serde_json::from_str(check["content"]["log"].as_str().unwrap()).unwrap();
    for (entry, h) in log.as_array().unwrap().iter().zip(&hosts) {
        assert_eq!(entry["host"], json!(h.host));
        assert_eq!(entry["result"], json!(h.result));
        assert_eq!(entry["ok"], json!(h.ok));
        assert_eq!(entry["failed"], json!(h.failed));
    }
    for h in &hosts {
        let lines = server.call("/api/getlog", json!({"host": h.host, "source": "orion"}));
        let line = lines[0].as_str().unwrap();
        assert!(
            line.ends_with(&format!("reuslt = {}", h.result.as_deref().unwrap())),
            "{line}"
        );
    }
    // Nothing of the task is left running.
    assert!(task_processes(&server.run_dir(id)).is_empty());
}

/// What the machine showed while tasks ran, sampled from /proc (no downlink code): per task, the
/// `--forks` its `ansible-playbook` ran with (ansible's own command line), and each sample's
/// count of the tasks' remote `sleep`s running under the test sshd (the work on the nodes).
#[derive(Default)]
struct Seen {
    forks: std::collections::BTreeMap<usize, u32>,
    /// Per task: the start time (clock ticks since boot) of its first process seen.
    started: std::collections::BTreeMap<usize, u64>,
    /// Per sample: (when, per task: its remote sleeps running).
    samples: Vec<(Instant, Vec<usize>)>,
}

/// Samples every 20 ms until `done` turns true.
fn watch_tasks(
    dirs: Vec<std::path::PathBuf>,
    tokens: Vec<String>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let procs = crate::procwatch::snapshot_with_cwd();
            let mut sleeps = vec![0; tokens.len()];
            for (p, cwd) in &procs {
                if let Some(i) = tokens.iter().position(|t| p.cmdline == *t) {
                    sleeps[i] += 1;
                }
                let Some(i) = dirs.iter().position(|d| cwd.as_deref() == Some(d)) else {
                    continue;
                };
                let first = seen.started.entry(i).or_insert(p.start);
                *first = (*first).min(p.start);
                let words: Vec<&str> = p.cmdline.split(' ').collect();
                if let Some(at) = words.iter().position(|w| *w == "--forks") {
                    if let Some(n) = words.get(at + 1).and_then(|n| n.parse().ok()) {
                        seen.forks.insert(i, n);
                    }
                }
            }
            seen.samples.push((Instant::now(), sleeps));
            std::thread::sleep(Duration::from_millis(20));
        }
        seen
    })
}

fn forks_budget_is_never_exceeded_and_queue_is_fifo(backend: Backend) {
    let server = TestServer::start_with(backend, |s| s.max_forks = 4);
    // Costs: min(fork_num, nodes, max_forks).
    let shapes: [(&[&str], u32); 7] = [
        (&HOSTS[..2], 2),
        (&HOSTS[..3], 3),
        (&HOSTS[..1], 5),
        (&HOSTS[..3], 9),
        (&HOSTS[..2], 1),
        (&HOSTS[..2], 2),
        (&HOSTS[..3], 2),
    ];
    // Each task sleeps on its nodes for a time of its own (2.NNNNNi s), so the sleeps running
    // under the test sshd tell the tasks apart.
    // Unique to this test among those running at once (both backends run in one process).
    let nonce = (std::process::id() * 10 + u32::from(backend == Backend::Postgres)) % 100_000;
    let tokens: Vec<String> = (0..shapes.len())
        .map(|i| format!("sleep 2.{nonce:05}{i}"))
        .collect();
    let mut ids = Vec::new();
    for (i, (nodes, fork_num)) in shapes.iter().enumerate() {
        let playbook = format!("- command: {}\n", tokens[i]);
        let mut body = run_body(&format!("forks{i}"), nodes, &playbook);
        body["fork_num"] = json!(fork_num);
        ids.push(server.run(body));
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dirs = ids.iter().map(|id| server.run_dir(*id)).collect();
    let watcher = watch_tasks(dirs, tokens, done.clone());
    let tasks: Vec<_> = ids.iter().map(|id| server.wait_end(*id, 120)).collect();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = watcher.join().expect("the watcher thread");
    assert!(tasks.iter().all(|t| t.status == 4), "{tasks:?}");
    let costs: Vec<u32> = (0..shapes.len())
        .map(|i| seen.forks.get(&i).copied().unwrap_or(0))
        .collect();
    assert_eq!(
        costs,
        [2, 3, 1, 3, 1, 2, 2],
        "--forks of each ansible-playbook"
    );
    // Never more hosts worked on at once than the budget; and the budget was really shared
    // (more at once than any one task's forks).
    let peak = seen
        .samples
        .iter()
        .map(|(_, per_task)| per_task.iter().sum::<usize>())
        .max()
        .unwrap_or(0);
    assert!(peak <= 4, "{peak} remote sleeps at once over a budget of 4");
    assert!(peak > 3, "the tasks never overlapped: peak {peak}");
    // Pending tasks start in arrival order: no task's ansible-playbook starts before an earlier
    // task's (process start times from /proc). A task let past the queue starts a whole round
    // early (an earlier task's 2 s sleep and more); 1.5 s allow for two tasks admitted together
    // whose processes start unevenly on a loaded machine.
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let started: Vec<u64> = (0..shapes.len())
        .map(|i| {
            *seen
                .started
                .get(&i)
                .unwrap_or_else(|| panic!("task {i}'s processes were never seen"))
        })
        .collect();
    for i in 1..started.len() {
        assert!(
            started[i] + tick * 3 / 2 >= started[i - 1],
            "task {i} started {} ticks before task {}",
            started[i - 1] - started[i],
            i - 1
        );
    }
}

const SLEEP_LONG: &str = "- command: sleep 60\n";

fn stop_of_a_pending_task_leaves_the_queue(backend: Backend) {
    let server = TestServer::start_with(backend, |s| s.max_forks = 1);
    let running = server.run(run_body("holder", &[HOSTS[0]], SLEEP_LONG));
    let pending = server.run(run_body("waiter", &[HOSTS[1], HOSTS[2]], SLEEP_LONG));
    server.wait_status(running, &[2], 30);
    assert_eq!(server.task(pending).status, 1);
    let answer = server.call("/api/stop", json!({"id": pending, "name": "waiter"}));
    assert_eq!(answer, json!({"code": 0, "content": {}}));
    let task = server.task(pending);
    assert_eq!(task.status, 5);
    assert_eq!(task.started_at, None, "a stopped pending task never ran");
    assert_eq!(task.err.as_deref(), Some("stopped through /api/stop"));
    let results: Vec<_> = server
        .hosts(pending)
        .into_iter()
        .map(|h| h.result.unwrap())
        .collect();
    assert_eq!(results, ["stopped", "stopped"]);
    // It never ran: its run directory holds only the verdict (end.json), no playbook or output.
    let files: Vec<String> = std::fs::read_dir(server.run_dir(pending))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        files,
        ["end.json"],
        "a task that never ran has no run files"
    );
    assert_eq!(
        server.task(running).status,
        2,
        "the running task is untouched"
    );
    server.call("/api/stop", json!({"id": running, "name": "holder"}));
    assert_eq!(server.task(running).status, 5);
}

fn stop_of_a_running_task_kills_every_process(backend: Backend) {
    let server = TestServer::start(backend);
    let id = server.run(run_body("long", &HOSTS, SLEEP_LONG));
    server.wait_status(id, &[2], 30);
    let dir = server.run_dir(id);
    // Wait until the task holds SSH connections to the three hosts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ssh = task_processes(&dir)
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim() == "ssh")
                    .unwrap_or(false)
            })
            .count();
        if ssh >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no SSH connections after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Running hosts show as running in getlog.
    let lines = server.call("/api/getlog", json!({"host": HOSTS[0], "source": "orion"}));
    assert!(
        lines[0]
            .as_str()
            .unwrap()
            .contains("end_time = , host = 127.0.0.2, reuslt = running"),
        "{lines}"
    );
    let started = Instant::now();
    let answer = server.call("/api/stop", json!({"id": id, "name": "long"}));
    assert_eq!(answer, json!({"code": 0, "content": {}}));
    // Bounded: the grace period, then at most remote_cleanup_secs for the nodes.
    let bound =
        Duration::from_secs(server.settings.stop_grace_secs + server.settings.remote_cleanup_secs);
    assert!(
        started.elapsed() < bound,
        "stop took {:?}",
        started.elapsed()
    );
    assert_eq!(
        task_processes(&dir),
        Vec::<i32>::new(),
        "processes of the task outlived the stop"
    );
    let task = server.task(id);
    assert_eq!(task.status, 5);
    assert_eq!(task.pid, None);
    let results: Vec<_> = server
        .hosts(id)
        .into_iter()
        .map(|h| h.result.unwrap())
        .collect();
    assert_eq!(results, ["stopped", "stopped", "stopped"]);
    // A second stop changes nothing.
    let answer = server.call("/api/stop", json!({"id": id, "name": "long"}));
    assert_eq!(answer, json!({"code": 0, "content": {}}));
    assert_eq!(server.task(id).updated_at, task.updated_at);
}

fn task_over_its_time_limit_ends_with_timeout(backend: Backend) {
    let server = TestServer::start_with(backend, |s| s.task_time_limit_secs = 3);
    let id = server.run(run_body("slow", &HOSTS[..2], SLEEP_LONG));
    let task = server.wait_end(id, 30);
    assert_eq!(task.status, 6);
    assert_eq!(
        task.err.as_deref(),
        Some("killed after running past its time limit of 3 s")
    );
    let results: Vec<_> = server
        .hosts(id)
        .into_iter()
        .map(|h| h.result.unwrap())
        .collect();
    assert_eq!(results, ["timeout", "timeout"]);
    assert!(task_processes(&server.run_dir(id)).is_empty());
}

fn parallel_run_past_its_deadline_kills_the_task(backend: Backend) {
    let server = TestServer::start_with(backend, |s| s.parallel_run_timeout_secs = 3);
    let started = Instant::now();
    let (status, got) = server.post(
        "/api/parallel_run",
        &run_body("deadline", &[HOSTS[0]], SLEEP_LONG).to_string(),
    );
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(20));
    let lines: Vec<String> = serde_json::from_str(&got).unwrap();
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].ends_with("host = 127.0.0.2, reuslt = timeout"),
        "{got}"
    );
    let task = server.task(1);
    assert_eq!(task.status, 6);
    assert_eq!(
        task.err.as_deref(),
        Some("killed after running past its time limit of 3 s")
    );
}

fn ansible_failures_fail_the_task_with_the_reason(backend: Backend) {
    let server = TestServer::start(backend);
    // A module that does not exist: ansible refuses the playbook.
    let id = server.run(run_body(
        "badmodule",
        &[HOSTS[0]],
        "- no_such_module_here: {}\n",
    ));
    let task = server.wait_end(id, 60);
    assert_eq!(task.status, 3);
    let err = task.err.unwrap();
    assert!(
        err.starts_with("ansible-playbook exited with code 4: [ERROR]"),
        "{err}"
    );
    assert!(err.contains("no_such_module_here"), "{err}");
    assert_eq!(server.hosts(id)[0].result.as_deref(), Some("skipped"));

    // The binary is missing.
    let server = TestServer::start_with(backend, |s| {
        s.ansible_playbook = "/nonexistent/ansible-playbook".into()
    });
    let id = server.run(run_body("nobinary", &HOSTS[..2], "- ping:\n"));
    let task = server.wait_end(id, 30);
    assert_eq!(task.status, 3);
    assert_eq!(
        task.err.as_deref(),
        Some("cannot start ansible-playbook (/nonexistent/ansible-playbook): No such file or directory (os error 2)")
    );
    let results: Vec<_> = server
        .hosts(id)
        .into_iter()
        .map(|h| h.result.unwrap())
        .collect();
    assert_eq!(
        results,
        ["skipped", "skipped"],
        "every node still gets its record"
    );
}

/// `/api/check` of a task, its content.
fn checked(server: &TestServer, id: i64, name: &str) -> serde_json::Value {
    server.call("/api/check", json!({"id": id, "name": name}))["content"].clone()
}

/// A task (id, name) and its expected (queue_position, waiting_for): `None` for null and null.
type Place<'a> = (i64, &'a str, Option<(u64, &'a str)>);

/// Each task's (queue_position, waiting_for) in its check answer.
fn assert_places(server: &TestServer, expected: &[Place]) {
    for (id, name, place) in expected {
        let c = checked(server, *id, name);
        let want = match place {
            Some((pos, text)) => (json!(pos), json!(text)),
            None => (json!(null), json!(null)),
        };
        assert_eq!(
            (c["queue_position"].clone(), c["waiting_for"].clone()),
            want,
            "{name}"
        );
    }
}

fn queue_position_counts_down_as_tasks_end(backend: Backend) {
    let http_date = |t: chrono::NaiveDateTime| t.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let server = TestServer::start_with(backend, |s| s.max_forks = 2);
    let two = &[HOSTS[0], HOSTS[1]];
    let holder = server.run(run_body("holder", two, SLEEP_LONG));
    server.wait_status(holder, &[2], 30);
    let w1 = server.run(run_body("w1", two, SLEEP_LONG));
    let w2 = server.run(run_body("w2", &[HOSTS[2]], SLEEP_LONG));
    let w3 = server.run(run_body("w3", two, SLEEP_LONG));
    assert_places(
        &server,
        &[
            (
                w1,
                "w1",
                Some((1, "needs 2 forks, 0 of 2 free; first in the queue")),
            ),
            (
                w2,
                "w2",
                Some((2, "needs 1 fork, 0 of 2 free; 1 task ahead")),
            ),
            (
                w3,
                "w3",
                Some((3, "needs 2 forks, 0 of 2 free; 2 tasks ahead")),
            ),
        ],
    );
    let running = checked(&server, holder, "holder");
    let row = server.task(holder);
    assert_eq!(
        (
            &running["queue_position"],
            &running["waiting_for"],
            &running["started_time"],
            &running["end_time"]
        ),
        (
            &json!(null),
            &json!(null),
            &json!(http_date(row.started_at.expect("started_at stored"))),
            &json!(null)
        )
    );
    assert_eq!(checked(&server, w1, "w1")["started_time"], json!(null));

    server.call("/api/stop", json!({"id": holder, "name": "holder"}));
    server.wait_status(w1, &[2], 30);
    assert_places(
        &server,
        &[
            (w1, "w1", None),
            (
                w2,
                "w2",
                Some((1, "needs 1 fork, 0 of 2 free; first in the queue")),
            ),
            (
                w3,
                "w3",
                Some((2, "needs 2 forks, 0 of 2 free; 1 task ahead")),
            ),
        ],
    );
    let ended = checked(&server, holder, "holder");
    let row = server.task(holder);
    assert_eq!(
        ended["end_time"],
        json!(http_date(row.ended_at.expect("ended_at stored")))
    );

    server.call("/api/stop", json!({"id": w1, "name": "w1"}));
    server.wait_status(w2, &[2], 30);
    let first = "needs 2 forks, 1 of 2 free; first in the queue";
    assert_places(&server, &[(w3, "w3", Some((1, first)))]);
    server.call("/api/stop", json!({"id": w3, "name": "w3"}));
    assert_places(&server, &[(w3, "w3", None)]);
    let stopped = checked(&server, w3, "w3");
    assert_eq!(
        (&stopped["status"], &stopped["started_time"]),
        (&json!(5), &json!(null))
    );
    assert!(stopped["end_time"].is_string(), "{stopped}");
    server.call("/api/stop", json!({"id": w2, "name": "w2"}));
}

#[derive(diesel::QueryableByName, Debug, PartialEq)]
struct LastResult {
    #[diesel(sql_type = diesel::sql_types::Text)]
    host: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    task_id: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    result: Option<String>,
}

#[derive(diesel::QueryableByName, Debug)]
struct Times {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    status_name: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    wait_secs: Option<f64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    run_secs: Option<f64>,
}

fn the_dba_views_show_last_results_and_task_times(backend: Backend) {
    use diesel::RunQueryDsl;
    let server = TestServer::start(backend);
    let first = server.run(run_body("views-1", &[HOSTS[0], HOSTS[1]], "- ping:\n"));
    server.wait_end(first, 60);
    let failing = "- command: /bin/false\n";
    let second = server.run(run_body("views-2", &[HOSTS[0]], failing));
    server.wait_end(second, 60);
    let last: Vec<LastResult> = server.view.read(|c| {
        Ok(diesel::sql_query(
            "SELECT host, task_id, result FROM host_last_results WHERE source = 'orion' ORDER BY host",
        )
        .load(c)?)
    });
    let row = |host: &str, task_id: i64, result: &str| LastResult {
        host: host.into(),
        task_id,
        result: Some(result.into()),
    };
    assert_eq!(
        last,
        [row(HOSTS[0], second, "failed"), row(HOSTS[1], first, "ok")]
    );
    let times: Vec<Times> = server.view.read(|c| {
        Ok(diesel::sql_query(
            "SELECT id, status_name, wait_secs, run_secs FROM task_times ORDER BY id",
        )
        .load(c)?)
    });
    assert_eq!(times.len(), 2);
    for (t, name) in times.iter().zip(["success", "failed"]) {
        let task = server.task(t.id);
        let secs = |d: chrono::TimeDelta| d.num_microseconds().unwrap() as f64 / 1e6;
        let wait = secs(task.started_at.unwrap() - task.created_at);
        let run = secs(task.ended_at.unwrap() - task.started_at.unwrap());
        assert_eq!(t.status_name, name);
        assert!(
            (t.wait_secs.unwrap() - wait).abs() < 0.01,
            "{t:?} wait {wait}"
        );
        assert!((t.run_secs.unwrap() - run).abs() < 0.01, "{t:?} run {run}");
    }
}
