//! Tasks survive the agent: kill -9 and restart, graceful shutdown, and a stop that leaves no
//! process behind, checked in `/proc`.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::both_backends;
use crate::harness::{
    run_body, task_dir, task_processes, test_settings, wait_until, BinServer, DbView, TempDir,
    TestDb, TestServer, DEAD, HOSTS,
};
use crate::procwatch;
use downlink::store::{self, HostRow, Task};

/// What a task's outcome is, without times: status, err, exit code, host results and counters.
type Outcome = (
    i32,
    Option<String>,
    Vec<(String, Option<String>, [i32; 7], Option<String>)>,
);

/// A task's end as far as two runs of it can agree: ansible's own words for an unreachable host
/// differ from run to run (`Connection refused` or `Broken pipe`, quoted one way or the other, as
/// ssh happened to fail), so `err` keeps its part before ansible's message, and a host's `msg`
/// only whether there is one.
fn outcome(task: &Task, hosts: &[HostRow]) -> Outcome {
    (
        task.status,
        task.err
            .as_deref()
            .map(|e| e.split(" (").next().unwrap_or(e).to_owned()),
        hosts
            .iter()
            .map(|h| {
                (
                    h.host.clone(),
                    h.result.clone(),
                    [
                        h.ok,
                        h.changed,
                        h.failed,
                        h.unreachable,
                        h.skipped,
                        h.rescued,
                        h.ignored,
                    ],
                    h.msg.as_ref().map(|_| "a message".to_owned()),
                )
            })
            .collect(),
    )
}

/// A directory, a fresh database, settings for a binary server on them, and a view of the database.
fn setup(
    backend: crate::harness::Backend,
    tweak: impl FnOnce(&mut downlink::settings::Settings),
) -> (TempDir, TestDb, downlink::settings::Settings, DbView) {
    let dir = TempDir::new();
    let db = TestDb::new(backend, &dir.0);
    let mut settings = test_settings(&dir.0);
    settings.database_url = db.url.clone();
    tweak(&mut settings);
    let view = DbView::open(&db.url);
    (dir, db, settings, view)
}

fn run(server: &BinServer, body: serde_json::Value) -> i64 {
    let (_, text) = server.post("/api/run", &body.to_string());
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["content"]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("run refused: {text}"))
}

const LONG: &str = "- command: sleep 6\n  changed_when: true\n- ping:\n";
const VICTIM: &str = "- command: sleep 60\n";

/// The tasks of the crash test: (name, nodes, playbook).
fn crash_tasks() -> Vec<(&'static str, Vec<&'static str>, &'static str)> {
    vec![
        ("long", HOSTS.to_vec(), LONG),
        ("short-fail", vec![HOSTS[0], DEAD], "- ping:\n"),
        ("short-ok", vec![HOSTS[1]], "- command: sleep 1\n"),
    ]
}

both_backends!(
    a_time_limit_and_a_normal_end_leave_nothing_here_or_on_the_nodes,
    kill_9_and_restart_end_every_task_as_without_a_crash
);

