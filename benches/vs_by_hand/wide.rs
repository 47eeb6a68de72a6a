//! W300, W1000: one wide task of N distinct SSH nodes against ansible-playbook by hand at the same
//! forks. One sshd bound to `0.0.0.0:PORT` (`DLTEST_WIDE_PORT`) answers for every `127.1.x.y`,
//! so each node is a distinct host to ansible and to ssh. Observed from outside: the wall time
//! (POST → final status read through `/api/check`; the process's own wall by hand), the peak
//! number of local `ssh` processes on the machine (sampled from `/proc` every 50 ms), and the
//! latency of `/api/check` of another task, asked over and over while the wide task runs.
//! Targets: wall ≤ 1.00, peak ssh ≤ by hand, check p99 ≤ 50 ms.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{Cg, Downlink};
use crate::{ByHand, Setup, PLAYBOOK};

/// Forks on both sides: ansible's and downlink's default `max_forks`.
const FORKS: usize = 50;

/// N distinct node addresses, 127.1.0.1 onwards.
fn nodes(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("127.1.{}.{}", i / 250, i % 250 + 1))
        .collect()
}

/// Local ssh client processes on the whole machine (masters and their clients; not sshd).
fn ssh_processes() -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == "ssh")
        })
        .count()
}

/// Runs `work` while sampling the machine's ssh processes; (what `work` returned, the peak).
fn with_ssh_peak<T>(work: impl FnOnce() -> T) -> (T, usize) {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(Ordering::SeqCst) {
                peak = peak.max(ssh_processes());
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        let out = work();
        done.store(true, Ordering::SeqCst);
        (out, sampler.join().expect("sampler"))
    })
}

/// A task: its id and name.
type Task = (i64, String);

fn check(server: &Downlink, agent: &ureq::Agent, task: &Task) -> Value {
    let text = server.post(agent, "/api/check", &json!({"id": task.0, "name": task.1}));
    serde_json::from_str(&text).expect("check answers JSON")
}

fn run(server: &Downlink, agent: &ureq::Agent, name: &str, nodes: &[String]) -> Task {
    let body = json!({"nodes": nodes, "user": "root", "name": name, "tasks": PLAYBOOK,
        "params": "", "fork_num": FORKS});
    let answer: Value =
        serde_json::from_str(&server.post(agent, "/api/run", &body)).expect("run answers JSON");
    let id = answer["content"]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no id: {answer}"));
    (id, name.to_owned())
}

