//! Processes of a task, found through `/proc`. A task's `ansible-playbook` leads its own session
//! and process group; everything it starts inherits the environment marker
//! (`DOWNLINK_TASK_MARK=<run dir>`), including SSH ControlPersist masters that leave the group.
//! These functions are blocking (they read `/proc`): call them off the async threads.

use std::fs;
use std::thread::sleep;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::ansible::TASK_MARK_VAR;

/// Start time of a process in clock ticks since boot (`/proc/PID/stat` field 22), which tells a
/// process from a later one that got the same pid.
pub fn start_time(pid: i32) -> Option<i64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process still runs (exists and is not a zombie) and is the one started then.
pub fn is_alive(pid: i32, started: i64) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let mut fields = stat[close + 1..].split_whitespace();
    let state = fields.next();
    state != Some("Z") && start_time(pid) == Some(started)
}

/// Pids of live processes whose environment carries the task's marker.
pub fn marked(mark: &str) -> Vec<i32> {
    let needle = format!("{TASK_MARK_VAR}={mark}\0");
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Unreadable (gone, or another user's) and zombie processes have no readable environment.
        let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if contains(&environ, needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
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
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        // Fields after the name: state, ppid, pgrp, session.
        let session: i32 = rest.split_whitespace().nth(3)?.parse().ok()?;
        (session == pid).then(|| start_time(pid).map(|t| (pid, t)))?
    })
}

/// Sends `signal` to the process group led by `pgid`; false if there is no such group.
pub fn signal_group(pgid: i32, signal: Signal) -> bool {
    killpg(Pid::from_raw(pgid), signal).is_ok()
}

/// SIGKILLs every process that carries the task's marker until none is left (or a few rounds
/// have passed), then reaps the task's dead processes that became ours; the number killed.
///
/// `group` is the task's process group, whose leader the caller has already waited for.
pub fn kill_marked(mark: &str, group: Option<i32>) -> usize {
    let mut killed = Vec::new();
    for _ in 0..20 {
        let pids = marked(mark);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed.push(pid);
            }
        }
        sleep(Duration::from_millis(25));
    }
    if let Some(pgid) = group {
        reap(Pid::from_raw(-pgid));
    }
    for pid in &killed {
        reap(Pid::from_raw(*pid));
    }
    killed.len()
}

/// Makes this process the reaper of its orphaned descendants, so a task's killed workers and SSH
/// masters are reaped here (see `kill_marked`) instead of waiting on an init that may never reap.
pub fn become_subreaper() -> bool {
    nix::sys::prctl::set_child_subreaper(true).is_ok()
}

/// Reaps dead children matching `which` (a pid, or a negated process group) without blocking.
/// Only called for processes of a task whose leader has already been waited for, so it never
/// takes an exit status that tokio is waiting for.
fn reap(which: Pid) {
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
        assert_eq!(kill_marked(&mark, None), 1);
        // Already reaped by kill_marked; wait only to tidy up if it was not.
        let _ = child.wait();
        assert!(marked(&mark).is_empty());
    }
}