fn kill_9_and_restart_end_every_task_as_without_a_crash(backend: crate::harness::Backend) {
    // The reference: the same tasks on a server that does not crash.
    let reference = TestServer::start(backend);
    let mut expected = Vec::new();
    for (name, nodes, playbook) in crash_tasks() {
        let id = reference.run(run_body(name, &nodes, playbook));
        let task = reference.wait_end(id, 90);
        expected.push(outcome(&task, &reference.hosts(id)));
    }
    drop(reference);

    // long (3) + short-fail (2) + short-ok (1) + victim (1) fill the budget: "later" waits.
    let (dir, _db, settings, view) = setup(backend, |s| s.max_forks = 7);
    let mut first = BinServer::start(&settings, &dir.0);
    let ids: Vec<i64> = crash_tasks()
        .into_iter()
        .map(|(name, nodes, playbook)| run(&first, run_body(name, &nodes, playbook)))
        .collect();
    let victim = run(&first, run_body("victim", &[HOSTS[2]], VICTIM));
    let later = run(&first, run_body("later", &[HOSTS[0]], "- ping:\n"));
    for id in ids.iter().chain([&victim]) {
        view.wait_status(*id, &[2], 30);
    }
    assert_eq!(view.task(later).status, 1);
    // Once every task has stored events (its playbook is under way), crash the server and kill
    // one task's whole process group.
    wait_until("every task stores events", 30, || {
        ids.iter()
            .chain([&victim])
            .all(|id| !view.events(*id).is_empty())
    });
    first.signal(Signal::SIGKILL);
    first.wait_exit(10);
    let victim_pid = view.task(victim).pid.expect("victim pid recorded");
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(victim_pid), Signal::SIGKILL).unwrap();
    // The short tasks end while no server runs.
    wait_until("the short tasks' processes end", 60, || {
        ids[1..]
            .iter()
            .all(|id| crate::procwatch::of_task(&task_dir(&settings, *id)).is_empty())
    });

    let second = BinServer::start(&settings, &dir.0);
    for (i, id) in ids.iter().enumerate() {
        let task = view.wait_status(*id, &[3, 4, 5, 6, 7], 90);
        assert_eq!(
            outcome(&task, &view.hosts(*id)),
            expected[i],
            "task {}",
            task.name
        );
    }
    let victim_task = view.wait_status(victim, &[3, 4, 5, 6, 7], 30);
    assert_eq!(victim_task.status, 7, "{victim_task:?}");
    assert_eq!(
        victim_task.err,
        Some(format!(
            "ansible-playbook (pid {victim_pid}) was gone when downlink restarted"
        ))
    );
    assert_eq!(view.hosts(victim)[0].result.as_deref(), Some("interrupted"));
    let later_task = view.wait_status(later, &[3, 4, 5, 6, 7], 60);
    assert_eq!(
        later_task.status, 4,
        "the pending task ran after the restart"
    );
    // Every event of the files is stored once, in order.
    for id in ids.iter().chain([&later]) {
        let events = store::task_events(&mut view.conn(), *id).unwrap();
        let lines = std::fs::read_to_string(task_dir(&settings, *id).join("events.jsonl"))
            .unwrap()
            .lines()
            .count();
        assert_eq!(events.len(), lines, "task {id}");
        assert!(events
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == i as i32 + 1));
    }
    // How long the second server took to re-adopt the long task.
    let adopted = second
        .log_lines()
        .into_iter()
        .find(|l| l["msg"] == "re-adopted a running task")
        .expect("the long task was re-adopted");
    crate::harness::figure(
        &format!("restart_to_readoption_ms ({backend:?})"),
        adoption_ms(&second, &adopted),
    );
}

/// Milliseconds from the spawn of the server process to `line`.
fn adoption_ms(server: &BinServer, line: &serde_json::Value) -> i64 {
    let at = chrono::DateTime::parse_from_rfc3339(line["ts"].as_str().unwrap_or_default()).unwrap();
    (at.with_timezone(&chrono::Utc) - server.started).num_milliseconds()
}

