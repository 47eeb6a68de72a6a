//! Many agents, one service: agents on one PostgreSQL share one queue (`shared_queue`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Integer, Nullable, Text, Timestamp};
use diesel::{QueryableByName, RunQueryDsl};
use serde_json::{json, Value};

use crate::harness::{
    figure, run_body, test_settings, wait_until, Backend, BinServer, DbView, TempDir, TestDb, HOSTS,
};

/// A PostgreSQL database for agents, a directory for their run directories and logs.
fn cluster_db() -> (TempDir, TestDb, DbView) {
    let dir = TempDir::new();
    let db = TestDb::new(Backend::Postgres, &dir.0);
    let view = DbView::open(&db.url);
    (dir, db, view)
}

/// Agent `n` of the shared queue on `db`, two forks, a run directory of its own.
fn agent_settings(dir: &TempDir, db: &TestDb, n: usize) -> downlink::settings::Settings {
    let mut s = test_settings(&dir.0.join(format!("agent-{n}")));
    std::fs::create_dir_all(&s.run_dir).unwrap();
    s.database_url = db.url.clone();
    s.shared_queue = true;
    s.max_forks = 2;
    s
}

fn post(server: &BinServer, path: &str, body: &Value) -> Value {
    let (status, text) = server.post(path, &body.to_string());
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {text:?}: {e}"))
}

fn run(server: &BinServer, body: Value) -> i64 {
    let answer = post(server, "/api/run", &body);
    answer["content"]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("run refused: {answer}"))
}

#[derive(QueryableByName, Debug)]
struct Row {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Integer)]
    status: i32,
    #[diesel(sql_type = Nullable<Text>)]
    agent: Option<String>,
    #[diesel(sql_type = Timestamp)]
    created_at: chrono::NaiveDateTime,
    #[diesel(sql_type = Nullable<Timestamp>)]
    started_at: Option<chrono::NaiveDateTime>,
    #[diesel(sql_type = BigInt)]
    starts: i64,
}

/// Every task, with how many `playbook_start` events it has (ansible runs it had), by plain SQL.
fn rows(view: &DbView) -> Vec<Row> {
    view.read(|c| {
        Ok(diesel::sql_query(
            "SELECT t.id, t.status, t.agent, t.created_at, t.started_at, \
             (SELECT count(*) FROM task_events e WHERE e.task_id = t.id AND e.kind = 'playbook_start') AS starts \
             FROM tasks t ORDER BY t.id",
        )
        .load(c)?)
    })
}

#[derive(QueryableByName)]
struct Silent {
    #[diesel(sql_type = BigInt)]
    ms: i64,
}

/// The forks each agent's `ansible-playbook` processes run with right now, from /proc (no
/// downlink code, no column the agent writes): per agent, the sum over its live task directories
/// of the `--forks` on their ansible command line.
fn forks_running(agents: &[downlink::settings::Settings]) -> BTreeMap<String, i64> {
    let roots: Vec<(String, std::path::PathBuf)> = agents
        .iter()
        .map(|s| {
            let run_dir = s
                .run_dir
                .canonicalize()
                .unwrap_or_else(|_| s.run_dir.clone());
            (s.agent_name.clone(), run_dir.join(&s.agent_name))
        })
        .collect();
    let mut per_dir: BTreeMap<std::path::PathBuf, (String, i64)> = BTreeMap::new();
    for (p, cwd) in crate::procwatch::snapshot_with_cwd() {
        let Some(cwd) = cwd else { continue };
        let Some((agent, _)) = roots
            .iter()
            .find(|(_, root)| cwd.parent() == Some(root.as_path()))
        else {
            continue;
        };
        let words: Vec<&str> = p.cmdline.split(' ').collect();
        let forks = words
            .iter()
            .position(|w| *w == "--forks")
            .and_then(|at| words.get(at + 1)?.parse().ok());
        if let Some(forks) = forks {
            per_dir.insert(cwd, (agent.clone(), forks));
        }
    }
    let mut per_agent = BTreeMap::new();
    for (agent, forks) in per_dir.into_values() {
        *per_agent.entry(agent).or_default() += forks;
    }
    per_agent
}

