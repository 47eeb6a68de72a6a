//! A stop reaches the nodes. Every play of a task runs with `DOWNLINK_TASK=<mark>` in its
//! environment (ansible's play-level `environment`, so it passes `become` too), which every
//! process it starts on a node inherits, backgrounded ones (`nohup … &`) included. After a stop or
//! a time limit has emptied the task's cgroup here, downlink connects to each node the task may
//! have reached, a bounded number at a time, and ends the processes that carry the mark: TERM,
//! then KILL for what is left after 2 s. The whole cleanup is bounded by `remote_cleanup_secs`.
//!
//! The command sent is a fixed script; the only value in it is the mark, which downlink makes
//! itself (agent name, task id, random hex: `[A-Za-z0-9._-]`). Nothing from a request reaches the
//! remote shell: user, host and port go into ssh's argv.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::Semaphore;

/// The script run on a node with the mark as `$1`: prints `killed N left M`.
/// One grep reads every environment block (NUL-separated: `-z`); a node without GNU grep's `-z`
/// falls back to one `tr | grep` per process.
const SCRIPT: &str = r#"m="DOWNLINK_TASK=$1"
if printf "a\0" | grep -qzxF a 2>/dev/null; then
marked() { grep -lzxF "$m" /proc/[0-9]*/environ 2>/dev/null | sed -n "s|^/proc/\([0-9]*\)/environ$|\1|p" | grep -vx "$$"; }
else
marked() { for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = "$$" ] && continue; if tr "\0" "\n" < "$d/environ" 2>/dev/null | grep -qxF "$m"; then echo "$p"; fi; done; }
fi
n=0; for p in $(marked); do kill -TERM "$p" 2>/dev/null && n=$((n+1)); done
i=0; left=$(marked); while [ -n "$left" ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); left=$(marked); done
for p in $left; do kill -KILL "$p" 2>/dev/null; done
[ -n "$left" ] && sleep 0.2
echo "killed $n left $(marked | wc -l)""#;

/// How to reach one node.
#[derive(Debug, Clone)]
pub struct Node {
    pub host: String,
    pub user: String,
    pub port: u16,
    pub key: String,
    /// Extra ssh options (setting `ssh_common_args`), already split.
    pub options: Vec<String>,
    /// The agent's multiplexing master for this node, if one is up.
    pub control_path: Option<PathBuf>,
}

impl Node {
    /// How to reach each of `hosts` as `user` with this agent's SSH settings, through its master
    /// for that node when one is up.
    pub fn all(
        settings: &crate::settings::Settings,
        control_dir: &std::path::Path,
        user: &str,
        hosts: impl IntoIterator<Item = String>,
    ) -> Vec<Node> {
        use crate::exec::connections;
        let options = connections::split_args(&settings.ssh_common_args);
        hosts
            .into_iter()
            .map(|host| Node {
                control_path: connections::live_socket(control_dir, &host, settings.ssh_port, user),
                host,
                user: user.to_owned(),
                port: settings.ssh_port,
                key: settings.ssh_private_key.clone(),
                options: options.clone(),
            })
            .collect()
    }
}

/// What cleaning one node found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleaned {
    /// Every marked process is gone (`killed` of them were signalled).
    Clean { killed: u32 },
    /// Some marked processes could not be killed.
    Left { killed: u32, left: u32 },
    /// The node could not be reached or the cleanup failed: why.
    Failed(String),
}

/// A task's mark: unique to it among all agents and runs.
pub fn new_mark(agent: &str, task_id: i64) -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // Unique enough without the generator: the clock and this process.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes = (nanos as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    format!("{agent}-{task_id}-{}", hex::encode(bytes))
}

/// The ssh command line for `node`, ending with the remote command words.
pub fn ssh_command(node: &Node, connect_timeout: u64) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.arg("-o")
        .arg("BatchMode=yes")
        .arg("-o")
        .arg(format!("ConnectTimeout={connect_timeout}"))
        .arg("-o")
        .arg("ControlMaster=no");
    match &node.control_path {
        Some(p) => cmd.arg("-o").arg(format!("ControlPath={}", p.display())),
        None => cmd.arg("-o").arg("ControlPath=none"),
    };
    cmd.arg("-p").arg(node.port.to_string());
    if !node.key.is_empty() {
        cmd.arg("-i").arg(&node.key);
    }
    cmd.args(&node.options)
        .arg("-l")
        .arg(&node.user)
        .arg("--")
        .arg(&node.host)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn clean_one(node: &Node, mark: &str, limit: Duration) -> Cleaned {
    let mut cmd = ssh_command(node, limit.as_secs().max(1));
    // The remote login shell reads this line: the script in single quotes (it holds none), the
    // mark as its first argument.
    cmd.arg(format!("sh -c '{SCRIPT}' downlink-cleanup {mark}"));
    let output = match tokio::time::timeout(limit, cmd.output()).await {
        Err(_) => return Cleaned::Failed(format!("no answer within {} s", limit.as_secs())),
        Ok(Err(e)) => return Cleaned::Failed(format!("cannot run ssh: {e}")),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let words: Vec<&str> = stdout.split_whitespace().collect();
    match words.as_slice() {
        ["killed", k, "left", l] => {
            let (killed, left) = (k.parse().unwrap_or(0), l.parse().unwrap_or(0));
            if left == 0 {
                Cleaned::Clean { killed }
            } else {
                Cleaned::Left { killed, left }
            }
        }
        _ => {
            let err = String::from_utf8_lossy(&output.stderr);
            let why = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            Cleaned::Failed(crate::store::clean::one_line(why, 200))
        }
    }
}

/// Cleans every node, `concurrency` at a time, all within `limit`; the outcome per host.
pub async fn clean(
    nodes: Vec<Node>,
    mark: String,
    limit: Duration,
    concurrency: usize,
) -> HashMap<String, Cleaned> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mark = Arc::new(mark);
    let mut set = tokio::task::JoinSet::new();
    for node in nodes {
        let (gate, mark) = (gate.clone(), mark.clone());
        set.spawn(async move {
            let outcome = match gate.acquire().await {
                Ok(_permit) => clean_one(&node, &mark, limit).await,
                Err(_) => Cleaned::Failed("cleanup was cancelled".into()),
            };
            (node.host, outcome)
        });
    }
    let mut out = HashMap::new();
    let all = async {
        while let Some(done) = set.join_next().await {
            if let Ok((host, outcome)) = done {
                out.insert(host, outcome);
            }
        }
    };
    // Past the limit, the nodes not done are reported as such by the caller.
    tokio::time::timeout(limit + Duration::from_millis(500), all)
        .await
        .ok();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_unique_and_safe_to_quote() {
        let a = new_mark("agent-1.x", 7);
        let b = new_mark("agent-1.x", 7);
        assert_ne!(a, b);
        assert!(a.starts_with("agent-1.x-7-"));
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c)));
        assert!(
            !SCRIPT.contains('\''),
            "the script is sent in single quotes"
        );
    }
}
