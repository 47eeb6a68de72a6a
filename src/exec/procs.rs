//! Processes through `/proc`: start times (to tell a process from a later one with its pid, for
//! adoption), and, where no cgroup is available (`exec::Tracking::Fallback`), a task's processes
//! found by the environment marker every one of them inherits (`DOWNLINK_TASK_MARK=<run dir>`) or
//! by a command line naming the run directory (an ssh master rewrites its environment away).
//! These functions are blocking (they read `/proc`): call them off the async threads.

use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::ansible::TASK_MARK_VAR;

/// The fields of `/proc/PID/stat` downlink reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: char,
    session: i32,
    /// Clock ticks since boot (field 22).
    start_time: i64,
}

/// `/proc/PID/stat`, parsed once here for every caller. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses: fields are counted after the last ')'.
fn stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (3), ppid (4), pgrp (5), session (6), … starttime (22).
    Some(Stat {
        state: fields.first()?.chars().next()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Start time of a process in clock ticks since boot, which tells a process from a later one that
/// got the same pid.
pub fn start_time(pid: i32) -> Option<i64> {
    stat(pid).map(|s| s.start_time)
}

/// Whether the process still runs (exists and is not a zombie) and is the one started then.
pub fn is_alive(pid: i32, started: i64) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z' && s.start_time == started)
}

fn pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// Pids of other processes whose `/proc/PID/<file>` can be read and satisfies `matches`
/// (unreadable ones, gone or another user's, and zombies, are left out).
fn scan(file: &str, matches: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|pid| fs::read(format!("/proc/{pid}/{file}")).is_ok_and(|b| matches(&b)))
        .collect()
}

/// Pids of live processes whose environment carries the task's marker.
pub fn marked(mark: &str) -> Vec<i32> {
    let needle = format!("{TASK_MARK_VAR}={mark}\0");
    scan("environ", |env| contains(env, needle.as_bytes()))
}

/// Pids of live processes whose command line names `dir` (an ssh multiplexing master of the task
/// shows its ControlPath there, `ssh: <dir>/… [mux]`, after rewriting its environment away).
fn naming(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    scan("cmdline", |c| c.windows(needle.len()).any(|w| w == needle))
}

/// `ssh -M` processes with a control socket in `dir`, and the socket each names: masters (an ssh
/// master keeps its command line when it goes to the background) and ssh being started as one.
pub fn ssh_masters(dir: &Path) -> Vec<(i32, std::path::PathBuf)> {
    let option = format!("ControlPath={}/", dir.display());
    let mut found = Vec::new();
    let me = std::process::id() as i32;
    for pid in pids().into_iter().filter(|&p| p != me) {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !cmdline.starts_with(b"ssh\0-M\0") {
            continue;
        }
        let socket = cmdline.split(|b| *b == 0).find_map(|arg| {
            arg.strip_prefix(b"ControlPath=")
                .filter(|_| arg.starts_with(option.as_bytes()))
        });
        if let Some(socket) = socket {
            use std::os::unix::ffi::OsStrExt;
            found.push((pid, std::ffi::OsStr::from_bytes(socket).into()));
        }
    }
    found
}

/// Reaps this process's zombie children that it did not spawn: processes of tasks whose parents
/// died, re-parented to this subreaper (an ssh that goes to the background as a ControlPersist
/// master leaves one per connection). Children in this process's own session (`tokio::process`'s)
/// and those `exec::spawn` started are left to whoever waits for them. The number reaped.
pub fn reap_orphans() -> usize {
    let me = std::process::id() as i32;
    let Some(mine) = stat(me) else {
        return 0;
    };
    let Ok(threads) = fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let children: Vec<i32> = threads
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    super::spawn::with_own_children(|own| {
        let mut reaped = 0;
        for pid in children {
            let orphan = !own.contains(&pid)
                && stat(pid).is_some_and(|s| s.state == 'Z' && s.session != mine.session);
            if orphan
                && matches!(waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)), Ok(s) if s != WaitStatus::StillAlive)
            {
                reaped += 1;
            }
        }
        reaped
    })
}