/// Three agents on one PostgreSQL, two forks each. A `parallel_run` through a busy agent is run by
/// another and answered; check and getlog answer the same through any agent; then 30 tasks sent
/// round-robin run to their end, never more at once than each agent's budget, each claimed and
/// run exactly once (its run directory under one agent only, one playbook_start).
#[test]
fn three_agents_on_one_postgres_act_as_one_queue() {
    let (dir, db, view) = cluster_db();
    let settings: Vec<_> = (0..3).map(|n| agent_settings(&dir, &db, n)).collect();
    let first = BinServer::start(&settings[0], &dir.0);
    // Agent 0 alone claims two long tasks: its forks are all in use.
    let sleep = "- command: sleep 8\n";
    let busy: Vec<i64> = (0..2)
        .map(|i| {
            let mut body = run_body(&format!("busy-{i}"), &[HOSTS[i]], sleep);
            body["fork_num"] = json!(1);
            run(&first, body)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows(&view).iter().filter(|r| r.status == 2).count() < 2 {
        assert!(
            Instant::now() < deadline,
            "agent 0 did not start its two tasks"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let others: Vec<BinServer> = settings[1..]
        .iter()
        .map(|s| BinServer::start(s, &dir.0))
        .collect();
    let names: Vec<&str> = settings.iter().map(|s| s.agent_name.as_str()).collect();

    // parallel_run through agent 0, which has no free fork: another agent runs it.
    let mut body = run_body("through-0", &[HOSTS[2]], "- ping:\n");
    body["fork_num"] = json!(1);
    let (status, text) = first.post("/api/parallel_run", &body.to_string());
    assert_eq!(status, 200, "{text}");
    let lines: Vec<String> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].ends_with(&format!("host = {}, reuslt = ok", HOSTS[2])),
        "{text}"
    );
    let all = rows(&view);
    let remote = all.iter().find(|r| !busy.contains(&r.id)).unwrap();
    assert_eq!(remote.status, 4);
    let ran_by = remote.agent.clone().unwrap();
    assert!(ran_by == names[1] || ran_by == names[2], "{ran_by} ran it");
    let claim = remote.started_at.unwrap() - remote.created_at;
    figure(
        "shared queue: insert on one agent to start on another (claim latency)",
        format!("{} ms", claim.num_milliseconds()),
    );
    // check and getlog through the agent that did not run it.
    let check = post(
        &first,
        "/api/check",
        &json!({"id": remote.id, "name": "through-0"}),
    );
    assert_eq!(check["content"]["status"], json!(4), "{check}");
    assert_eq!(check["content"]["agent"], json!(ran_by));
    let pending_or_running = post(
        &first,
        "/api/check",
        &json!({"id": busy[0], "name": "busy-0"}),
    );
    assert_eq!(pending_or_running["content"]["agent"], json!(names[0]));
    for server in std::iter::once(&first).chain(&others) {
        let (status, log) = server.post(
            "/api/getlog",
            &json!({"host": HOSTS[2], "source": "orion"}).to_string(),
        );
        assert_eq!(status, 200);
        let log: Vec<String> = serde_json::from_str(&log).unwrap();
        assert_eq!(log, lines, "getlog answers the same through every agent");
    }

    // 30 tasks, round-robin over the agents.
    let servers: Vec<&BinServer> = std::iter::once(&first).chain(&others).collect();
    let mut ids = Vec::new();
    for i in 0..30 {
        let mut body = run_body(&format!("rr-{i}"), &[HOSTS[i % 3]], "- command: sleep 1\n");
        body["fork_num"] = json!(1);
        ids.push(run(servers[i % 3], body));
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut peak: BTreeMap<String, i64> = BTreeMap::new();
    loop {
        for (agent, forks) in forks_running(&settings) {
            assert!(forks <= 2, "{agent} runs {forks} forks at once");
            let p = peak.entry(agent).or_default();
            *p = (*p).max(forks);
        }
        let all = rows(&view);
        if all
            .iter()
            .filter(|r| ids.contains(&r.id))
            .all(|r| r.status >= 3)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the 30 tasks did not end in time"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let all = rows(&view);
    let mut per_agent: BTreeMap<String, usize> = BTreeMap::new();
    for r in all.iter().filter(|r| ids.contains(&r.id)) {
        assert_eq!(r.status, 4, "task {} ended {}", r.id, r.status);
        assert_eq!(r.starts, 1, "task {} ran {} times", r.id, r.starts);
        let owner = r.agent.clone().unwrap();
        // Its run directory is under its agent's run root only.
        let under: Vec<&str> = settings
            .iter()
            .filter(|s| {
                s.run_dir
                    .join(&s.agent_name)
                    .join(r.id.to_string())
                    .exists()
            })
            .map(|s| s.agent_name.as_str())
            .collect();
        assert_eq!(under, [owner.as_str()], "task {}", r.id);
        *per_agent.entry(owner).or_default() += 1;
    }
    assert_eq!(per_agent.len(), 3, "every agent ran some: {per_agent:?}");
    figure("shared queue: 30 tasks per agent", format!("{per_agent:?}"));
    figure("shared queue: peak forks per agent", format!("{peak:?}"));
    // Stops through an agent that does not hold the task: six long tasks fill every agent's
    // forks, a seventh waits in the shared queue.
    let hold = |i: usize| format!("- command: sleep 66{i}0\n");
    let mut holds = Vec::new();
    for i in 0..6 {
        let mut body = run_body(&format!("hold-{i}"), &[HOSTS[i % 3]], &hold(i));
        body["fork_num"] = json!(1);
        holds.push(run(servers[i % 3], body));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows(&view)
        .iter()
        .filter(|r| holds.contains(&r.id) && r.status == 2)
        .count()
        < 6
    {
        assert!(
            Instant::now() < deadline,
            "the six long tasks did not all start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut body = run_body("queued", &[HOSTS[0]], "- ping:\n");
    body["fork_num"] = json!(1);
    let queued = run(servers[0], body);
    let check = post(
        servers[1],
        "/api/check",
        &json!({"id": queued, "name": "queued"}),
    );
    assert_eq!(check["content"]["status"], json!(1), "{check}");
    assert_eq!(check["content"]["queue_position"], json!(1), "{check}");
    assert_eq!(check["content"]["agent"], Value::Null);
    let stopped = post(
        servers[2],
        "/api/stop",
        &json!({"id": queued, "name": "queued"}),
    );
    assert_eq!(stopped, json!({"code": 0, "content": {}}));
    let row = rows(&view).into_iter().find(|r| r.id == queued).unwrap();
    assert_eq!(
        (row.status, row.starts),
        (5, 0),
        "stopped while queued, never run"
    );
    assert!(settings.iter().all(|s| !s
        .run_dir
        .join(&s.agent_name)
        .join(queued.to_string())
        .exists()));
    let mut stop_ms = Vec::new();
    for (i, id) in holds.iter().enumerate() {
        let row = rows(&view).into_iter().find(|r| r.id == *id).unwrap();
        let owner = names
            .iter()
            .position(|n| Some(*n) == row.agent.as_deref())
            .unwrap();
        let through = (owner + 1) % 3;
        let run_dir = settings[owner]
            .run_dir
            .join(names[owner])
            .join(id.to_string());
        let token = format!("sleep 66{i}0");
        let deadline = Instant::now() + Duration::from_secs(30);
        while crate::procwatch::with_token(&token).is_empty() {
            assert!(Instant::now() < deadline, "{token} never ran on its node");
            std::thread::sleep(Duration::from_millis(50));
        }
        let t = Instant::now();
        let answer = post(
            servers[through],
            "/api/stop",
            &json!({"id": id, "name": format!("hold-{i}")}),
        );
        stop_ms.push(t.elapsed().as_millis());
        assert_eq!(
            answer,
            json!({"code": 0, "content": {}}),
            "stop through agent {through}"
        );
        let row = rows(&view).into_iter().find(|r| r.id == *id).unwrap();
        assert_eq!(row.status, 5);
        assert_eq!(
            crate::procwatch::of_task(&run_dir),
            Vec::new(),
            "local processes of {id}"
        );
        assert_eq!(
            crate::procwatch::with_token(&token),
            Vec::new(),
            "{token} on the node"
        );
    }
    stop_ms.sort_unstable();
    figure(
        "shared queue: stop through another agent (answer once recorded; 6 stops)",
        format!("median {} ms, max {} ms", stop_ms[3], stop_ms[5]),
    );

    // The two long tasks end too, run by agent 0.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = rows(&view);
        let long: Vec<&Row> = all.iter().filter(|r| busy.contains(&r.id)).collect();
        if long.iter().all(|r| r.status == 4) {
            assert!(long.iter().all(|r| r.agent.as_deref() == Some(names[0])));
            break;
        }
        assert!(Instant::now() < deadline, "{long:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn row(view: &DbView, id: i64) -> downlink::store::Task {
    view.task(id)
}

/// kill -9 of an agent while it runs two tasks: another agent keeps serving and notes the loss on
/// them; restarted within the grace, the agent adopts both (one then ends by itself, its true
/// end); killed again and not restarted, its task ends 7 past the grace, saying which agent was
/// lost and since when. No task runs twice.
#[test]
fn a_lost_agent_loses_nothing_and_nothing_runs_twice() {
    let (dir, db, view) = cluster_db();
    let agent = |n: usize| {
        let mut s = agent_settings(&dir, &db, n);
        s.heartbeat_secs = 1;
        s.lost_agent_grace_secs = 8;
        s
    };
    let (a_settings, b_settings) = (agent(0), agent(1));
    let mut a = BinServer::start(&a_settings, &dir.0);
    let body = |name: &str, host: &str, tasks: &str| {
        let mut b = run_body(name, &[host], tasks);
        b["fork_num"] = json!(1);
        b
    };
    let short = run(&a, body("short", HOSTS[0], "- command: sleep 9\n"));
    let long = run(&a, body("long", HOSTS[1], "- command: sleep 6620\n"));
    wait_until("agent a runs both", 30, || {
        [short, long].iter().all(|id| row(&view, *id).status == 2)
            && !crate::procwatch::with_token("sleep 6620").is_empty()
    });
    let pid_before = row(&view, long).pid;
    let b = BinServer::start(&b_settings, &dir.0);
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // The other agent goes on serving.
    let other = run(&b, body("other", HOSTS[2], "- ping:\n"));
    wait_until("agent b runs a new task", 60, || {
        row(&view, other).status == 4
    });
    assert_eq!(
        row(&view, other).agent.as_deref(),
        Some(b_settings.agent_name.as_str())
    );
    // The loss is noted on a's tasks, which stay running.
    wait_until("the loss noted", 20, || {
        [short, long].iter().all(|id| {
            let t = row(&view, *id);
            t.status == 2
                && t.err
                    .as_deref()
                    .is_some_and(|e| e.contains("has not been heard from since"))
        })
    });
    // Back within the grace: it adopts both and takes the notes back.
    let mut a = BinServer::start(&a_settings, &dir.0);
    wait_until("the notes taken back", 20, || {
        [short, long].iter().all(|id| row(&view, *id).err.is_none())
    });
    assert_eq!(
        row(&view, long).pid,
        pid_before,
        "adopted, not started again"
    );
    wait_until("the short task's true end", 60, || {
        row(&view, short).status == 4
    });
    // Killed again and not restarted: past lease + grace its task ends 7 through agent b.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    // A stop through b while a is lost (its lease, 3 heartbeats, ran out on the database's clock):
    // the answer says so, and the stop stays recorded.
    wait_until("agent a's lease runs out", 20, || {
        let silent: Vec<Silent> = view.read(|c| {
            Ok(diesel::sql_query(
                "SELECT CAST(EXTRACT(EPOCH FROM ((now() AT TIME ZONE 'UTC') - heartbeat_at)) * 1000 AS BIGINT) AS ms \
                 FROM agents WHERE name = $1",
            )
            .bind::<Text, _>(&a_settings.agent_name)
            .load(c)?)
        });
        silent
            .first()
            .is_some_and(|s| s.ms > 3 * 1000 * a_settings.heartbeat_secs as i64 + 500)
    });
    let (_, answer) = b.post(
        "/api/stop",
        &json!({"id": long, "name": "long"}).to_string(),
    );
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(&format!(
            "task {long} runs on agent {}, which has not been heard from for ",
            a_settings.agent_name
        )) && message
            .ends_with(" s: the stop is recorded and is applied when that agent starts again"),
        "{answer}"
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    while row(&view, long).status != 7 {
        if Instant::now() > deadline {
            let log: Vec<String> = b.log_lines().iter().map(|l| l.to_string()).collect();
            panic!(
                "the long task did not end 7 through agent b: {:?}\n{}",
                row(&view, long),
                log.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = row(&view, long);
    let err = t.err.unwrap_or_default();
    assert!(
        err.starts_with(&format!(
            "agent {} was lost: no heartbeat since ",
            a_settings.agent_name
        )),
        "{err}"
    );
    assert!(
        killed.elapsed() >= Duration::from_secs(8),
        "ended before the grace"
    );
    for id in [short, long, other] {
        let starts = rows(&view).into_iter().find(|r| r.id == id).unwrap().starts;
        assert_eq!(starts, 1, "task {id} ran {starts} times");
    }
    // Once it reads 7, nothing of it runs: here its own watchdog ended it (the agent that started
    // it is gone), and on its node agent b cleaned it before recording the 7.
    assert!(err.contains("its nodes were cleaned first"), "{err}");
    let run_dir = a_settings
        .run_dir
        .join(&a_settings.agent_name)
        .join(long.to_string());
    let here = crate::procwatch::of_task(&run_dir);
    let there = crate::procwatch::with_token("sleep 6620");
    assert!(
        here.is_empty() && there.is_empty(),
        "task {long} reads 7 while it runs: here {here:?}, on its node {there:?}"
    );
}

/// A `parallel_run` through an agent with no free fork is run by another agent; past the first
/// agent's deadline the task is killed there (status 6), asked through its row, and the answer
/// comes once that is recorded.
#[test]
fn a_parallel_run_deadline_kills_the_task_another_agent_runs() {
    let (dir, db, view) = cluster_db();
    let mut a_settings = agent_settings(&dir, &db, 0);
    a_settings.max_forks = 1;
    a_settings.parallel_run_timeout_secs = 4;
    let b_settings = agent_settings(&dir, &db, 1);
    let a = BinServer::start(&a_settings, &dir.0);
    let body = |name: &str, host: &str, tasks: &str| {
        let mut b = run_body(name, &[host], tasks);
        b["fork_num"] = json!(1);
        b
    };
    let hold = run(&a, body("hold", HOSTS[0], "- command: sleep 6630\n"));
    wait_until("agent a runs its task", 30, || row(&view, hold).status == 2);
    let b = BinServer::start(&b_settings, &dir.0);
    let t = Instant::now();
    let (status, text) = a.post(
        "/api/parallel_run",
        &body("deadline", HOSTS[1], "- command: sleep 6631\n").to_string(),
    );
    let took = t.elapsed();
    assert_eq!(status, 200, "{text}");
    let lines: Vec<String> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].ends_with(&format!("host = {}, reuslt = timeout", HOSTS[1])),
        "{text}"
    );
    let id = rows(&view).iter().map(|r| r.id).max().unwrap();
    let task = row(&view, id);
    assert_eq!(task.status, 6);
    assert_eq!(task.agent.as_deref(), Some(b_settings.agent_name.as_str()));
    assert!(took >= Duration::from_secs(4), "{took:?}");
    assert!(crate::procwatch::with_token("sleep 6631").is_empty());
    // And the long one, stopped through the other agent.
    let answer = post(&b, "/api/stop", &json!({"id": hold, "name": "hold"}));
    assert_eq!(answer, json!({"code": 0, "content": {}}));
    assert!(crate::procwatch::with_token("sleep 6630").is_empty());
}

/// `cluster_max_forks` caps the forks in use over all agents, below the sum of their budgets.
#[test]
fn cluster_max_forks_caps_every_agent_together() {
    let (dir, db, view) = cluster_db();
    let agent = |n: usize| {
        let mut s = agent_settings(&dir, &db, n);
        s.cluster_max_forks = 3;
        s
    };
    let agents: Vec<downlink::settings::Settings> = (0..2).map(agent).collect();
    let servers: Vec<BinServer> = agents.iter().map(|s| BinServer::start(s, &dir.0)).collect();
    let mut ids = Vec::new();
    for i in 0..8 {
        let mut body = run_body(
            &format!("capped-{i}"),
            &[HOSTS[i % 3]],
            "- command: sleep 2\n",
        );
        body["fork_num"] = json!(1);
        ids.push(run(&servers[i % 2], body));
    }
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = forks_running(&agents);
        let total: i64 = running.values().sum();
        assert!(
            total <= 3,
            "{total} forks at once over the agents: {running:?}"
        );
        peak = peak.max(total);
        if rows(&view).iter().all(|r| r.status >= 3) {
            break;
        }
        assert!(Instant::now() < deadline, "the eight tasks did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(peak, 3, "the cap is reached, not only respected");
    assert!(rows(&view).iter().all(|r| r.status == 4 && r.starts == 1));
}
