//! downlink against what a user would do instead: `ansible-playbook` by hand, with ansible's own
//! defaults (a user's loop shares `~/.ansible/cp`, so its ControlPersist masters stay warm across
//! runs), on the three SSH test hosts. Ratios from one run:
//!
//! - P1: 20 ping playbooks, 4 at a time: downlink ÷ by hand with pipelining (the fair pair, since
//!   downlink pipelines by default): wall time and CPU time. Targets: wall ≤ 1.00, CPU ≤ 1.05.
//! - P2: 10 ping playbooks one after another: downlink ÷ by hand with every default (no
//!   pipelining): wall time. Target ≤ 0.40. Printed beside it, the floor: by hand with pipelining
//!   and its masters already warm, i.e. what one `ansible-playbook` start per playbook costs.
//!
//! CPU is what each side's cgroup v2 measured: the downlink server (a process of its own), its
//! task cgroups and its SSH masters on one side; each `ansible-playbook` by hand and everything
//! it starts (its ControlPersist masters included) on the other. The HTTP client is not counted.
//! Each figure starts cold: a fresh server and run directory, a fresh `HOME` for the user.
//!
//! - W300, W1000: one ping task on 300 and 1,000 distinct SSH nodes against by hand at the same
//!   forks (see `wide.rs`): wall ≤ 1.00, peak local ssh processes no more than by hand,
//!   `/api/check` of another task p99 ≤ 50 ms.
//!
//! `scripts/bench` runs it (it starts the SSH test hosts and installs ansible-core first);
//! `scripts/bench --quick` runs 4 and 2 playbooks instead of 20 and 10, and 30 wide nodes; names
//! such as `P1 W300` pick figures (any `W<n>` runs a wide task of n nodes).

mod common;
#[path = "vs_by_hand/wide.rs"]
mod wide;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{env, in_parallel, remove_cgroups, v2_mount, Cg, Downlink};

const HOSTS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
const PLAYBOOK: &str = "- hosts: all\n  gather_facts: false\n  tasks:\n    - ping:\n";

struct Setup {
    dir: PathBuf,
    playbook_bin: String,
    key: String,
    port: String,
    common: String,
    bench_cg: PathBuf,
}

/// A downlink server for the ping playbooks.
struct Server(Downlink);

impl Server {
    fn start(s: &Setup, name: &str) -> Server {
        let settings = [
            ("ansible_playbook", s.playbook_bin.clone()),
            ("ssh_private_key", s.key.clone()),
            ("ssh_port", s.port.clone()),
            ("ssh_common_args", s.common.clone()),
            ("ansible_python_interpreter", "/usr/bin/python3".into()),
        ];
        let cg = Cg::new(s.bench_cg.join(name));
        Server(Downlink::start(&s.dir.join(name), cg, &settings))
    }

    fn run(&self, name: &str) {
        let body = serde_json::json!({"nodes": HOSTS, "user": "root", "name": name,
            "tasks": PLAYBOOK, "params": "", "fork_num": 3});
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(120))
            .build();
        let text = self.0.post(&agent, "/api/parallel_run", &body);
        assert_eq!(text.matches("reuslt = ok").count(), 3, "{text}");
    }
}

/// A user's own directory: an inventory as they would write it, and a `HOME` of its own.
struct ByHand {
    dir: PathBuf,
    playbook_bin: String,
    pipelining: bool,
    cg: Cg,
}

impl ByHand {
    fn new(s: &Setup, name: &str, pipelining: bool, hosts: &[String], port: &str) -> ByHand {
        let dir = s.dir.join(name);
        std::fs::create_dir_all(dir.join("home")).expect("home");
        let hosts: serde_json::Map<String, serde_json::Value> = hosts
            .iter()
            .map(|h| (h.to_string(), serde_json::json!({})))
            .collect();
        let inventory = serde_json::json!({"all": {"hosts": hosts, "vars": {
            "ansible_user": "root", "ansible_port": port.parse::<u16>().expect("port"),
            "ansible_ssh_private_key_file": s.key, "ansible_ssh_common_args": s.common,
            "ansible_python_interpreter": "/usr/bin/python3"}}});
        std::fs::write(dir.join("inventory.yml"), inventory.to_string()).expect("inventory");
        std::fs::write(dir.join("playbook.yml"), PLAYBOOK).expect("playbook");
        ByHand {
            cg: Cg::new(s.bench_cg.join(name)),
            dir,
            playbook_bin: s.playbook_bin.clone(),
            pipelining,
        }
    }

    fn run(&self) {
        self.run_forks(5);
    }

