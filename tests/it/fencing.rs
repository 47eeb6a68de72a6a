//! Fencing: once any agent has recorded a task as interrupted (7), nothing of it runs anywhere.
//! Two agents share a queue; the one running a task is frozen (SIGSTOP) or cut off from
//! PostgreSQL (its connections run through a cable the test cuts). The oracle is outside: the
//! row's status by plain SQL, sampled together with the task's processes on this machine (/proc)
//! and on its node (the sshd test host's processes): every sample that reads 7 sees nothing of
//! the task running, before and after.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::sql_types::{Integer, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl};
use serde_json::{json, Value};

use crate::harness::{
    figure, run_body, test_settings, wait_until, Backend, BinServer, DbView, TempDir, TestDb, HOSTS,
};

/// A TCP cable between an agent and PostgreSQL that the test can cut and mend.
struct Cable {
    port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Cable {
    fn to(upstream: String) -> Cable {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cable port");
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    client.shutdown(Shutdown::Both).ok();
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut held = o.lock().unwrap();
                for s in [&client, &server] {
                    held.push(s.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        to.shutdown(Shutdown::Both).ok();
                    });
                }
            }
        });
        Cable { port, cut, open }
    }

    /// Every connection through it ends, and new ones are refused, until mended.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            s.shutdown(Shutdown::Both).ok();
        }
    }

    fn mend(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Integer)]
    status: i32,
    #[diesel(sql_type = Nullable<Text>)]
    err: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    agent: Option<String>,
}

fn row(view: &DbView, id: i64) -> Row {
    view.read(|c| {
        Ok(diesel::sql_query(format!(
            "SELECT status, err, agent FROM tasks WHERE id = {id}"
        ))
        .load::<Row>(c)?)
    })
    .pop()
    .unwrap_or_else(|| panic!("task {id} has no row"))
}

/// Agent `n`: two forks, a heartbeat a second, lost after 3 + 4 s (fencing at 5 s, the task's
/// watchdog at 6 s: `Settings::fence_after`, `Settings::watchdog_after`).
fn agent(dir: &TempDir, db_url: &str, n: usize) -> downlink::settings::Settings {
    let mut s = test_settings(&dir.0.join(format!("agent-{n}")));
    std::fs::create_dir_all(&s.run_dir).unwrap();
    s.database_url = db_url.to_owned();
    s.shared_queue = true;
    s.max_forks = 2;
    s.heartbeat_secs = 1;
    s.lost_agent_grace_secs = 4;
    s.db_retry_secs = 120;
    s
}

fn run(server: &BinServer, name: &str, host: &str, tasks: &str) -> i64 {
    let mut body = run_body(name, &[host], tasks);
    body["fork_num"] = json!(1);
    let (_, text) = server.post("/api/run", &body.to_string());
    let answer: Value = serde_json::from_str(&text).unwrap();
    answer["content"]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("run refused: {answer}"))
}

/// What the samples saw: when the task's last process (here or on the node) was gone and when
/// its row first read 7, both from the start of the outage.
struct Seen {
    /// Nothing of it here (its processes on this machine).
    here_gone: Duration,
    gone: Duration,
    seven: Duration,
}

