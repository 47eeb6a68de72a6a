//! The agent's own cost: downlink driven hard with a scripted stand-in for `ansible-playbook`
//! (this same executable, started under the name `ansible-playbook`), so what is measured is the
//! server and never ansible. The stand-in's behaviour is proven with the real ansible-playbook by
//! the test suite; here it only writes callback-format events as fast as it can, sleeps and exits.
//!
//! Figures, one line each (targets in brackets):
//!
//! - P3: `/api/run` answered → stand-in process started, at 200 requests/s for 30 s, on PostgreSQL
//!   [p50 ≤ 5 ms, p99 ≤ 20 ms].
//! - P4: server RSS with 10,000 accepted tasks, 2,000 running stand-ins and 8,000 pending
//!   [≤ 150 MB; ≤ 40 KB per running task above an idle server].
//! - P5: `/api/check` requests/s on PostgreSQL ÷ `pgbench -S` transactions/s, 16 clients each
//!   [≥ 0.5].
//! - P6: events stored per second from 200 stand-ins that each write 2,500 events at once
//!   [≥ 50,000 on PostgreSQL, ≥ 20,000 on SQLite].
//! - W5000: one task of 5,000 distinct nodes × 10 events each: the server's RSS growth, the
//!   stand-in's exit → the row's final status [≤ 1 s], `/api/check` of that task, its `log`
//!   holding 5,000 hosts [p99 ≤ 100 ms].
//! - R7: 100,000 short tasks in a row, 8 callers of `/api/parallel_run` at a time: the server's
//!   RSS, open descriptors and threads over the last 10 % against the first 10 % [within 5 %].
//!
//! Every figure is observed from outside the server: start times written by the stand-in
//! itself, `/proc/PID/status` and `/proc/PID/fd` of the server, row counts by `psql` and Python's
//! `sqlite3`, the status read back through the API.
//!
//! `scripts/bench-cost` runs it (it starts PostgreSQL and the SSH test hosts first; tasks name
//! a test host, so the agent's SSH connection layer is part of what is measured); `--quick` runs a
//! short version that only proves it works (CI does), and names such as `P3 R7` pick figures.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{env, in_parallel, v2_mount, Cg, Downlink};
use serde_json::{json, Value};