    /// One run at `forks` (ansible's default is 5).
    fn run_forks(&self, forks: usize) {
        let mut cmd = Command::new(&self.playbook_bin);
        cmd.current_dir(&self.dir)
            .args(["-i", "inventory.yml", "playbook.yml", "--forks"])
            .arg(forks.to_string())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.dir.join("home"))
            .env("LANG", "C.UTF-8");
        if self.pipelining {
            cmd.env("ANSIBLE_PIPELINING", "True");
        }
        self.cg.join(&mut cmd);
        let out = cmd.output().expect("ansible-playbook runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// Closes the user's ControlPersist masters (at the end, so their CPU is counted).
    fn close(&self) {
        let cp = self.dir.join("home/.ansible/cp");
        for entry in std::fs::read_dir(cp).into_iter().flatten().flatten() {
            let _ = Command::new("ssh")
                .args(["-O", "exit", "-o"])
                .arg(format!("ControlPath={}", entry.path().display()))
                .arg("x")
                .output();
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let picked: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    // P1, P2, and W<n> for a wide task of n nodes (W300 and W1000 by default).
    let wide: Vec<usize> = picked
        .iter()
        .filter_map(
            |a| match (*a, a.strip_prefix('W').map(str::parse::<usize>)) {
                ("P1" | "P2", _) => None,
                (_, Some(Ok(n))) if n > 0 => Some(n),
                _ => panic!("unknown figure {a}: P1, P2 or W<nodes> such as W300"),
            },
        )
        .collect();
    let wants = |name: &str| picked.is_empty() || picked.contains(&name);
    let (p1_runs, p2_runs) = if quick { (4, 2) } else { (20, 10) };
    let dir = std::env::temp_dir().join(format!("dl-bench-{}", std::process::id()));
    let bench_cg = v2_mount().join(format!("dlbench-{}", std::process::id()));
    let s = Setup {
        dir: dir.clone(),
        playbook_bin: env("DLTEST_ANSIBLE_PLAYBOOK"),
        key: env("DLTEST_SSH_KEY"),
        port: env("DLTEST_SSH_PORT"),
        common: "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no".into(),
        bench_cg: Cg::new(bench_cg.clone()).0,
    };

    let three: Vec<String> = HOSTS.iter().map(|h| h.to_string()).collect();
    if wants("P1") {
        p1(&s, &three, p1_runs);
    }
    if wants("P2") {
        p2(&s, &three, p2_runs);
    }
    let wide = match (picked.is_empty(), quick) {
        (true, true) => vec![30],
        (true, false) => vec![300, 1000],
        (false, _) => wide,
    };
    for n in wide {
        wide::figure(&s, &env("DLTEST_WIDE_PORT"), n);
    }
    remove_cgroups(&bench_cg);
    let _ = std::fs::remove_dir_all(&dir);
}

/// P1: 4 at a time; downlink against by hand with pipelining.
fn p1(s: &Setup, hosts: &[String], p1_runs: usize) {
    let server = Server::start(s, "p1-downlink");
    let dl_wall = in_parallel(p1_runs, 4, |i| server.run(&format!("p1-{i}")));
    let dl_cpu = server.0.cg.cpu_secs();
    drop(server);
    let hand = ByHand::new(s, "p1-by-hand", true, hosts, &s.port);
    let hand_wall = in_parallel(p1_runs, 4, |_| hand.run());
    hand.close();
    let hand_cpu = hand.cg.cpu_secs();
    println!(
        "P1 wall={:.2} cpu={:.2} ({p1_runs} ping playbooks x 3 SSH hosts, 4 at a time: downlink {dl_wall:.1} s wall {dl_cpu:.1} s CPU; by hand with pipelining {hand_wall:.1} s wall {hand_cpu:.1} s CPU; targets wall <= 1.00, cpu <= 1.05)",
        dl_wall / hand_wall,
        dl_cpu / hand_cpu
    );
}

/// P2: one after another; downlink against by hand with ansible's defaults.
fn p2(s: &Setup, hosts: &[String], p2_runs: usize) {
    let server = Server::start(s, "p2-downlink");
    let dl_wall = in_parallel(p2_runs, 1, |i| server.run(&format!("p2-{i}")));
    drop(server);
    let naive = ByHand::new(s, "p2-by-hand", false, hosts, &s.port);
    let naive_wall = in_parallel(p2_runs, 1, |_| naive.run());
    naive.close();
    // The floor of ansible-playbook itself: by hand with pipelining and warm masters.
    let warm = ByHand::new(s, "p2-floor", true, hosts, &s.port);
    warm.run();
    let floor_wall = in_parallel(p2_runs, 1, |_| warm.run());
    warm.close();
    println!(
        "P2 ratio={:.2} floor={:.2} ({p2_runs} ping playbooks x 3 SSH hosts in a row: downlink {dl_wall:.1} s; by hand with ansible's defaults {naive_wall:.1} s; by hand with pipelining and masters already warm {floor_wall:.1} s, the floor of one ansible-playbook start per playbook; target <= 0.40)",
        dl_wall / naive_wall,
        floor_wall / naive_wall
    );
}