#[test]
fn sigterm_exits_at_once_and_the_next_start_adopts() {
    let (dir, _db, settings, view) = setup(crate::harness::Backend::Sqlite, |_| {});
    let mut first = BinServer::start(&settings, &dir.0);
    let id = run(&first, run_body("through-restart", &HOSTS[..2], LONG));
    view.wait_status(id, &[2], 30);
    // A parallel_run caller waiting when the server goes down gets an answer, not a dropped line.
    let base = first.base.clone();
    let waiter = std::thread::spawn(move || {
        crate::harness::request(
            "POST",
            &format!("{base}/api/parallel_run"),
            &[("X-CORRELATION-ID", "2-2"), ("X-RESOURCE", "orion")],
            &run_body("waited", &[HOSTS[2]], "- command: sleep 30\n").to_string(),
        )
    });
    let waited = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = store::tasks_with_status(&mut view.conn(), &settings.agent_name, &[2], true)
                .unwrap();
            if let Some(t) = t.iter().find(|t| t.name == "waited") {
                break t.id;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    first.signal(Signal::SIGTERM);
    let (code, took) = first.wait_exit(15);
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    crate::harness::figure("sigterm_to_exit_ms", took.as_millis());
    let (status, body) = waiter.join().unwrap();
    assert_eq!(
        (status, body),
        (
            200,
            json!({"code": -1, "message": format!(
            "downlink is shutting down; task {waited} goes on, check it later with /api/check")})
            .to_string()
        )
    );
    // The tasks still run, with nobody watching; the next start adopts them.
    assert_eq!(view.task(id).status, 2);
    assert!(!task_processes(&task_dir(&settings, id)).is_empty());
    let second = BinServer::start(&settings, &dir.0);
    let task = view.wait_status(id, &[3, 4, 5, 6, 7], 60);
    assert_eq!(task.status, 4, "{task:?}");
    let results: Vec<_> = view
        .hosts(id)
        .into_iter()
        .map(|h| (h.result, h.ok, h.changed))
        .collect();
    assert_eq!(results, vec![(Some("ok".to_owned()), 2, 1); 2]);
    let stop = second.post(
        "/api/stop",
        &json!({"id": waited, "name": "waited"}).to_string(),
    );
    assert_eq!(stop, (200, "{\"code\":0,\"content\":{}}".to_owned()));
    assert_eq!(view.task(waited).status, 5);
}

#[test]
fn sigterm_with_stop_tasks_on_shutdown_stops_them() {
    let (dir, _db, settings, view) = setup(crate::harness::Backend::Sqlite, |s| {
        s.stop_tasks_on_shutdown = true
    });
    let mut server = BinServer::start(&settings, &dir.0);
    let id = run(&server, run_body("stopped-at-shutdown", &HOSTS, VICTIM));
    view.wait_status(id, &[2], 30);
    wait_until("its playbook is under way", 30, || {
        !view.events(id).is_empty()
    });
    server.signal(Signal::SIGTERM);
    let (code, _) = server.wait_exit(20);
    assert_eq!(code, Some(0));
    let task = view.task(id);
    assert_eq!(task.status, 5);
    assert_eq!(
        task.err.as_deref(),
        Some("stopped because downlink was shut down")
    );
    assert!(task_processes(&task_dir(&settings, id)).is_empty());
}

/// A task that holds SSH connections to the three hosts, with a backgrounded process and a long
/// command on each node, both named by `token` so they can be found on the machine.
fn holding(token: &str) -> String {
    format!(
        "- shell: nohup sleep {token}1 > /dev/null 2>&1 &\n- command: sleep {token}2\n- ping:\n"
    )
}

/// Waits until `n` processes with `token` in their command line run.
fn wait_for_token(token: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while procwatch::with_token(token).len() < n {
        assert!(
            Instant::now() < deadline,
            "{token}: {n} processes never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn twenty_stops_leave_nothing_here_or_on_the_nodes() {
    let server = TestServer::start(crate::harness::Backend::Sqlite);
    let control = server.run_dir(0).parent().unwrap().join(".cp");
    let (mut local_left, mut remote_left, mut local_seen) = (0, 0, 0);
    let mut stop_ms = Vec::new();
    for i in 0..20 {
        let name = format!("stop-{i}");
        // sleep 71xx1 (backgrounded with nohup) and sleep 71xx2, on each of the three nodes.
        let token = format!("71{i:02}");
        let id = server.run(run_body(&name, &HOSTS, &holding(&token)));
        wait_for_token(&format!("sleep {token}2"), 3);
        let dir = server.run_dir(id);
        let local = procwatch::of_task(&dir);
        local_seen += local.len();
        let remote = procwatch::with_token(&format!("sleep {token}"));
        assert_eq!(remote.len(), 6, "{remote:?}");
        let t = Instant::now();
        server.call("/api/stop", json!({"id": id, "name": name}));
        stop_ms.push(t.elapsed().as_millis());
        local_left += procwatch::still_alive(&local).len() + procwatch::of_task(&dir).len();
        remote_left += procwatch::still_alive(&remote).len();
        assert_eq!(server.task(id).status, 5);
        let hosts = server.hosts(id);
        assert!(
            hosts
                .iter()
                .all(|h| h.result.as_deref() == Some("stopped") && h.msg.is_none()),
            "{hosts:?}"
        );
    }
    stop_ms.sort_unstable();
    crate::harness::figure("processes_left_here_after_20_stops", local_left);
    crate::harness::figure("processes_left_on_the_nodes_after_20_stops", remote_left);
    crate::harness::figure("task_processes_seen_here_before_the_stops", local_seen);
    crate::harness::figure("stop_answer_ms_median", stop_ms[stop_ms.len() / 2]);
    assert_eq!((local_left, remote_left), (0, 0));
    assert!(
        local_seen >= 20 * 4,
        "the test saw the tasks' processes: {local_seen}"
    );
    // The warm connections are the agent's: at most one master per host, and they are still up.
    let masters = procwatch::masters_under(&control);
    assert!(masters.values().all(|&n| n == 1), "{masters:?}");
    assert_eq!(masters.len(), 3, "{masters:?}");
}

#[test]
fn without_cgroups_a_stop_still_leaves_nothing_here_or_on_the_nodes() {
    // A host without a writable cgroup v2, made by a fail point compiled only into test builds.
    fail::cfg("cgroup-detect", "return").unwrap();
    let server = TestServer::start_with(crate::harness::Backend::Sqlite, |s| {
        s.agent_name = format!("fallback-{}", std::process::id());
    });
    let (_, ready) = crate::harness::request("GET", &format!("{}/readyz", server.base), &[], "");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let mode = ready["content"]["process_tracking"].as_str().unwrap_or("");
    assert!(
        mode.starts_with("fallback: no writable cgroup v2"),
        "{ready}"
    );
    let token = "7300";
    let id = server.run(run_body("fallback-stop", &HOSTS, &holding(token)));
    wait_for_token(&format!("sleep {token}2"), 3);
    let dir = server.run_dir(id);
    let local = procwatch::of_task(&dir);
    assert!(!local.is_empty());
    server.call("/api/stop", json!({"id": id, "name": "fallback-stop"}));
    assert_eq!(server.task(id).status, 5);
    assert!(
        procwatch::still_alive(&local).is_empty(),
        "{:?}",
        procwatch::still_alive(&local)
    );
    assert!(procwatch::of_task(&dir).is_empty());
    assert!(
        procwatch::with_token(&format!("sleep {token}")).is_empty(),
        "left on the nodes"
    );
    assert_eq!(
        server.task(id).cpu_usec,
        None,
        "nothing measures CPU without a cgroup"
    );
}

fn a_time_limit_and_a_normal_end_leave_nothing_here_or_on_the_nodes(
    backend: crate::harness::Backend,
) {
    // Long enough for the remote commands to start on a busy machine before the limit strikes.
    let server = TestServer::start_with(backend, |s| s.task_time_limit_secs = 12);
    let token = format!("72{}", backend as u8);
    let id = server.run(run_body("over-time", &HOSTS, &holding(&token)));
    wait_for_token(&format!("sleep {token}2"), 3);
    let local = procwatch::of_task(&server.run_dir(id));
    let remote = procwatch::with_token(&format!("sleep {token}"));
    let task = server.wait_end(id, 60);
    assert_eq!(task.status, 6);
    assert!(procwatch::still_alive(&local).is_empty());
    assert!(
        procwatch::with_token(&format!("sleep {token}")).is_empty(),
        "{remote:?} left on the nodes"
    );
    assert!(server
        .hosts(id)
        .iter()
        .all(|h| h.result.as_deref() == Some("timeout")));
    // What the cgroup measured is recorded.
    assert!(task.cpu_usec.is_some_and(|c| c > 0), "{:?}", task.cpu_usec);
    // A normal end empties the task too (its own processes; the agent's masters stay warm).
    drop(server);
    let server = TestServer::start(backend);
    let id = server.run(run_body("normal", &HOSTS, "- command: sleep 1\n- ping:\n"));
    server.wait_status(id, &[2], 30);
    let mut seen = Vec::new();
    let dir = server.run_dir(id);
    while server.task(id).status == 2 {
        seen.extend(procwatch::of_task(&dir));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.task(id).status, 4);
    assert!(!seen.is_empty());
    assert!(
        procwatch::still_alive(&seen).is_empty(),
        "{:?}",
        procwatch::still_alive(&seen)
    );
    assert!(procwatch::of_task(&dir).is_empty());
}

#[test]
fn a_lowered_max_forks_runs_a_larger_stored_task_with_the_budget_there_is() {
    let (dir, _db, mut settings, view) =
        setup(crate::harness::Backend::Sqlite, |s| s.max_forks = 3);
    let mut first = BinServer::start(&settings, &dir.0);
    let holder = run(&first, run_body("holds-three", &HOSTS, VICTIM));
    view.wait_status(holder, &[2], 30);
    let wide = run(&first, run_body("asks-three", &HOSTS, "- ping:\n"));
    let small = run(&first, run_body("asks-one", &[HOSTS[0]], "- ping:\n"));
    assert_eq!((view.task(wide).status, view.task(wide).forks), (1, 3));
    assert_eq!(view.task(small).status, 1);
    // The operator lowers the budget and restarts; the running task is adopted.
    first.signal(Signal::SIGTERM);
    first.wait_exit(20);
    settings.max_forks = 1;
    let second = BinServer::start(&settings, &dir.0);
    let (_, body) = second.post(
        "/api/stop",
        &json!({"id": holder, "name": "holds-three"}).to_string(),
    );
    assert_eq!(body, json!({"code": 0, "content": {}}).to_string());
    let wide_task = view.wait_end(wide, 60);
    let small_task = view.wait_end(small, 60);
    assert_eq!(
        (wide_task.status, wide_task.forks),
        (4, 1),
        "ran with the budget there is"
    );
    assert_eq!(small_task.status, 4);
    assert!(
        wide_task.started_at <= small_task.started_at,
        "still in arrival order"
    );
    assert!(view
        .hosts(wide)
        .iter()
        .all(|h| h.result.as_deref() == Some("ok")));
}

#[test]
fn an_agent_finds_its_tasks_by_its_name_wherever_it_starts() {
    // A relative run_dir, as by default: each start's working directory decides where it points.
    let (dir, _db, settings, view) = setup(crate::harness::Backend::Sqlite, |s| {
        s.run_dir = "runs".into()
    });
    let (cwd_a, cwd_b) = (dir.0.join("a"), dir.0.join("b"));
    std::fs::create_dir_all(&cwd_a).unwrap();
    std::fs::create_dir_all(&cwd_b).unwrap();
    let mut first = BinServer::start_in(&settings, &dir.0, &cwd_a);
    let kept = run(
        &first,
        run_body("kept", &[HOSTS[0]], "- command: sleep 6\n"),
    );
    let lost = run(&first, run_body("lost", &[HOSTS[1]], VICTIM));
    view.wait_status(kept, &[2], 30);
    view.wait_status(lost, &[2], 30);
    first.signal(Signal::SIGTERM);
    first.wait_exit(20);
    // Another agent on the same database leaves them alone.
    let mut other_settings = settings.clone();
    other_settings.agent_name = "other-agent".into();
    // Serving means its recovery plan is carried out (it is, before it listens).
    let mut other = BinServer::start_in(&other_settings, &dir.0, &cwd_b);
    assert_eq!((view.task(kept).status, view.task(lost).status), (2, 2));
    assert_eq!(
        view.task(kept).agent.as_deref(),
        Some(settings.agent_name.as_str())
    );
    other.signal(Signal::SIGTERM);
    other.wait_exit(20);
    // One task's process and run directory are gone for good.
    let lost_pid = view.task(lost).pid.expect("pid recorded");
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(lost_pid), Signal::SIGKILL).unwrap();
    let root_a = cwd_a
        .join("runs")
        .join(&settings.agent_name)
        .canonicalize()
        .unwrap();
    std::fs::remove_dir_all(root_a.join(lost.to_string())).unwrap();
    // The same agent, started from elsewhere: it adopts what it finds where the task ran and ends
    // what it cannot find anywhere, saying where it looked.
    let _second = BinServer::start_in(&settings, &dir.0, &cwd_b);
    let kept_task = view.wait_end(kept, 60);
    assert_eq!(kept_task.status, 4, "{:?}", kept_task.err);
    let lost_task = view.wait_end(lost, 30);
    assert_eq!(lost_task.status, 7);
    let root_b = cwd_b
        .join("runs")
        .join(&settings.agent_name)
        .canonicalize()
        .unwrap();
    assert_eq!(
        lost_task.err,
        Some(format!(
            "its run directory was not found when downlink restarted (looked in {} and {}), so its end is unknown",
            root_a.join(lost.to_string()).display(),
            root_b.join(lost.to_string()).display()
        ))
    );
    assert!(view
        .hosts(lost)
        .iter()
        .all(|h| h.result.as_deref() == Some("interrupted")));
}

/// What systemd would hear on its notify socket: each datagram as text, until `until` matches one
/// or `secs` pass.
fn heard_until(socket: &std::os::unix::net::UnixDatagram, until: &str, secs: u64) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut heard = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            if heard.last().is_some_and(|m| m.contains(until)) {
                break;
            }
        }
    }
    heard
}

