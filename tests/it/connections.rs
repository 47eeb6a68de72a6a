//! Warm SSH connections, seen from outside: which `ssh` masters run on this machine (process
//! snapshots: a master names its control socket in its command line) while and after tasks run.
//! The agent keeps masters in `<run root>/.cp`; a task's own ssh keeps its own in `<run dir>/cp`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{
    run_body, test_settings, wait_until, Backend, BinServer, TempDir, TestServer, HOSTS,
};
use crate::procwatch;

/// The hosts of the agent's masters running now: an `ssh -M` naming a socket under `dir` ends
/// its command line with the host.
fn agent_master_hosts(dir: &Path) -> Vec<String> {
    let option = format!("ControlPath={}/", dir.display());
    procwatch::snapshot()
        .into_iter()
        .filter(|p| p.cmdline.starts_with("ssh -M ") && p.cmdline.contains(&option))
        .filter_map(|p| p.cmdline.split_whitespace().last().map(str::to_owned))
        .collect()
}

#[test]
fn a_task_gets_agent_masters_for_its_first_forks_nodes_and_its_own_for_the_rest() {
    let server = TestServer::start(Backend::Sqlite);
    let agent_cp = server.run_dir(0).parent().unwrap().join(".cp");
    // One fork: ansible reaches the three nodes one after the other, three times.
    let playbook = "- command: sleep 1\n- ping:\n- command: sleep 1\n";
    let mut body = run_body("one-fork", &HOSTS, playbook);
    body["fork_num"] = json!(1);
    let id = server.run(body);
    let task_cp = server.run_dir(id).join("cp");
    let (mut agent_peak, mut own) = (0, HashSet::new());
    // Zombies left to this process (the server's subreaper) by the task's ssh as it goes to
    // the background, and when each was first seen.
    let mut zombies = HashMap::new();
    let mut oldest = Duration::ZERO;
    // The task's processes, and the agent's masters, run below the server's priority.
    let mut niced = HashMap::new();
    // And each task weighs task_cpu_weight (10 of the agent's 100) to the scheduler, as a whole.
    let mut weighed = HashMap::new();
    while server.task(id).status <= 2 {
        let task_procs = procwatch::of_task(&server.run_dir(id));
        let masters = procwatch::snapshot().into_iter().filter(|p| {
            p.cmdline.starts_with("ssh -M ")
                && p.cmdline
                    .contains(&format!("ControlPath={}/", agent_cp.display()))
        });
        for p in task_procs.into_iter().chain(masters) {
            if let Some(n) = procwatch::nice_of(p.pid) {
                niced.insert((p.pid, p.start), (n, p.cmdline.clone()));
            }
        }
        // (A zombie has no command line, and has left its cgroups.)
        for p in procwatch::of_task(&server.run_dir(id))
            .into_iter()
            .filter(|p| !p.cmdline.is_empty())
        {
            let weight = procwatch::cpu_weight_of(p.pid);
            // Only if it is still alive once its weight is read: a process that is exiting has
            // left its cgroups (and its command line, which is read after the weight, is gone).
            let alive =
                std::fs::read(format!("/proc/{}/cmdline", p.pid)).is_ok_and(|c| !c.is_empty());
            if alive {
                weighed.insert((p.pid, p.start), (weight, p.cmdline));
            }
        }
        agent_peak = agent_peak.max(agent_master_hosts(&agent_cp).len());
        own.extend(procwatch::masters_under(&task_cp).into_keys());
        let now: Vec<_> = procwatch::zombies_of(std::process::id() as i32);
        zombies.retain(|z, _| now.contains(z));
        for z in now {
            let seen = zombies.entry(z).or_insert_with(Instant::now);
            oldest = oldest.max(seen.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        oldest < Duration::from_secs(3),
        "a zombie of the task lived {oldest:?}"
    );
    assert!(niced.len() >= 3, "{niced:?}");
    assert!(
        niced.values().all(|(n, _)| *n == 10),
        "every process of the task at task_nice 10: {niced:?}"
    );
    assert_eq!(procwatch::nice_of(std::process::id() as i32), Some(0));
    assert!(weighed.len() >= 3, "{weighed:?}");
    assert!(
        weighed
            .values()
            .all(|(w, _)| matches!(w, Some(("cpu.weight", 10)) | Some(("cpu.shares", 102)))),
        "every process of the task in a cgroup of cpu weight 10 (v1 shares 102): {weighed:?}"
    );
    assert_eq!(server.task(id).status, 4);
    server.assert_hosts_match_recap(id);
    assert_eq!(
        agent_master_hosts(&agent_cp),
        [HOSTS[0]],
        "the agent warms the first node only"
    );
    assert_eq!(agent_peak, 1);
    assert_eq!(
        own.len(),
        2,
        "the task's ssh keeps a master of its own for each of the other two nodes: {own:?}"
    );
    assert!(
        procwatch::masters_under(&task_cp).is_empty(),
        "the task's own masters end with it: {:?}",
        procwatch::masters_under(&task_cp)
    );
}

#[test]
fn the_agent_keeps_at_most_max_ssh_masters_least_recently_used_stopped_first() {
    let server = TestServer::start_with(Backend::Sqlite, |s| s.max_ssh_masters = 2);
    let agent_cp = server.run_dir(0).parent().unwrap().join(".cp");
    for (i, host) in HOSTS.iter().enumerate() {
        let id = server.run(run_body(&format!("on-{i}"), &[host], "- ping:\n"));
        assert_eq!(server.wait_end(id, 60).status, 4);
    }
    wait_until("the least recently used master stops", 20, || {
        agent_master_hosts(&agent_cp).len() == 2
    });
    let mut hosts = agent_master_hosts(&agent_cp);
    hosts.sort();
    assert_eq!(hosts, [HOSTS[1], HOSTS[2]]);
    // A task on the first node again: its master comes back, and the oldest of the others goes.
    let id = server.run(run_body("again", &[HOSTS[0]], "- ping:\n"));
    assert_eq!(server.wait_end(id, 60).status, 4);
    wait_until("two masters again", 20, || {
        let mut hosts = agent_master_hosts(&agent_cp);
        hosts.sort();
        hosts == [HOSTS[0], HOSTS[2]]
    });
}

/// `ssh -M -N` with its control socket at `socket`, as the agent starts a master.
fn master(settings: &downlink::settings::Settings, socket: &Path, host: &str) -> Child {
    Command::new("ssh")
        .args([
            "-M",
            "-N",
            "-o",
            "ControlMaster=yes",
            "-o",
            "ControlPersist=60",
        ])
        .arg("-o")
        .arg(format!("ControlPath={}", socket.display()))
        .args(["-o", "BatchMode=yes", "-p"])
        .arg(settings.ssh_port.to_string())
        .arg("-i")
        .arg(&settings.ssh_private_key)
        .args(settings.ssh_common_args.split_whitespace())
        .args(["-l", "root", "--", host])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh")
}

#[test]
fn masters_a_dead_agent_left_half_started_are_killed_and_live_ones_kept() {
    let dir = TempDir::new();
    let settings = test_settings(&dir.0);
    let cp = settings.run_dir.join(&settings.agent_name).join(".cp");
    std::fs::create_dir_all(&cp).unwrap();
    // A master whose socket was taken (as when two start at once) stays a plain connection
    // for good: ssh says "already exists, disabling multiplexing" and goes on.
    let taken = cp.join("0000000000");
    std::fs::write(&taken, b"").unwrap();
    let mut stuck = master(&settings, &taken, HOSTS[0]);
    // A master that came up, as a dead agent leaves it: it serves on.
    let live = cp.join("1111111111");
    let mut up = master(&settings, &live, HOSTS[1]);
    wait_until("the live master is up", 30, || {
        up.try_wait().expect("wait").is_some() && live.exists()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        stuck.try_wait().expect("wait").is_none(),
        "the stuck ssh runs"
    );
    let server = BinServer::start(&settings, &dir.0);
    wait_until("the stuck ssh is killed", 20, || {
        stuck.try_wait().expect("wait").is_some()
    });
    let check = |op: &str| {
        Command::new("ssh")
            .args(["-O", op, "-o"])
            .arg(format!("ControlPath={}", live.display()))
            .arg(HOSTS[1])
            .stderr(Stdio::null())
            .status()
            .expect("ssh -O")
            .success()
    };
    assert!(check("check"), "the live master still answers");
    drop(server);
    assert!(check("exit"));
}
