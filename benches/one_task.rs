//! One task against the three SSH test hosts, through downlink and by hand.
//!
//! `scripts/bench` runs it (it starts the SSH test hosts and installs ansible-core first). For
//! each of ROUNDS rounds it times `/api/parallel_run` of a one-task `ping` playbook on
//! 127.0.0.2-4 against a downlink server with the embedded SQLite database, then the same
//! playbook and inventory run by hand with `ansible-playbook` and the same environment downlink
//! gives it, and prints the median and spread of both.

use std::process::Command;
use std::time::{Duration, Instant};

use downlink::ansible::rundir;
use downlink::settings::Settings;

const ROUNDS: usize = 7;
const HOSTS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
const PLAY: &str = "- ping:\n";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run scripts/bench"))
}

fn median(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[v.len() / 2]), ms(v[0]), ms(v[v.len() - 1]))
}

fn main() {
    let dir = std::env::temp_dir().join(format!("dl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let mut s = Settings::defaults();
    s.ansible_playbook = env("DLTEST_ANSIBLE_PLAYBOOK");
    s.ssh_private_key = env("DLTEST_SSH_KEY");
    s.ssh_port = env("DLTEST_SSH_PORT").parse().expect("port");
    s.ssh_common_args = "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no".into();
    s.ansible_python_interpreter = "/usr/bin/python3".into();
    s.run_dir = dir.join("runs");
    s.database_url = format!("sqlite://{}", dir.join("bench.sqlite3").display());
    s.log_level = "error".into();
    let server = downlink::server::spawn(s.clone(), downlink::logging::discard()).expect("server");
    let url = format!("http://{}/api/parallel_run", server.addr);
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();

    // By hand: the inventory downlink writes, in a directory of its own, the same environment.
    let by_hand = dir.join("by-hand");
    std::fs::create_dir_all(by_hand.join("cp")).expect("dir");
    let nodes: Vec<String> = HOSTS.iter().map(|h| h.to_string()).collect();
    std::fs::write(
        by_hand.join("inventory.yml"),
        rundir::inventory(&s, &nodes, "root").to_string(),
    )
    .expect("inventory");
    std::fs::write(
        by_hand.join("playbook.yml"),
        format!(
            "- hosts: all\n  gather_facts: false\n  tasks:\n{}",
            "    - ping:\n"
        ),
    )
    .expect("playbook");
    std::fs::write(by_hand.join("ansible.cfg"), rundir::ANSIBLE_CFG).expect("cfg");

    let mut through = Vec::new();
    let mut hand = Vec::new();
    for round in 0..ROUNDS {
        let body = serde_json::json!({"nodes": HOSTS, "user": "root", "name": format!("bench-{round}"),
            "tasks": PLAY, "params": "", "fork_num": 3});
        let t = Instant::now();
        let res = agent
            .post(&url)
            .set("X-CORRELATION-ID", "bench")
            .set("X-RESOURCE", "bench")
            .send_string(&body.to_string())
            .expect("parallel_run");
        let text = res.into_string().expect("body");
        through.push(t.elapsed());
        assert_eq!(text.matches("reuslt = ok").count(), 3, "{text}");

        let t = Instant::now();
        let out = Command::new(&s.ansible_playbook)
            .current_dir(&by_hand)
            .args(["-i", "inventory.yml", "--forks", "3", "playbook.yml"])
            .env("ANSIBLE_PIPELINING", "True")
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", by_hand.join("cp"))
            .env("ANSIBLE_NOCOLOR", "1")
            .output()
            .expect("ansible-playbook runs");
        hand.push(t.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Each round starts without SSH masters, as a downlink task does: stop the ones left.
        for entry in std::fs::read_dir(by_hand.join("cp"))
            .expect("cp dir")
            .flatten()
        {
            let _ = Command::new("ssh")
                .args(["-O", "exit", "-o"])
                .arg(format!("ControlPath={}", entry.path().display()))
                .arg("x")
                .output();
        }
    }
    let (tm, tlo, thi) = median(through);
    let (hm, hlo, hhi) = median(hand);
    println!("one ping task on 3 SSH hosts, {ROUNDS} rounds (median [min..max]):");
    println!("  through downlink (/api/parallel_run): {tm:.0} ms [{tlo:.0}..{thi:.0}]");
    println!("  ansible-playbook by hand:             {hm:.0} ms [{hlo:.0}..{hhi:.0}]");
    println!(
        "  overhead of downlink:                 {:.0} ms ({:+.1} %)",
        tm - hm,
        (tm / hm - 1.0) * 100.0
    );
    server.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