/// Sends SIGKILL to each of `pids` and reaps those that were this process's children.
pub fn kill_now(pids: &[i32]) {
    for pid in pids {
        // Gone already (ESRCH) is what a kill is for.
        kill(Pid::from_raw(*pid), Signal::SIGKILL).ok();
    }
    sleep(Duration::from_millis(20));
    reap(pids);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    // The marker is a whole variable: it starts the block or follows a NUL.
    haystack.starts_with(needle)
        || haystack
            .windows(needle.len() + 1)
            .any(|w| w[0] == 0 && &w[1..] == needle)
}

/// The live process that leads the task's session (the `ansible-playbook` a server started), found
/// by the marker: (pid, start time).
pub fn leader(mark: &str) -> Option<(i32, i64)> {
    marked(mark).into_iter().find_map(|pid| {
        let s = stat(pid)?;
        (s.session == pid).then_some((pid, s.start_time))
    })
}

/// Sends `signal` to the process group led by `pgid`; false if there is no such group.
pub fn signal_group(pgid: i32, signal: Signal) -> bool {
    killpg(Pid::from_raw(pgid), signal).is_ok()
}

/// Without a cgroup: SIGKILLs every process that carries the task's marker or names its run
/// directory `dir` on its command line, until none is left (or a few rounds have passed), then
/// reaps those that became ours; the number killed.
///
/// `group` is the task's process group, whose leader the caller has already waited for.
pub fn kill_leftovers(mark: &str, dir: &Path, group: Option<i32>) -> usize {
    let mut killed = Vec::new();
    for _ in 0..20 {
        let mut found = marked(mark);
        found.extend(naming(dir));
        found.sort_unstable();
        found.dedup();
        if found.is_empty() {
            break;
        }
        for pid in found {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed.push(pid);
            }
        }
        sleep(Duration::from_millis(25));
    }
    reap_group(group);
    reap(&killed);
    killed.len()
}

/// Reaps those of `pids` that are dead children of this process (a task's processes re-parented
/// to the subreaper), without blocking.
pub fn reap(pids: &[i32]) {
    for pid in pids {
        reap_one(Pid::from_raw(*pid));
    }
}

/// Reaps the dead members of the task's process group that became ours (the caller has waited
/// for its leader).
pub fn reap_group(group: Option<i32>) {
    if let Some(pgid) = group {
        reap_one(Pid::from_raw(-pgid));
    }
}

/// Makes this process the reaper of its orphaned descendants, so a task's killed workers and SSH
/// masters are reaped here (see `kill_leftovers`) instead of waiting on an init that may never reap.
pub fn become_subreaper() -> bool {
    nix::sys::prctl::set_child_subreaper(true).is_ok()
}

/// Reaps dead children matching `which` (a pid, or a negated process group) without blocking.
/// Only called for processes of a task whose leader has already been waited for, so it never
/// takes an exit status that tokio is waiting for.
fn reap_one(which: Pid) {
    while let Ok(status) = waitpid(which, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_start_time() {
        let me = std::process::id() as i32;
        let t = start_time(me).unwrap();
        assert!(t > 0);
        assert!(is_alive(me, t));
        assert!(!is_alive(me, t + 1));
    }

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let text = "42 (a (b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 777 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                state: 'S',
                session: 42,
                start_time: 777
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn marker_must_be_a_whole_variable() {
        let env = b"A=1\0DOWNLINK_TASK_MARK=/r/1\0B=2\0";
        assert!(contains(env, b"DOWNLINK_TASK_MARK=/r/1\0"));
        assert!(!contains(env, b"DOWNLINK_TASK_MARK=/r/\0"));
        assert!(!contains(
            b"XDOWNLINK_TASK_MARK=/r/1\0",
            b"DOWNLINK_TASK_MARK=/r/1\0"
        ));
    }

    #[test]
    fn finds_and_kills_marked_processes() {
        let mark = format!("/tmp/procs-test-{}", std::process::id());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(TASK_MARK_VAR, &mark)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Until exec completes, /proc shows the parent's environment: wait for the marker.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while marked(&mark).is_empty() && std::time::Instant::now() < deadline {
            sleep(Duration::from_millis(5));
        }
        assert_eq!(marked(&mark), vec![pid]);
        assert_eq!(
            kill_leftovers(&mark, Path::new("/nonexistent/dir"), None),
            1
        );
        // Already reaped by kill_leftovers; wait only to tidy up if it was not.
        let _ = child.wait();
        assert!(marked(&mark).is_empty());
    }
}