/// Waits for the wide task's end on its event stream (whose closing line comes once the final
/// status is committed), then reads its check answer. Polling `/api/check` of a 1,000-host task
/// ten times a second, as [`wait_end`] does, cost the server 40 s of CPU in W1000: on a saturated
/// machine that CPU is taken from the task, and ansible by hand has no such caller.
fn wait_end_streamed(server: &Downlink, agent: &ureq::Agent, task: &Task) -> Value {
    use std::io::BufRead;
    let stream = agent
        .get(&format!(
            "{}/api/tasks/{}/events?after=0",
            server.base, task.0
        ))
        .timeout(Duration::from_secs(1800))
        .call()
        .expect("the event stream");
    let ended = std::io::BufReader::new(stream.into_reader())
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with(r#"{"type":"end""#));
    assert!(ended, "the stream of {task:?} closed without its end");
    let answer = check(server, agent, task);
    assert!(
        answer["content"]["status"].as_i64().is_some_and(|s| s > 2),
        "{answer}"
    );
    answer
}

/// Waits for the task's final status; the check answer that showed it.
fn wait_end(server: &Downlink, agent: &ureq::Agent, task: &Task) -> Value {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let answer = check(server, agent, task);
        if answer["content"]["status"].as_i64().is_some_and(|s| s > 2) {
            return answer;
        }
        assert!(
            answer["code"] == 0 && Instant::now() < deadline,
            "task {task:?} did not end: {answer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `/api/check` as the server timed it (its request histogram): answers over 32 ms, over 64 ms,
/// and all of them.
fn server_side_checks(server: &Downlink, agent: &ureq::Agent) -> (u64, u64, u64) {
    let text = agent
        .get(&format!("{}/metrics", server.base))
        .call()
        .expect("/metrics")
        .into_string()
        .expect("/metrics text");
    let bucket = |le: &str| -> u64 {
        text.lines()
            .find(|l| {
                l.starts_with("downlink_http_request_duration_seconds_bucket{")
                    && l.contains("/api/check")
                    && l.contains(&format!("le=\"{le}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let all = bucket("+Inf");
    (all - bucket("0.032"), all - bucket("0.064"), all)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// One figure: `n` nodes through downlink, then by hand.
pub fn figure(s: &Setup, port: &str, n: usize) {
    let all = nodes(n);
    let settings = [
        ("ansible_playbook", s.playbook_bin.clone()),
        ("ssh_private_key", s.key.clone()),
        ("ssh_port", port.to_owned()),
        ("ssh_common_args", s.common.clone()),
        ("ansible_python_interpreter", "/usr/bin/python3".into()),
        ("max_forks", FORKS.to_string()),
    ];
    let name = format!("w{n}-downlink");
    let server = Downlink::start(
        &s.dir.join(&name),
        Cg::new(s.bench_cg.join(&name)),
        &settings,
    );
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    // Another task, ended before the wide one starts: its check is what an orchestrator polls.
    let other = run(&server, &agent, "other", &nodes(1));
    wait_end(&server, &agent, &other);
    let running = AtomicBool::new(true);
    let ((wall, answer, latencies), dl_peak) = with_ssh_peak(|| {
        std::thread::scope(|scope| {
            let prober = scope.spawn(|| {
                let mut ms = Vec::new();
                while running.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    check(&server, &agent, &other);
                    ms.push(t.elapsed().as_secs_f64() * 1e3);
                    std::thread::sleep(Duration::from_millis(10));
                }
                ms
            });
            let t = Instant::now();
            let wide = run(&server, &agent, &format!("wide-{n}"), &all);
            let answer = wait_end_streamed(&server, &agent, &wide);
            let wall = t.elapsed().as_secs_f64();
            running.store(false, Ordering::SeqCst);
            (wall, answer, prober.join().expect("prober"))
        })
    });
    let log: Vec<Value> = answer["content"]["log"]
        .as_str()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let ok = log.iter().filter(|h| h["result"] == "ok").count();
    assert_eq!(
        (answer["content"]["status"].as_i64(), ok),
        (Some(4), n),
        "the wide task through downlink: {}",
        answer["content"]["err"]
    );
    let (over32, over64, checks) = server_side_checks(&server, &agent);
    let dl_cpu = server.cg.cpu_secs();
    let server_cpu = Cg(server.cg.0.join("server")).cpu_secs();
    drop(server);

    let hand = ByHand::new(s, &format!("w{n}-by-hand"), true, &all, port);
    let t = Instant::now();
    let ((), hand_peak) = with_ssh_peak(|| hand.run_forks(FORKS));
    let hand_wall = t.elapsed().as_secs_f64();
    let hand_cpu = hand.cg.cpu_secs();
    hand.cg.kill_all();

    let mut sorted = latencies;
    sorted.sort_by(f64::total_cmp);
    println!(
        "W{n} wall={:.2} ssh_peak={dl_peak}/{hand_peak} check_p99={:.1}ms ({n} distinct SSH nodes, ping, forks {FORKS}: downlink {wall:.1} s, by hand with pipelining {hand_wall:.1} s; peak local ssh processes downlink/by hand; /api/check of another task p50 {:.1} ms, p99, max {:.1} ms over {} requests, as the server timed them {over32} over 32 ms and {over64} over 64 ms of {checks}; CPU downlink {dl_cpu:.1} s (its server {server_cpu:.1} s), by hand {hand_cpu:.1} s; targets wall <= 1.00, ssh_peak downlink <= by hand, check p99 <= 50 ms)",
        wall / hand_wall,
        percentile(&sorted, 0.99),
        percentile(&sorted, 0.50),
        percentile(&sorted, 1.0),
        sorted.len()
    );
}
