//! A database failover under three agents: a PostgreSQL primary and a synchronous streaming
//! standby of its own (initdb, pg_basebackup, ports of their own, so the shared test cluster is
//! untouched), agents whose URL names both hosts with `target_session_attrs=read-write`; the
//! primary is killed and the standby promoted while tasks run.

#[path = "it/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "it/procwatch.rs"]
#[allow(dead_code)]
mod procwatch;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{figure, run_body, test_settings, BinServer, DbView, TempDir, HOSTS};
use serde_json::{json, Value};

const BIN: &str = "/usr/lib/postgresql/15/bin";
const PRIMARY_PORT: u16 = 5441;
const STANDBY_PORT: u16 = 5442;

/// Runs a PostgreSQL program as the `postgres` user; its standard output.
fn as_postgres(program: &str, args: &[&str]) -> String {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{BIN}/{program}")])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("runuser {program}: {e} (the test runs as root, with PostgreSQL 15 installed)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn psql(port: u16, sql: &str) -> String {
    as_postgres(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-tAc",
            sql,
        ],
    )
}

/// Two PostgreSQL servers in a directory of their own, stopped when dropped.
struct Pair {
    dir: PathBuf,
}

impl Pair {
    fn data(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn start(base: &Path) -> Pair {
        let dir = base.join("pg");
        std::fs::create_dir_all(&dir).unwrap();
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        let pair = Pair { dir };
        // Leftovers of an earlier run of this test on these ports.
        for port in [PRIMARY_PORT, STANDBY_PORT] {
            let _ = Command::new("fuser")
                .args(["-k", &format!("{port}/tcp")])
                .output();
        }
        let primary = pair.data("primary");
        as_postgres(
            "initdb",
            &["-D", &primary, "-U", "postgres", "--auth=trust", "-N"],
        );
        let conf = format!(
            "port = {PRIMARY_PORT}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 5\nsynchronous_commit = on\nhot_standby = on\n",
            pair.dir.display()
        );
        append(&format!("{primary}/postgresql.conf"), &conf);
        append(
            &format!("{primary}/pg_hba.conf"),
            "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
        );
        let log = pair.data("primary.log");
        as_postgres("pg_ctl", &["-D", &primary, "-l", &log, "-w", "start"]);
        psql(PRIMARY_PORT, "CREATE ROLE dl LOGIN PASSWORD 'dl'");
        psql(PRIMARY_PORT, "CREATE DATABASE dl OWNER dl");
        let standby = pair.data("standby");
        as_postgres(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &PRIMARY_PORT.to_string(),
                "-U",
                "postgres",
                "-D",
                &standby,
                "-R",
                "-X",
                "stream",
                // Not a spread checkpoint: the default waits out most of checkpoint_timeout.
                "-c",
                "fast",
            ],
        );
        append(
            &format!("{standby}/postgresql.auto.conf"),
            &format!(
                "port = {STANDBY_PORT}\nprimary_conninfo = 'host=127.0.0.1 port={PRIMARY_PORT} user=postgres application_name=standby1'\n"
            ),
        );
        let log = pair.data("standby.log");
        as_postgres("pg_ctl", &["-D", &standby, "-l", &log, "-w", "start"]);
        // Synchronous once the standby streams (before, every commit would wait for it).
        psql(
            PRIMARY_PORT,
            "ALTER SYSTEM SET synchronous_standby_names = 'standby1'",
        );
        psql(PRIMARY_PORT, "SELECT pg_reload_conf()");
        let deadline = Instant::now() + Duration::from_secs(30);
        while psql(PRIMARY_PORT, "SELECT sync_state FROM pg_stat_replication").trim() != "sync" {
            assert!(
                Instant::now() < deadline,
                "the standby did not become synchronous"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pair
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for name in ["primary", "standby"] {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--", &format!("{BIN}/pg_ctl")])
                .args(["-D", &self.data(name), "-m", "immediate", "stop"])
                .output();
        }
    }
}

fn append(path: &str, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Three agents run twelve tasks; the primary is killed (immediate: no shutdown checkpoint, as a
/// crash) and the standby promoted while six of them run. Every task the agents acknowledged —
/// before, during and after the failover — reaches its true end, once; the agents say in their
/// log that they reached the database again; the outage a client saw is measured.
#[test]
fn a_failover_to_the_synchronous_standby_loses_nothing_acknowledged() {
    let dir = TempDir::new();
    let pair = Pair::start(&dir.0);
    let url = format!(
        "postgres://dl:dl@127.0.0.1:{PRIMARY_PORT},127.0.0.1:{STANDBY_PORT}/dl?target_session_attrs=read-write&connect_timeout=2"
    );
    let agents: Vec<BinServer> = (0..3)
        .map(|n| {
            let mut s = test_settings(&dir.0.join(format!("agent-{n}")));
            std::fs::create_dir_all(&s.run_dir).unwrap();
            s.database_url = url.clone();
            s.shared_queue = true;
            s.max_forks = 2;
            s.heartbeat_secs = 1;
            BinServer::start(&s, &dir.0)
        })
        .collect();
    let mut acknowledged: Vec<(i64, String)> = Vec::new();
    let submit = |i: usize, name: &str| -> Option<i64> {
        let mut body = run_body(name, &[HOSTS[i % 3]], "- command: sleep 3\n");
        body["fork_num"] = json!(1);
        let (status, text) = agents[i % 3].post("/api/run", &body.to_string());
        let v: Value = serde_json::from_str(&text).ok()?;
        (status == 200 && v["code"] == json!(0))
            .then(|| v["content"]["id"].as_i64())
            .flatten()
    };
    for i in 0..12 {
        let name = format!("before-{i}");
        let id = submit(i, &name).expect("accepted before the failover");
        acknowledged.push((id, name));
    }
    let view = DbView::open(&url);
    let deadline = Instant::now() + Duration::from_secs(60);
    while view.read(|c| {
        use diesel::prelude::*;
        use downlink::store::schema::tasks;
        Ok(tasks::table
            .filter(tasks::status.eq(2))
            .count()
            .get_result::<i64>(c)?)
    }) < 6
    {
        assert!(Instant::now() < deadline, "six tasks did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(view);

    // The failover: the primary killed, the standby promoted a second later (as a failover
    // manager would), while a client checks a task every 100 ms and submits a task every second.
    let (first_id, first_name) = acknowledged[0].clone();
    let check = json!({"id": first_id, "name": first_name}).to_string();
    let killed = Instant::now();
    let (promoted, (checks, during_acks, refused)) = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            // (since the kill, how long the call took, answered well)
            let mut checks: Vec<(Duration, Duration, bool)> = Vec::new();
            let (mut acks, mut refused, mut during) = (Vec::new(), 0, 0);
            while killed.elapsed() < Duration::from_secs(10) {
                let t = killed.elapsed();
                let call = Instant::now();
                let (_, text) = agents[1].post("/api/check", &check);
                let ok = serde_json::from_str::<Value>(&text).is_ok_and(|v| v["code"] == json!(0));
                checks.push((t, call.elapsed(), ok));
                if checks.len() % 10 == 1 {
                    let name = format!("during-{during}");
                    match submit(during, &name) {
                        Some(id) => acks.push((id, name)),
                        None => refused += 1,
                    }
                    during += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (checks, acks, refused)
        });
        as_postgres(
            "pg_ctl",
            &["-D", &pair.data("primary"), "-m", "immediate", "stop"],
        );
        std::thread::sleep(Duration::from_secs(1));
        as_postgres("pg_ctl", &["-D", &pair.data("standby"), "-w", "promote"]);
        let promoted = killed.elapsed();
        (promoted, client.join().expect("the client thread"))
    });
    acknowledged.extend(during_acks);
    for i in 0..3 {
        let name = format!("after-{i}");
        let id = submit(i, &name).expect("accepted after the failover");
        acknowledged.push((id, name));
    }

    // Everything acknowledged reaches its true end on the new primary, once.
    let view = DbView::open(&format!("postgres://dl:dl@127.0.0.1:{STANDBY_PORT}/dl"));
    let deadline = Instant::now() + Duration::from_secs(240);
    #[derive(diesel::QueryableByName, Debug)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        status: i32,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        starts: i64,
    }
    let rows = loop {
        let rows: Vec<Row> = view.read(|c| {
            use diesel::RunQueryDsl;
            Ok(diesel::sql_query(
                "SELECT t.id, t.name, t.status, (SELECT count(*) FROM task_events e \
                 WHERE e.task_id = t.id AND e.kind = 'playbook_start') AS starts FROM tasks t ORDER BY t.id",
            )
            .load(c)?)
        });
        let all_ended = acknowledged
            .iter()
            .all(|(id, _)| rows.iter().any(|r| r.id == *id && r.status >= 3));
        if all_ended {
            figure(
                "failover: every acknowledged task ended, after the kill",
                format!("{} s", killed.elapsed().as_secs()),
            );
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "not every acknowledged task ended: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for (id, name) in &acknowledged {
        let r = rows
            .iter()
            .find(|r| r.id == *id)
            .unwrap_or_else(|| panic!("task {id} lost"));
        assert_eq!(&r.name, name);
        assert_eq!(r.status, 4, "{r:?}");
        assert_eq!(r.starts, 1, "{r:?} ran {} times", r.starts);
    }
    // Each agent says it reached the database again.
    for (n, agent) in agents.iter().enumerate() {
        let said = agent.log_lines().iter().any(|l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.contains("reachable again") || m.contains("wake-ups again"))
        });
        assert!(said, "agent {n} never logged its reconnection");
    }
    let failed: Vec<&(Duration, Duration, bool)> = checks.iter().filter(|c| !c.2).collect();
    let slowest = checks.iter().map(|c| c.1).max().unwrap_or_default();
    figure(
        "failover: primary killed, standby promoted 1 s later (pg_ctl promote -w returned)",
        format!("{} ms", promoted.as_millis()),
    );
    let failures = match (failed.first(), failed.last()) {
        (Some(a), Some(b)) => format!("from {} ms to {} ms", a.0.as_millis(), b.0.as_millis()),
        _ => "none".into(),
    };
    let during_ok = acknowledged
        .iter()
        .filter(|(_, n)| n.starts_with("during"))
        .count();
    figure(
        "failover: what a client saw through an agent in the 10 s after the kill",
        format!(
            "{} /api/check every 100 ms, {} failed ({failures}), slowest {} ms; /api/run: {during_ok} acknowledged, {refused} refused",
            checks.len(),
            failed.len(),
            slowest.as_millis(),
        ),
    );
}