#[test]
fn systemd_hears_ready_after_recovery_then_watchdog_pings_then_stopping() {
    let (dir, _db, settings, view) = setup(crate::harness::Backend::Sqlite, |s| s.max_forks = 1);
    let mut first = BinServer::start(&settings, &dir.0);
    let holder = run(&first, run_body("holder", &[HOSTS[0]], VICTIM));
    let waiter = run(&first, run_body("waiter", &[HOSTS[1]], VICTIM));
    view.wait_status(holder, &[2], 30);
    first.signal(Signal::SIGKILL);
    first.wait_exit(10);

    let path = dir.0.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let env = [
        ("NOTIFY_SOCKET", path.to_string_lossy().into_owned()),
        ("WATCHDOG_USEC", "400000".to_owned()),
    ];
    let mut second = BinServer::start_with_env(&settings, &dir.0, &dir.0, &env);
    let heard = heard_until(&socket, "READY=1", 30);
    assert!(
        heard.last().is_some_and(|m| m.contains("READY=1")),
        "{heard:?}"
    );
    // Ready means recovered: the running task is adopted and the pending one queued again.
    let check = |id: i64, name: &str| {
        let (_, text) = second.post("/api/check", &json!({"id": id, "name": name}).to_string());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        (
            v["content"]["status"].clone(),
            v["content"]["queue_position"].clone(),
        )
    };
    assert_eq!(check(holder, "holder"), (json!(2), json!(null)));
    assert_eq!(check(waiter, "waiter"), (json!(1), json!(1)));
    // Pings every 200 ms (half of WatchdogSec) while the supervisor answers.
    let t = Instant::now();
    let pings = heard_until(&socket, "never", 2)
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    assert!(
        (5..=15).contains(&pings),
        "{pings} pings in {:?}",
        t.elapsed()
    );
    for (id, name) in [(waiter, "waiter"), (holder, "holder")] {
        second.post("/api/stop", &json!({"id": id, "name": name}).to_string());
    }
    second.signal(Signal::SIGTERM);
    let heard = heard_until(&socket, "STOPPING=1", 10);
    assert!(
        heard.last().is_some_and(|m| m.contains("STOPPING=1")),
        "{heard:?}"
    );
    second.wait_exit(30);
    let line = agents_listed(&settings)
        .into_iter()
        .find(|l| l.starts_with(&settings.agent_name))
        .expect("the agent is listed");
    assert!(
        line.ends_with(" draining"),
        "a graceful stop drains: {line}"
    );
}

