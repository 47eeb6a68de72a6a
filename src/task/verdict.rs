//! The verdict: how a task ended (killed or not, how its process exited, what its hosts did) as
//! the status and `err` that are recorded. A pure function, so every case is a unit test.

use super::super::ansible::events::{Ending, Hosts};
use crate::status::Status;
use crate::store::clean::one_line;

/// Failed hosts named in `err`; the rest are counted ("and N more").
pub const MAX_HOSTS_IN_ERR: usize = 20;
/// Longest message quoted per host in `err`, in characters.
const MAX_HOST_MSG: usize = 200;

/// How the process ended, as far as the TaskActor could see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Our child exited: its code, or the signal that killed it.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// An adopted process is gone; `at_start` if it was already gone when adopted.
    Vanished { pid: i32, at_start: bool },
    /// It never started.
    NotStarted(String),
}

/// What is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub status: Status,
    pub err: Option<String>,
    /// How host results are closed.
    pub ending: Ending,
}

/// The verdict of a task. `kill` is why it was ended from outside (stop, time limit), if it was;
/// `why` is ansible's own error line from `output.log`, if any.
pub fn verdict(
    kill: Option<&(Ending, String)>,
    exit: &Exit,
    hosts: &Hosts,
    why: Option<String>,
) -> Verdict {
    let v = |status, err: Option<String>, ending| Verdict {
        status,
        err,
        ending,
    };
    if let Some((ending, err)) = kill {
        let status = match ending {
            Ending::Stopped => Status::Stopped,
            Ending::Interrupted => Status::Interrupted,
            Ending::Failed => Status::Failed,
            Ending::Timeout | Ending::Exited => Status::Timeout,
        };
        return v(status, Some(err.clone()), *ending);
    }
    match exit {
        Exit::NotStarted(reason) => v(Status::Failed, Some(reason.clone()), Ending::Exited),
        Exit::Exited { code, signal } => {
            let (status, err) = judge(*code == Some(0), *code, *signal, hosts, why);
            v(status, err, Ending::Exited)
        }
        Exit::Vanished { pid, at_start } => {
            if hosts.has_final_stats() {
                // It finished while no server watched: its stats say how.
                let (status, err) = judge(hosts.failures().is_empty(), None, None, hosts, why);
                v(status, err, Ending::Exited)
            } else if *at_start {
                let err = format!("ansible-playbook (pid {pid}) was gone when downlink restarted");
                v(Status::Interrupted, Some(err), Ending::Interrupted)
            } else {
                let detail = why.map(|w| format!(": {w}")).unwrap_or_default();
                let err =
                    format!("ansible-playbook (pid {pid}) ended without its final stats{detail}");
                v(Status::Failed, Some(err), Ending::Exited)
            }
        }
    }
}

/// Status and `err` of a process that ended by itself.
fn judge(
    success: bool,
    code: Option<i32>,
    signal: Option<i32>,
    hosts: &Hosts,
    why: Option<String>,
) -> (Status, Option<String>) {
    if success {
        return (Status::Success, None);
    }
    let failures = hosts.failures();
    if !failures.is_empty() {
        let mut detail: Vec<String> = failures
            .iter()
            .take(MAX_HOSTS_IN_ERR)
            .map(|(host, kind, msg)| match msg {
                Some(m) => format!("{host} {kind} ({})", one_line(m, MAX_HOST_MSG)),
                None => format!("{host} {kind}"),
            })
            .collect();
        if failures.len() > MAX_HOSTS_IN_ERR {
            detail.push(format!("and {} more", failures.len() - MAX_HOSTS_IN_ERR));
        }
        let err = format!(
            "{} of {} hosts failed: {}",
            failures.len(),
            hosts.len(),
            detail.join("; ")
        );
        return (Status::Failed, Some(err));
    }
    let err = match (code, signal, why) {
        (Some(code), _, Some(why)) => format!("ansible-playbook exited with code {code}: {why}"),
        (Some(code), _, None) => format!("ansible-playbook exited with code {code}"),
        (None, Some(sig), _) => format!("ansible-playbook was killed by signal {sig}"),
        (None, None, why) => why.unwrap_or_else(|| "ansible-playbook failed".into()),
    };
    (Status::Failed, Some(err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ansible::events::parse_line;

    fn hosts(n: usize, failed: usize) -> Hosts {
        let nodes: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}")).collect();
        let mut h = Hosts::new(&nodes);
        for node in nodes.iter().take(failed) {
            let line =
                format!(r#"{{"event":"runner_failed","host":"{node}","msg":"boom\n  twice"}}"#);
            h.apply(&parse_line(&line, 8192).unwrap());
        }
        h
    }

    #[test]
    fn a_kill_decides_over_the_exit() {
        let stop = (Ending::Stopped, "stopped through /api/stop".to_string());
        let v = verdict(
            Some(&stop),
            &Exit::Exited {
                code: None,
                signal: Some(15),
            },
            &hosts(1, 0),
            None,
        );
        assert_eq!(v.status, Status::Stopped);
        assert_eq!(v.err.as_deref(), Some("stopped through /api/stop"));
        let limit = (Ending::Timeout, "killed".to_string());
        let v = verdict(
            Some(&limit),
            &Exit::Exited {
                code: Some(0),
                signal: None,
            },
            &hosts(1, 0),
            None,
        );
        assert_eq!((v.status, v.ending), (Status::Timeout, Ending::Timeout));
    }

    #[test]
    fn exits_and_vanished_processes() {
        let ok = Exit::Exited {
            code: Some(0),
            signal: None,
        };
        assert_eq!(
            verdict(None, &ok, &hosts(2, 0), None).status,
            Status::Success
        );
        let code4 = Exit::Exited {
            code: Some(4),
            signal: None,
        };
        let v = verdict(None, &code4, &hosts(2, 0), Some("[ERROR]: x".into()));
        assert_eq!(
            v.err.as_deref(),
            Some("ansible-playbook exited with code 4: [ERROR]: x")
        );
        let gone = Exit::Vanished {
            pid: 7,
            at_start: true,
        };
        let v = verdict(None, &gone, &hosts(1, 0), None);
        assert_eq!(v.status, Status::Interrupted);
        assert_eq!(
            v.err.as_deref(),
            Some("ansible-playbook (pid 7) was gone when downlink restarted")
        );
        let never = Exit::NotStarted("cannot start".into());
        assert_eq!(
            verdict(None, &never, &hosts(1, 0), None).status,
            Status::Failed
        );
    }

    #[test]
    fn err_names_at_most_twenty_failed_hosts() {
        let code2 = Exit::Exited {
            code: Some(2),
            signal: None,
        };
        let v = verdict(None, &code2, &hosts(30, 25), None);
        let err = v.err.unwrap();
        assert!(
            err.starts_with("25 of 30 hosts failed: 10.0.0.0 failed (boom twice); "),
            "{err}"
        );
        assert!(
            err.ends_with("10.0.0.19 failed (boom twice); and 5 more"),
            "{err}"
        );
        assert!(!err.contains("10.0.0.20 "), "{err}");
    }
}