/// Samples (row, then processes) until the row has read 7 for two seconds; fails at once if a
/// sample reads 7 while something of the task still runs.
fn watch(view: &DbView, id: i64, run_dir: &Path, token: &str, since: Instant, secs: u64) -> Seen {
    let deadline = since + Duration::from_secs(secs);
    let (mut here_gone, mut gone, mut seven) = (None, None, None);
    loop {
        let status = row(view, id).status;
        let here = crate::procwatch::of_task(run_dir);
        let there = crate::procwatch::with_token(token);
        let now = since.elapsed();
        if here.is_empty() {
            here_gone.get_or_insert(now);
        } else {
            here_gone = None;
        }
        if here.is_empty() && there.is_empty() {
            gone.get_or_insert(now);
        } else {
            gone = None;
        }
        if status == 7 {
            assert!(
                here.is_empty() && there.is_empty(),
                "task {id} reads 7 at {now:?} while it runs: here {here:?}, on its node {there:?}"
            );
            let at = *seven.get_or_insert(now);
            if now > at + Duration::from_secs(2) {
                break;
            }
        } else {
            assert_eq!(status, 2, "task {id} runs until it is declared lost");
        }
        assert!(
            Instant::now() < deadline,
            "task {id} not ended 7 within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Seen {
        here_gone: here_gone.expect("gone here before 7"),
        gone: gone.expect("gone before 7"),
        seven: seven.expect("seven"),
    }
}

#[test]
fn a_frozen_agent_runs_nothing_of_a_task_once_another_agent_has_ended_it() {
    let dir = TempDir::new();
    let db = TestDb::new(Backend::Postgres, &dir.0);
    let view = DbView::open(&db.url);
    let (a_settings, b_settings) = (agent(&dir, &db.url, 0), agent(&dir, &db.url, 1));
    let a = BinServer::start(&a_settings, &dir.0);
    let long = run(&a, "long", HOSTS[0], "- command: sleep 6771\n");
    let run_dir = a_settings
        .run_dir
        .join(&a_settings.agent_name)
        .join(long.to_string());
    wait_until("the task runs on its node", 30, || {
        !crate::procwatch::with_token("sleep 6771").is_empty()
    });
    let b = BinServer::start(&b_settings, &dir.0);
    a.signal(nix::sys::signal::Signal::SIGSTOP);
    let frozen = Instant::now();
    let seen = watch(&view, long, &run_dir, "sleep 6771", frozen, 30);
    figure(
        "fencing, SIGSTOP: gone here / gone everywhere / row 7, after the freeze (watchdog 6 s, lost 7 s)",
        format!(
            "{:.1} s / {:.1} s / {:.1} s",
            seen.here_gone.as_secs_f64(),
            seen.gone.as_secs_f64(),
            seen.seven.as_secs_f64()
        ),
    );
    // Here it ended by itself (the frozen agent could not end it): before the node's cleanup.
    assert!(
        seen.here_gone + Duration::from_millis(500) < seen.seven,
        "the task's own watchdog ended it here first"
    );
    let ended = row(&view, long);
    let err = ended.err.unwrap_or_default();
    assert!(
        err.contains(&format!("agent {} was lost", a_settings.agent_name))
            && err.contains("its nodes were cleaned first"),
        "{err}"
    );
    assert_eq!(ended.agent.as_deref(), Some(a_settings.agent_name.as_str()));
    // Thawed: it finds its task ended elsewhere, records nothing over it, and serves again.
    a.signal(nix::sys::signal::Signal::SIGCONT);
    let after = run(&a, "after-thaw", HOSTS[1], "- ping:\n");
    wait_until("a task through the thawed agent ends", 60, || {
        row(&view, after).status == 4
    });
    let again = row(&view, long);
    assert_eq!((again.status, again.err.unwrap_or_default()), (7, err));
    assert!(crate::procwatch::of_task(&run_dir).is_empty());
    drop(b);
}

#[test]
fn an_agent_cut_off_from_postgres_stops_its_own_tasks_before_they_are_declared_lost() {
    let dir = TempDir::new();
    let db = TestDb::new(Backend::Postgres, &dir.0);
    let view = DbView::open(&db.url);
    // Agent a reaches PostgreSQL through the cable; b directly.
    let (rest, pg) = db.url.rsplit_once('@').expect("user@host in the URL");
    let (hostport, name) = pg.split_once('/').expect("host/db");
    let cable = Cable::to(hostport.to_owned());
    let a_url = format!("{rest}@127.0.0.1:{}/{name}", cable.port);
    let (a_settings, b_settings) = (agent(&dir, &a_url, 0), agent(&dir, &db.url, 1));
    let a = BinServer::start(&a_settings, &dir.0);
    let long = run(&a, "long", HOSTS[0], "- command: sleep 6782\n");
    let run_dir = a_settings
        .run_dir
        .join(&a_settings.agent_name)
        .join(long.to_string());
    wait_until("the task runs on its node through agent a", 30, || {
        row(&view, long).agent.as_deref() == Some(a_settings.agent_name.as_str())
            && !crate::procwatch::with_token("sleep 6782").is_empty()
    });
    // Started once a runs the task: b shares the queue and could have claimed it first.
    let b = BinServer::start(&b_settings, &dir.0);
    cable.cut();
    let cut = Instant::now();
    let seen = watch(&view, long, &run_dir, "sleep 6782", cut, 30);
    figure(
        "fencing, cut off from PostgreSQL: task gone / row 7, after the cut (fence 5 s, lost 7 s)",
        format!(
            "{:.1} s / {:.1} s",
            seen.gone.as_secs_f64(),
            seen.seven.as_secs_f64()
        ),
    );
    assert!(
        seen.gone < seen.seven,
        "stopped before it was declared lost"
    );
    // The agent said what it did, in its own log, while it could not write.
    let fenced = a.log_lines().iter().any(|l| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.contains("stopping its tasks before other agents declare them lost"))
    });
    assert!(fenced, "agent a fenced itself");
    // Mended: its end finds the row ended already (nothing recorded over it); it serves again.
    cable.mend();
    let after = run(&a, "after-mend", HOSTS[1], "- ping:\n");
    wait_until("a task through the mended agent ends", 60, || {
        row(&view, after).status == 4
    });
    assert_eq!(row(&view, long).status, 7);
    drop(b);
}