/// `downlink agents` against these settings' database: its lines after the header.
fn agents_listed(settings: &downlink::settings::Settings) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_downlink"))
        .arg("agents")
        .env_clear()
        .envs(crate::harness::settings_env(settings))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.starts_with("NAME "),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().skip(1).map(str::to_owned).collect()
}

#[derive(diesel::QueryableByName)]
struct Beat {
    #[diesel(sql_type = diesel::sql_types::Timestamp)]
    heartbeat_at: chrono::NaiveDateTime,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

both_backends!(an_agent_is_a_row_with_a_heartbeat_and_shows_lost_once_killed);

fn an_agent_is_a_row_with_a_heartbeat_and_shows_lost_once_killed(backend: crate::harness::Backend) {
    use diesel::RunQueryDsl;
    let (dir, _db, settings, view) = setup(backend, |s| s.heartbeat_secs = 1);
    let mut server = BinServer::start(&settings, &dir.0);
    let name = settings.agent_name.clone();
    let beat = || {
        let rows: Vec<Beat> = view.read(|c| {
            Ok(diesel::sql_query(format!(
                "SELECT heartbeat_at, pid FROM agents WHERE name = '{name}'"
            ))
            .load(c)?)
        });
        assert_eq!(rows.len(), 1, "one row for the agent");
        (rows[0].heartbeat_at, rows[0].pid)
    };
    let (first, pid) = beat();
    assert_eq!(pid, server.child.id() as i32);
    wait_until("a second heartbeat", 10, || beat().0 > first);
    let line = agents_listed(&settings)
        .into_iter()
        .find(|l| l.starts_with(&name))
        .expect("the agent is listed");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[2], pid.to_string(), "{line}");
    assert_eq!(fields.last(), Some(&"active"), "{line}");
    server.signal(Signal::SIGKILL);
    server.wait_exit(10);
    // Three missed heartbeats later it shows as lost, and stays listed.
    wait_until("the killed agent shows as lost", 15, || {
        agents_listed(&settings)
            .into_iter()
            .find(|l| l.starts_with(&name))
            .expect("the agent is still listed")
            .ends_with(" lost")
    });
}
