//! The tests' own view of the machine's processes, read from /proc with no downlink code: a
//! process is a task's if its working directory is the task's run directory, its command line
//! names that directory, or it descends from such a process; work on the nodes (the sshd test
//! hosts run on this machine) is found by a token unique to the test in its command line.

use std::collections::HashMap;
use std::path::Path;

/// One process as seen in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    /// Start time (clock ticks since boot): tells it from a later process with its pid.
    pub start: u64,
    pub cmdline: String,
}

fn read_proc(pid: i32) -> Option<(Proc, Option<std::path::PathBuf>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline)
        .replace('\0', " ")
        .trim()
        .to_owned();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    Some((
        Proc {
            pid,
            ppid: fields.get(1)?.parse().ok()?,
            start: fields.get(19)?.parse().ok()?,
            cmdline,
        },
        cwd,
    ))
}

fn all() -> Vec<(Proc, Option<std::path::PathBuf>)> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter_map(read_proc)
                .collect()
        })
        .unwrap_or_default()
}

/// Every live process of the machine with its working directory.
pub fn snapshot_with_cwd() -> Vec<(Proc, Option<std::path::PathBuf>)> {
    all()
}

/// Zombie children of `ppid` outside its session: (pid, start time). Processes a server spawns
/// lead sessions of their own, and so do the orphans of tasks re-parented to it.
pub fn zombies_of(ppid: i32) -> Vec<(i32, u64)> {
    let session = |stat: &str| -> Option<(char, i32, i32, u64)> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((
            f.first()?.chars().next()?,
            f.get(1)?.parse().ok()?,
            f.get(3)?.parse().ok()?,
            f.get(19)?.parse().ok()?,
        ))
    };
    let own = std::fs::read_to_string(format!("/proc/{ppid}/stat"))
        .ok()
        .and_then(|s| session(&s))
        .map(|(_, _, sid, _)| sid);
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|pid| {
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                    let (state, parent, sid, start) = session(&stat)?;
                    (state == 'Z' && parent == ppid && Some(sid) != own).then_some((pid, start))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The nice value of a process (field 19 of `/proc/PID/stat`), if it is still there.
pub fn nice_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(16)?.parse().ok()
}

/// A process's weight to the CPU scheduler, read from the cgroup it is in: `cpu.weight` of its
/// v2 cgroup where the v2 cpu controller is on, else `cpu.shares` of its v1 cpu cgroup (a hybrid
/// host); `None` when neither applies (or it has gone).
pub fn cpu_weight_of(pid: i32) -> Option<(&'static str, u32)> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let read =
        |path: String| -> Option<u32> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            if let Some(w) = read(format!("/sys/fs/cgroup{path}/cpu.weight")) {
                return Some(("cpu.weight", w));
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            return read(format!("/sys/fs/cgroup/cpu,cpuacct{path}/cpu.shares"))
                .or_else(|| read(format!("/sys/fs/cgroup/cpu{path}/cpu.shares")))
                .map(|s| ("cpu.shares", s));
        }
    }
    None
}

/// Every live process of the machine.
pub fn snapshot() -> Vec<Proc> {
    all().into_iter().map(|(p, _)| p).collect()
}

/// The live processes of the task whose run directory is `dir`.
pub fn of_task(dir: &Path) -> Vec<Proc> {
    let procs = all();
    let needle = dir.to_string_lossy().into_owned();
    let mut mine: Vec<i32> = procs
        .iter()
        .filter(|(p, cwd)| cwd.as_deref() == Some(dir) || p.cmdline.contains(&needle))
        .map(|(p, _)| p.pid)
        .collect();
    let children: HashMap<i32, Vec<i32>> = procs.iter().fold(HashMap::new(), |mut m, (p, _)| {
        m.entry(p.ppid).or_default().push(p.pid);
        m
    });
    let mut i = 0;
    while i < mine.len() {
        if let Some(kids) = children.get(&mine[i]) {
            for k in kids {
                if !mine.contains(k) {
                    mine.push(*k);
                }
            }
        }
        i += 1;
    }
    procs
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| mine.contains(&p.pid))
        .collect()
}

/// Live processes whose command line holds `token`.
pub fn with_token(token: &str) -> Vec<Proc> {
    snapshot()
        .into_iter()
        .filter(|p| p.cmdline.contains(token))
        .collect()
}

/// Those of `procs` still alive (same pid, same start time).
pub fn still_alive(procs: &[Proc]) -> Vec<Proc> {
    let now = snapshot();
    procs
        .iter()
        .filter(|p| now.iter().any(|n| n.pid == p.pid && n.start == p.start))
        .cloned()
        .collect()
}

/// SSH multiplexing masters whose control socket is under `dir`, counted per socket: `ssh -M …
/// -o ControlPath=<socket> …`, or `ssh: <socket> [mux]` once a ControlPersist master renamed
/// itself in the background.
pub fn masters_under(dir: &Path) -> HashMap<String, usize> {
    let named = format!("ssh: {}/", dir.display());
    let option = format!("ControlPath={}/", dir.display());
    let mut out = HashMap::new();
    for p in snapshot() {
        let socket = if let Some(rest) = p.cmdline.strip_prefix(&named) {
            rest.strip_suffix(" [mux]").map(str::to_owned)
        } else if p.cmdline.starts_with("ssh -M ") {
            p.cmdline
                .split_once(&option)
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .map(str::to_owned)
        } else {
            None
        };
        if let Some(socket) = socket {
            *out.entry(socket).or_insert(0) += 1;
        }
    }
    out
}