const AGENT: &str = "bench";
const NODE: &str = "127.0.0.2";
const PLAYBOOK: &str = "- hosts: all\n  gather_facts: false\n  tasks:\n    - ping:\n";
/// The name the stand-in is started under.
const STANDIN: &str = "ansible-playbook";

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// The stand-in: notes when it started (`standin-started` in its working directory, the task's
/// run directory), appends `standin_events` runner events and a stats event to the events file,
/// sleeps `standin_sleep` seconds and exits 0.
fn standin() -> ! {
    let started = unix_ns();
    if std::env::args().any(|a| a == "--version") {
        println!("ansible-playbook [core 2.19.0] (downlink-bench stand-in)");
        std::process::exit(0);
    }
    let _ = std::fs::write("standin-started", started.to_string());
    let spec: Value = std::fs::read("extra_vars.json")
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let events = spec["standin_events"].as_u64().unwrap_or(1);
    let sleep = Duration::from_secs_f64(spec["standin_sleep"].as_f64().unwrap_or(0.0));
    // Every node of the inventory (downlink writes it as JSON, which is YAML), or the one node.
    let hosts: Vec<String> = if spec["standin_every_host"] == true {
        std::fs::read("inventory.yml")
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|inv| {
                inv["all"]["hosts"]
                    .as_object()
                    .map(|h| h.keys().cloned().collect())
            })
            .expect("an inventory of JSON")
    } else {
        vec![NODE.to_owned()]
    };
    let Ok(path) = std::env::var("DOWNLINK_EVENTS_FILE") else {
        std::thread::sleep(sleep);
        std::process::exit(0)
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("events file");
    let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
    for host in &hosts {
        for i in 0..events {
            let _ = writeln!(
                out,
                r#"{{"event":"runner_ok","time":"2026-12-01T10:00:00.000000Z","host":"{host}","task":"step {i}","changed":false}}"#
            );
        }
    }
    let _ = out.flush();
    std::thread::sleep(sleep);
    let counters = format!(
        r#"{{"ok":{events},"changed":0,"failed":0,"unreachable":0,"skipped":0,"rescued":0,"ignored":0}}"#
    );
    let stats: Vec<String> = hosts
        .iter()
        .map(|h| format!(r#""{h}":{counters}"#))
        .collect();
    let _ = writeln!(
        out,
        r#"{{"event":"stats","hosts":{{{}}}}}"#,
        stats.join(",")
    );
    let _ = out.flush();
    let _ = std::fs::write("standin-exited", unix_ns().to_string());
    std::process::exit(0)
}

/// Where the bench works, and what every server gets.
struct Bench {
    dir: PathBuf,
    cg: PathBuf,
    standin: PathBuf,
    pg_url: String,
    ssh: [(&'static str, String); 3],
}

#[derive(Clone, Copy, PartialEq)]
enum Db {
    Postgres,
    Sqlite,
}

/// A server under test and how to count its rows.
struct Subject {
    server: Downlink,
    db: Db,
    url: String,
    run_dir: PathBuf,
    sql: SqlClient,
}

/// A session of the database's own client: `psql`, or Python's `sqlite3`, fed one query a line.
type SqlClient = Mutex<
    Option<(
        std::process::Child,
        std::io::BufReader<std::process::ChildStdout>,
    )>,
>;

impl Bench {
    fn new() -> Bench {
        let id = std::process::id();
        // On tmpfs: this machine's root ext4 runs without a journal, where every file created
        // within minutes of a mass deletion scans the recently freed inodes (`recently_deleted`).
        // After one figure's cleanup that was 57 % of the next server's CPU, a cost of the bench's
        // own `rm -r`, not of the agent.
        let dir = PathBuf::from(format!("/dev/shm/dl-cost-{id}"));
        std::fs::create_dir_all(dir.join("bin")).expect("bench dir");
        let standin = dir.join("bin").join(STANDIN);
        let me = std::env::current_exe().expect("the bench's own path");
        std::os::unix::fs::symlink(me, &standin).expect("stand-in link");
        Bench {
            cg: Cg::new(v2_mount().join(format!("dlcost-{id}"))).0,
            dir,
            standin,
            pg_url: env("DLTEST_PG_URL"),
            ssh: [
                ("ssh_private_key", env("DLTEST_SSH_KEY")),
                ("ssh_port", env("DLTEST_SSH_PORT")),
                (
                    "ssh_common_args",
                    "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no".into(),
                ),
            ],
        }
    }

    /// A fresh PostgreSQL database for `name`; its URL. [`drop_database`] removes it.
    fn database(&self, name: &str) -> String {
        let database = format!("dlcost_{}_{}", std::process::id(), name.replace('-', "_"));
        psql(&self.pg_url, &format!("CREATE DATABASE {database}"));
        let (base, _) = self.pg_url.rsplit_once('/').expect("a URL with a database");
        format!("{base}/{database}")
    }

    /// A fresh server on a fresh database, with these settings on top of the bench's own.
    fn server(&self, name: &str, db: Db, settings: &[(&str, String)]) -> Subject {
        let work = self.dir.join(name);
        let url = match db {
            Db::Postgres => self.database(name),
            Db::Sqlite => format!("sqlite://{}/downlink.db", work.display()),
        };
        let mut all: Vec<(&str, String)> = vec![
            ("agent_name", AGENT.into()),
            ("database_url", url.clone()),
            ("ansible_playbook", self.standin.display().to_string()),
            ("max_forks", "500".into()),
        ];
        all.extend(self.ssh.iter().cloned());
        all.extend(settings.iter().cloned());
        let server = Downlink::start(&work, Cg::new(self.cg.join(name)), &all);
        let subject = Subject {
            server,
            db,
            url,
            run_dir: work.join("data/runs").join(AGENT),
            sql: Mutex::new(None),
        };
        // The agent's SSH master to the node comes up once, before anything is measured.
        let agent = client();
        let id = subject.run(&agent, &format!("{name}-warm"), json!({}), 1);
        subject.wait_ended(&[id], Duration::from_secs(60));
        subject
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        // The server first, then its database (a bench leaves no database behind).
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
        if let Some((child, _)) = self.sql.get_mut().ok().and_then(Option::take) {
            drop(child);
        }
        if self.db == Db::Postgres {
            drop_database(&self.url);
        }
    }
}

/// Drops the database `url` names (its sessions too), through the `postgres` database beside it.
fn drop_database(url: &str) {
    if let Some((base, database)) = url.rsplit_once('/') {
        let _ = Command::new("psql")
            .args(["-X", "-q", &format!("{base}/postgres"), "-c"])
            .arg(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            .output();
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        common::remove_cgroups(&self.cg);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(600))
        .build()
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args(["-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .output()
        .expect("psql runs (apt-get install postgresql-client)");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Subject {
    /// One number from plain SQL, by the database's own client (one session for the whole
    /// figure, so polling costs the machine next to nothing).
    fn count(&self, sql: &str) -> i64 {
        use std::io::BufRead;
        let mut sql_client = self.sql.lock().expect("sql client");
        let client = sql_client.get_or_insert_with(|| {
            let mut cmd = match self.db {
                Db::Postgres => {
                    let mut c = Command::new("psql");
                    c.args(["-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", &self.url]);
                    c
                }
                Db::Sqlite => {
                    let mut c = Command::new("python3");
                    c.args([
                        "-u",
                        "-c",
                        "import sqlite3, sys\n\
                         c = sqlite3.connect(sys.argv[1], timeout=30)\n\
                         for q in sys.stdin: print(c.execute(q).fetchone()[0])",
                        self.url.trim_start_matches("sqlite://"),
                    ]);
                    c
                }
            };
            let mut child = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("psql or python3 runs");
            let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
            (child, out)
        });
        let (child, out) = client;
        let stdin = child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{};", sql.trim_end_matches(';')).expect("query sent");
        let mut line = String::new();
        out.read_line(&mut line).expect("answer");
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{sql} gave `{line}`"))
    }

    /// `/api/run` of one task on `nodes` test hosts with these stand-in params; its id.
    fn run(&self, agent: &ureq::Agent, name: &str, params: Value, nodes: usize) -> i64 {
        let nodes: Vec<String> = (2..2 + nodes).map(|i| format!("127.0.0.{i}")).collect();
        let body = json!({"nodes": nodes, "user": "root", "name": name, "tasks": PLAYBOOK,
            "params": params, "fork_num": 1});
        let text = self.server.post(agent, "/api/run", &body);
        let answer: Value = serde_json::from_str(&text).expect("JSON answer");
        answer["content"]["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("run {name}: {text}"))
    }

    /// Waits until every one of `ids` has ended, and asserts each ended 4 (success).
    fn wait_ended(&self, ids: &[i64], limit: Duration) {
        let deadline = Instant::now() + limit;
        let (lo, hi) = (ids.iter().min().copied(), ids.iter().max().copied());
        let (Some(lo), Some(hi)) = (lo, hi) else {
            return;
        };
        let range = format!("id BETWEEN {lo} AND {hi}");
        while self.count(&format!(
            "SELECT count(*) FROM tasks WHERE {range} AND status < 3"
        )) > 0
        {
            assert!(Instant::now() < deadline, "tasks {lo}..{hi} did not end");
            std::thread::sleep(Duration::from_millis(100));
        }
        let ok = self.count(&format!(
            "SELECT count(*) FROM tasks WHERE {range} AND status = 4"
        ));
        assert_eq!(
            ok as usize,
            ids.len(),
            "tasks {lo}..{hi} did not all succeed"
        );
    }

    /// When the stand-in of task `id` started (Unix nanoseconds).
    fn started(&self, id: i64) -> Option<u128> {
        std::fs::read_to_string(self.run_dir.join(id.to_string()).join("standin-started"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The server's resident memory (KiB), open descriptors and threads.
    fn footprint(&self) -> (u64, usize, u64) {
        let pid = self.server.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        (field("VmRSS:"), fds, field("Threads:"))
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// P3: open-loop `/api/run` at `rate` per second for `secs`; answered → started.
fn p3(b: &Bench, rate: u32, secs: u32) {
    let s = b.server("p3", Db::Postgres, &[]);
    let server_cg = Cg(s.server.cg.0.join("server"));
    let cpu_before = server_cg.cpu_secs();
    let total = (rate * secs) as usize;
    let (tx, rx) = mpsc::channel::<usize>();
    let rx = Arc::new(Mutex::new(rx));
    let answered = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let late = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..32 {
            let (rx, answered, s) = (rx.clone(), answered.clone(), &s);
            scope.spawn(move || {
                let agent = client();
                loop {
                    let Ok(i) = rx.lock().expect("queue").recv() else {
                        break;
                    };
                    let id = s.run(&agent, &format!("p3-{i}"), json!({}), 1);
                    let at = unix_ns();
                    answered.lock().expect("answers").push((id, at));
                }
            });
        }
        let t0 = Instant::now();
        let every = Duration::from_secs_f64(1.0 / f64::from(rate));
        for i in 0..total {
            let at = t0 + every * i as u32;
            match at.checked_duration_since(Instant::now()) {
                Some(wait) => std::thread::sleep(wait),
                None if Instant::now() - at > Duration::from_millis(5) => {
                    late.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
            tx.send(i).expect("a lane");
        }
        drop(tx);
    });
    let answered = answered.lock().expect("answers").clone();
    let ids: Vec<i64> = answered.iter().map(|(id, _)| *id).collect();
    s.wait_ended(&ids, Duration::from_secs(120));
    let cpu_ms = (server_cg.cpu_secs() - cpu_before) * 1e3 / total as f64;
    let mut ms: Vec<f64> = Vec::with_capacity(total);
    let mut before_answer = 0;
    for (id, at) in &answered {
        let started = s
            .started(*id)
            .unwrap_or_else(|| panic!("task {id}: no stand-in start"));
        if started < *at {
            before_answer += 1;
        }
        ms.push(started.saturating_sub(*at) as f64 / 1e6);
    }
    if let Ok(path) = std::env::var("DLBENCH_DUMP") {
        let lines: Vec<String> = answered
            .iter()
            .zip(&ms)
            .map(|((id, at), m)| format!("{id} {at} {m:.3}"))
            .collect();
        let _ = std::fs::write(path, lines.join("\n"));
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "P3 p50={:.2}ms p99={:.2}ms max={:.2}ms ({total} tasks at {rate}/s on PostgreSQL; {before_answer} stand-ins started before their answer arrived, counted as 0; {} requests sent over 5 ms late; the server's own CPU {cpu_ms:.2} ms per task; targets p50 <= 5 ms, p99 <= 20 ms)",
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN),
        late.load(Ordering::Relaxed),
    );
}

/// P4: RSS with `running` stand-ins that sleep and `pending` tasks behind them.
fn p4(b: &Bench, running: usize, pending: usize) {
    let total = running + pending;
    let s = b.server(
        "p4",
        Db::Postgres,
        &[
            ("max_forks", running.to_string()),
            ("max_queued", (total + 10).to_string()),
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let (idle_kib, idle_fds, idle_threads) = s.footprint();
    let t = in_parallel(total, 16, |i| {
        thread_local!(static AGENT: ureq::Agent = client());
        AGENT.with(|a| s.run(a, &format!("p4-{i}"), json!({"standin_sleep": 3600}), 1));
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let started = std::fs::read_dir(&s.run_dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("standin-started").exists())
                    .count()
            })
            .unwrap_or(0);
        let running_rows = s.count("SELECT count(*) FROM tasks WHERE status = 2");
        // The warm-up task's stand-in has a start file too.
        if started > running && running_rows == running as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{started} stand-ins started, {running_rows} running rows"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(3));
    // What following the running tasks costs while they print nothing.
    let server_cg = Cg(s.server.cg.0.join("server"));
    let cpu_before = server_cg.cpu_secs();
    std::thread::sleep(Duration::from_secs(5));
    let idle_cpu = (server_cg.cpu_secs() - cpu_before) / 5.0 * 100.0;
    let pending_rows = s.count("SELECT count(*) FROM tasks WHERE status = 1");
    assert_eq!(pending_rows as usize, pending);
    let (kib, fds, threads) = s.footprint();
    let per_task = (kib.saturating_sub(idle_kib)) as f64 / running as f64;
    println!(
        "P4 rss={:.1}MB per_running_task={per_task:.1}KB ({running} running stand-ins, {pending} pending, accepted in {t:.1} s; idle server {:.1} MB, {idle_fds} fds, {idle_threads} threads; loaded {fds} fds, {threads} threads, {idle_cpu:.1} % of a core while the stand-ins sleep; targets rss <= 150 MB, per running task <= 40 KB)",
        kib as f64 / 1024.0,
        idle_kib as f64 / 1024.0,
    );
}

/// P5: `/api/check` against `pgbench -S`, 16 clients each, in three rounds of `secs` seconds
/// each, the two taking turns (this VM's speed drifts within a minute). Two more rates show what
/// bounds it: `pgbench` running the very statement a check sends (the database's own floor for
/// it), and `/api/check` refused before it reaches the database (HTTP's own floor).
fn p5(b: &Bench, secs: u64) {
    let s = b.server("p5", Db::Postgres, &[]);
    let agent = client();
    let id = s.run(&agent, "p5-checked", json!({"standin_events": 3}), 3);
    s.wait_ended(&[id], Duration::from_secs(60));
    let url = b.database("pgbench");
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", &url])
        .output()
        .expect("pgbench runs (apt-get install postgresql-contrib)");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let checked = json!({"id": id, "name": "p5-checked"});
    // Warm-up, not counted: the workers' read connections open on first use.
    check_rate(&s, &checked, 2);
    let rounds: Vec<(f64, f64)> = (0..3)
        .map(|_| (check_rate(&s, &checked, secs), pgbench(&url, &["-S"], secs)))
        .collect();
    let http_rps = check_rate(&s, &json!({"id": id}), secs);
    let statement = std::env::temp_dir().join(format!("dlcost-{}-check.sql", std::process::id()));
    std::fs::write(&statement, CHECK_STATEMENT.replace("$1", &id.to_string())).expect("write");
    let statement_tps = pgbench(
        &s.url,
        &[
            "-M",
            "prepared",
            "-f",
            statement.to_str().expect("a UTF-8 path"),
        ],
        secs,
    );
    let _ = std::fs::remove_file(&statement);
    drop(s);
    drop_database(&url);
    let rps = rounds.iter().map(|r| r.0).sum::<f64>() / 3.0;
    let tps = rounds.iter().map(|r| r.1).sum::<f64>() / 3.0;
    let each: Vec<String> = rounds
        .iter()
        .map(|(r, t)| format!("{:.2}", r / t))
        .collect();
    println!(
        "P5 ratio={:.2} (/api/check {rps:.0} requests/s against pgbench -S {tps:.0} transactions/s, 16 clients each, 3 rounds of {secs} s taking turns, rounds {}; target >= 0.5)",
        rps / tps,
        each.join(" ")
    );
    println!(
        "P5 bounds: the statement a check sends, run by pgbench -M prepared: {statement_tps:.0}/s ({:.2} of -S); /api/check refused before the database (a param error): {http_rps:.0} requests/s ({:.2} of -S)",
        statement_tps / tps,
        http_rps / tps
    );
}

/// The statement `/api/check` sends on PostgreSQL (`readers::task_with_hosts`).
const CHECK_STATEMENT: &str = "SELECT t.id, t.name, t.nodes, t.status, t.err, t.created_at, t.updated_at, t.started_at, t.ended_at, h.id, h.task_id, h.host, h.result, h.ok, h.changed, h.failed, h.unreachable, h.skipped, h.rescued, h.ignored, h.msg, h.correlation_id, h.source, h.created_at, h.ended_at FROM tasks t LEFT JOIN task_hosts h ON h.task_id = t.id WHERE t.id = $1 AND t.name = 'p5-checked' ORDER BY h.id;\n";

/// `/api/check` requests answered per second with this body, 16 callers for `secs` seconds;
/// every answer must be as long as the first.
fn check_rate(s: &Subject, body: &serde_json::Value, secs: u64) -> f64 {
    let first = s.server.post(&client(), "/api/check", body);
    assert!(first.starts_with(r#"{"code":"#), "{first}");
    let done = AtomicUsize::new(0);
    let until = Instant::now() + Duration::from_secs(secs);
    let wall = in_parallel(16, 16, |_| {
        let agent = client();
        let mut n = 0;
        while Instant::now() < until {
            let text = s.server.post(&agent, "/api/check", body);
            assert_eq!(text.len(), first.len(), "{text}");
            n += 1;
        }
        done.fetch_add(n, Ordering::Relaxed);
    });
    done.load(Ordering::Relaxed) as f64 / wall
}

/// Transactions per second of `pgbench ARGS` with 16 clients on 2 threads for `secs` seconds.
fn pgbench(url: &str, args: &[&str], secs: u64) -> f64 {
    let run = Command::new("pgbench")
        .args(args)
        .args(["-n", "-c", "16", "-j", "2", "-T", &secs.to_string(), url])
        .output()
        .expect("pgbench runs (apt-get install postgresql-contrib)");
    let text = String::from_utf8_lossy(&run.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "pgbench said: {text}{}",
                String::from_utf8_lossy(&run.stderr)
            )
        })
}

/// P6: `tasks` stand-ins each writing `events` at once; stored events per second.
fn p6(b: &Bench, db: Db, tasks: usize, events: usize) {
    let name = match db {
        Db::Postgres => "p6-postgres",
        Db::Sqlite => "p6-sqlite",
    };
    let s = b.server(
        name,
        db,
        &[
            ("max_forks", tasks.to_string()),
            ("max_events_per_task", (events + 10).to_string()),
        ],
    );
    let before = s.count("SELECT count(*) FROM task_events");
    let ids = Mutex::new(Vec::with_capacity(tasks));
    in_parallel(tasks, 16, |i| {
        thread_local!(static AGENT: ureq::Agent = client());
        let id = AGENT.with(|a| {
            s.run(
                a,
                &format!("{name}-{i}"),
                json!({"standin_events": events}),
                1,
            )
        });
        ids.lock().expect("ids").push(id);
    });
    let ids = ids.into_inner().expect("ids");
    let expected = before + (tasks * (events + 1)) as i64;
    // A task's end is written after its last event: the moment the last task ended bounds the
    // moment the last event was stored (cheaper to poll than counting events).
    s.wait_ended(&ids, Duration::from_secs(600));
    let stored_at = unix_ns();
    let stored = s.count("SELECT count(*) FROM task_events");
    assert_eq!(stored, expected, "events stored");
    let first = ids
        .iter()
        .filter_map(|id| s.started(*id))
        .min()
        .expect("stand-ins started");
    let secs = (stored_at - first) as f64 / 1e9;
    let n = (tasks * (events + 1)) as f64;
    let target = if db == Db::Postgres { 50_000 } else { 20_000 };
    let label = if db == Db::Postgres {
        "postgres"
    } else {
        "sqlite"
    };
    println!(
        "P6 {label} events_per_sec={:.0} ({tasks} stand-ins x {} events stored in {secs:.2} s from the first stand-in's start; target >= {target})",
        n / secs,
        events + 1,
    );
}

/// W5000: one task of `nodes` distinct nodes whose stand-in writes `per_host` events for each, then
/// the stats of every node, and exits. The server's RSS growth (sampled from `/proc` against the
/// idle server), the time from the stand-in's exit (its own clock, written just before it exits)
/// to the row's final status read by `psql`, and `/api/check` of that task while it runs and
/// after (its `log` holds every node).
fn w5000(b: &Bench, nodes: usize, per_host: usize) {
    let s = b.server(
        "w5000",
        Db::Postgres,
        &[("max_events_per_task", (nodes * per_host + 10).to_string())],
    );
    std::thread::sleep(Duration::from_secs(1));
    let (idle_kib, _, _) = s.footprint();
    let all: Vec<String> = (0..nodes)
        .map(|i| format!("127.2.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let agent = client();
    let body = json!({"nodes": all, "user": "root", "name": "w5000", "tasks": PLAYBOOK,
        "params": {"standin_events": per_host, "standin_every_host": true, "standin_sleep": 3},
        "fork_num": 50});
    let text = s.server.post(&agent, "/api/run", &body);
    let answer: Value = serde_json::from_str(&text).expect("JSON answer");
    let id = answer["content"]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("run w5000: {text}"));
    let check_body = json!({"id": id, "name": "w5000"});
    let ended = std::sync::atomic::AtomicBool::new(false);
    let (peak_kib, (ms, hosts)) = std::thread::scope(|scope| {
        let memory = scope.spawn(|| {
            let mut peak = 0;
            while !ended.load(Ordering::SeqCst) {
                peak = peak.max(s.footprint().0);
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        let prober = scope.spawn(|| {
            let agent = client();
            let (mut ms, mut after, mut hosts) = (Vec::new(), 0, 0);
            // While it runs, then 200 more once it has ended.
            while after < 200 {
                let t = Instant::now();
                let text = s.server.post(&agent, "/api/check", &check_body);
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                if ended.load(Ordering::SeqCst) {
                    after += 1;
                    let v: Value = serde_json::from_str(&text).expect("check answers JSON");
                    hosts = v["content"]["log"]
                        .as_str()
                        .and_then(|l| serde_json::from_str::<Vec<Value>>(l).ok())
                        .map_or(0, |l| l.len());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ms, hosts)
        });
        let exited_file = s.run_dir.join(id.to_string()).join("standin-exited");
        let deadline = Instant::now() + Duration::from_secs(600);
        let exited: u128 = loop {
            if let Some(at) = std::fs::read_to_string(&exited_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break at;
            }
            assert!(Instant::now() < deadline, "the stand-in did not exit");
            std::thread::sleep(Duration::from_millis(5));
        };
        while s.count(&format!("SELECT status FROM tasks WHERE id = {id}")) < 3 {
            assert!(Instant::now() < deadline, "task {id} did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
        let final_ms = unix_ns().saturating_sub(exited) as f64 / 1e6;
        ended.store(true, Ordering::SeqCst);
        let peak = memory.join().expect("memory sampler");
        let (ms, hosts) = prober.join().expect("prober");
        (peak, (ms, (hosts, final_ms)))
    });
    let (hosts, final_ms) = hosts;
    assert_eq!(
        s.count(&format!("SELECT status FROM tasks WHERE id = {id}")),
        4
    );
    let ok_rows = s.count(&format!(
        "SELECT count(*) FROM task_hosts WHERE task_id = {id} AND ok = {per_host}"
    ));
    assert_eq!(
        (ok_rows as usize, hosts),
        (nodes, nodes),
        "every node's result"
    );
    let mut sorted = ms;
    sorted.sort_by(f64::total_cmp);
    println!(
        "W{nodes} rss_growth={:.1}MB exit_to_final_row={final_ms:.0}ms check_p99={:.1}ms ({nodes} nodes x {per_host} events, stand-in, PostgreSQL: RSS {:.1} MB idle, {:.1} MB at the peak; /api/check of that task p50 {:.1} ms, max {:.1} ms over {} requests, its log holding {hosts} hosts; targets exit_to_final_row <= 1000 ms, check p99 <= 100 ms)",
        peak_kib.saturating_sub(idle_kib) as f64 / 1024.0,
        percentile(&sorted, 0.99),
        idle_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        percentile(&sorted, 0.5),
        sorted.last().copied().unwrap_or(f64::NAN),
        sorted.len(),
    );
}

/// R7: `n` short tasks through `/api/parallel_run`, 8 at a time; footprint drift.
fn r7(b: &Bench, n: usize) {
    let s = b.server("r7", Db::Postgres, &[]);
    let task = |name: String| {
        thread_local!(static AGENT: ureq::Agent = client());
        let body = json!({"nodes": [NODE], "user": "root", "name": name,
            "tasks": PLAYBOOK, "params": {}, "fork_num": 1});
        let text = AGENT.with(|a| s.server.post(a, "/api/parallel_run", &body));
        assert!(text.contains("reuslt = ok"), "{text}");
    };
    // A warm-up, not counted: the first thousands of tasks touch code pages and allocator arenas
    // for the first time (RSS rose 1.5 MB over them), which is not drift.
    let warm = (n / 50).min(2000);
    in_parallel(warm, 8, |i| task(format!("r7-warm-{i}")));
    let done = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::new());
    let every = (n / 100).max(1);
    let t = in_parallel(n, 8, |i| {
        task(format!("r7-{i}"));
        if done.fetch_add(1, Ordering::Relaxed).is_multiple_of(every) {
            samples.lock().expect("samples").push(s.footprint());
        }
    });
    let samples = samples.into_inner().expect("samples");
    let tenth = (samples.len() / 10).max(1);
    let mean = |part: &[(u64, usize, u64)], f: &dyn Fn(&(u64, usize, u64)) -> f64| {
        part.iter().map(f).sum::<f64>() / part.len() as f64
    };
    let (head, tail) = (&samples[..tenth], &samples[samples.len() - tenth..]);
    let drift = |f: &dyn Fn(&(u64, usize, u64)) -> f64| {
        let (a, z) = (mean(head, f), mean(tail, f));
        ((z - a) / a * 100.0, a, z)
    };
    let (rss, rss_a, rss_z) = drift(&|x| x.0 as f64 / 1024.0);
    let (fds, fds_a, fds_z) = drift(&|x| x.1 as f64);
    let (thr, thr_a, thr_z) = drift(&|x| x.2 as f64);
    println!(
        "R7 rss={rss:+.1}% fds={fds:+.1}% threads={thr:+.1}% ({n} tasks in {t:.0} s after {warm} not counted, {:.0} tasks/s; first 10 % / last 10 % of {} samples: RSS {rss_a:.1} / {rss_z:.1} MB, fds {fds_a:.0} / {fds_z:.0}, threads {thr_a:.1} / {thr_z:.1}; target each within 5 %)",
        n as f64 / t,
        samples.len(),
    );
}

fn main() {
    let me = std::env::args().next().unwrap_or_default();
    if Path::new(&me).file_name().is_some_and(|n| n == STANDIN) {
        standin();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let picked: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| a.starts_with('P') || a.starts_with('R') || a.starts_with('W'))
        .collect();
    const FIGURES: [&str; 6] = ["P3", "P4", "P5", "P6", "W5000", "R7"];
    if let Some(unknown) = picked.iter().find(|a| !FIGURES.contains(a)) {
        panic!("unknown figure {unknown}: one of {FIGURES:?}");
    }
    let wanted = |f: &str| picked.is_empty() || picked.contains(&f);
    let b = Bench::new();
    let scale: HashMap<&str, usize> = if quick {
        [
            ("p3s", 2),
            ("p4r", 50),
            ("p4p", 200),
            ("p5", 2),
            ("p6t", 20),
            ("p6e", 200),
            ("r7", 300),
            ("w", 300),
        ]
    } else {
        [
            ("p3s", 30),
            ("p4r", 2000),
            ("p4p", 8000),
            ("p5", 6),
            ("p6t", 200),
            ("p6e", 2500),
            ("r7", 100_000),
            ("w", 5000),
        ]
    }
    .into_iter()
    .collect();
    if wanted("P3") {
        p3(&b, 200, scale["p3s"] as u32);
    }
    if wanted("P4") {
        p4(&b, scale["p4r"], scale["p4p"]);
    }
    if wanted("P5") {
        p5(&b, scale["p5"] as u64);
    }
    if wanted("P6") {
        p6(&b, Db::Postgres, scale["p6t"], scale["p6e"]);
        p6(&b, Db::Sqlite, scale["p6t"], scale["p6e"]);
    }
    if wanted("W5000") {
        w5000(&b, scale["w"], 10);
    }
    if wanted("R7") {
        // DLBENCH_R7_TASKS: another count, for a shorter look at the trend.
        let n = std::env::var("DLBENCH_R7_TASKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(scale["r7"]);
        r7(&b, n);
    }
}
