//! Chaos: the agent is killed with SIGKILL at random moments while real tasks stream in, and
//! started again at once. Every task the database holds (acknowledged or not) must end with a
//! final status, none may run twice, and every success must have run exactly once. The oracle is
//! outside: each task's playbook appends its name to a ledger file on its node (the sshd test
//! hosts run on this machine), and the rows are read with plain SQL.
//!
//! The moments come from a seed printed with every failure; `DLTEST_CHAOS_SEED` replays one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::both_backends;
use crate::harness::{
    figure, run_body, test_settings, wait_until, Backend, BinServer, DbView, TaskRow, TempDir,
    TestDb, HOSTS,
};

both_backends!(kill_9_at_random_moments_loses_no_task_and_runs_none_twice);

/// Kills of the agent, and the longest pause between two.
const KILLS: usize = 5;
const MAX_GAP_MS: u64 = 2500;

/// A small xorshift generator: the kill moments, reproducible from the seed.
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Posts a task every 300 ms to whichever agent runs now, until `streaming` is cleared; the ids
/// whose answer came back (a post into a dying agent may get none).
fn stream(base: Arc<Mutex<String>>, streaming: Arc<AtomicBool>, ledger: &Path) -> Vec<i64> {
    let mut acknowledged = Vec::new();
    let mut n = 0usize;
    while streaming.load(Ordering::SeqCst) {
        n += 1;
        let name = format!("chaos-{n}");
        // Some end at once, some are mid-run at a kill.
        let tasks = format!(
            "- shell: sleep {} && echo {name} >> {}\n",
            n % 3,
            ledger.display()
        );
        let mut body = run_body(&name, &[HOSTS[n % HOSTS.len()]], &tasks);
        body["fork_num"] = json!(1);
        let url = format!("{}/api/run", base.lock().expect("base").clone());
        // An agent killed mid-request answers nothing: that task is not acknowledged.
        let answer = ureq::post(&url)
            .timeout(Duration::from_secs(30))
            .set("X-CORRELATION-ID", "1-1")
            .set("X-RESOURCE", "chaos")
            .send_string(&body.to_string())
            .ok()
            .and_then(|res| res.into_json::<Value>().ok());
        if let Some(id) = answer.and_then(|v| v["content"]["id"].as_i64()) {
            acknowledged.push(id);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    acknowledged
}

fn kill_9_at_random_moments_loses_no_task_and_runs_none_twice(backend: Backend) {
    let seed: u64 = std::env::var("DLTEST_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    let dir = TempDir::new();
    let db = TestDb::new(backend, &dir.0);
    let view = DbView::open(&db.url);
    let mut settings = test_settings(&dir.0);
    settings.database_url = db.url.clone();
    settings.max_forks = 6;
    let ledger = dir.0.join("ran.log");
    let mut server = BinServer::start(&settings, &dir.0);
    let base = Arc::new(Mutex::new(server.base.clone()));
    let streaming = Arc::new(AtomicBool::new(true));
    let client = {
        let (base, streaming, ledger) = (base.clone(), streaming.clone(), ledger.clone());
        std::thread::spawn(move || stream(base, streaming, &ledger))
    };
    let mut moments = Moments(seed);
    let started = Instant::now();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(300 + moments.next_ms(MAX_GAP_MS)));
        server.signal(nix::sys::signal::Signal::SIGKILL);
        server.wait_exit(10);
        server = BinServer::start(&settings, &dir.0);
        *base.lock().expect("base") = server.base.clone();
    }
    std::thread::sleep(Duration::from_secs(1));
    streaming.store(false, Ordering::SeqCst);
    let acknowledged = client.join().expect("the client thread");
    let streamed = started.elapsed();
    wait_until(&format!("every task ends (seed {seed})"), 240, || {
        view.rows().iter().all(|r| r.status > 2)
    });
    let all = view.rows();
    let ran: HashMap<String, usize> = std::fs::read_to_string(&ledger)
        .unwrap_or_default()
        .lines()
        .fold(HashMap::new(), |mut m, l| {
            *m.entry(l.to_owned()).or_default() += 1;
            m
        });
    let by_id: HashMap<i64, &TaskRow> = all.iter().map(|r| (r.id, r)).collect();
    for id in &acknowledged {
        assert!(
            by_id.contains_key(id),
            "acknowledged task {id} has no row (seed {seed})"
        );
    }
    for r in &all {
        let times = ran.get(&r.name).copied().unwrap_or(0);
        assert!(times <= 1, "{r:?} ran {times} times (seed {seed})");
        match r.status {
            4 => assert_eq!(times, 1, "{r:?} succeeded without running (seed {seed})"),
            // Interrupted: the kill cut it before its run could be known; it says why.
            7 => assert!(r.err.is_some(), "{r:?} (seed {seed})"),
            _ => panic!("{r:?} ended neither successfully nor interrupted (seed {seed})"),
        }
    }
    // Nothing ran that the database does not hold.
    let names: std::collections::HashSet<&str> = all.iter().map(|r| r.name.as_str()).collect();
    for name in ran.keys() {
        assert!(names.contains(name.as_str()), "{name} ran without a row");
    }
    let interrupted = all.iter().filter(|r| r.status == 7).count();
    let twice = ran.values().filter(|&&n| n > 1).count();
    assert!(
        acknowledged.len() >= 10,
        "only {} tasks were acknowledged in {streamed:?}",
        acknowledged.len()
    );
    figure(
        &format!(
            "chaos ({backend:?}): kills / tasks acknowledged / rows / interrupted / ran twice"
        ),
        format!(
            "{KILLS} / {} / {} / {interrupted} / {twice} (seed {seed}, {:.0} s of streaming)",
            acknowledged.len(),
            all.len(),
            streamed.as_secs_f64()
        ),
    );
}
