//! Warm SSH connections, owned by the agent: multiplexing masters, one per (remote user, host,
//! port) — the key is the agent's — started outside every task's cgroup and process group, shared
//! by consecutive and concurrent tasks, and closed when idle for `ssh_idle_secs`, when their
//! connection dies (an unreachable node), and when the server stops for good. They close
//! themselves when idle (`ControlPersist`), so even a crashed agent leaks none for long. At most
//! `max_ssh_masters` are kept: past it, the least recently used is asked to stop (`ssh -O stop`:
//! sessions in use go on, new ones connect anew).
//!
//! A task gets agent masters for its first `min(forks, max_ssh_masters)` nodes: ansible reaches
//! nodes in inventory order, `forks` at a time, so those are the ones the task waits for at its
//! start. Its ssh runs with `ControlMaster=auto` in a control directory of its own (`<run
//! dir>/cp`), where a symbolic link stands for each agent master it may use
//! ([`crate::ansible::rundir::link_masters`]); for the other nodes its ssh starts a master of its
//! own there, inside the task's cgroup, exactly as ansible by hand does, and that master ends
//! with the task. One handshake per node, never two: a node the agent is still connecting to
//! has its link already (a link to a socket not yet there makes ssh connect directly for that
//! one session, without a master of its own).
//!
//! A stop kills the task's own processes and masters (they are in its cgroup) and never an
//! agent master, so no other task loses its connection.
//!
//! The control socket of a master is where ansible looks by default: `<control dir>/<first ten
//! hex digits of sha1("host-port-user")>` under `ANSIBLE_SSH_CONTROL_PATH_DIR`. The agent's are in
//! `<run root>/.cp` (0700, owned by `run_as_user` when set).
//!
//! The actor runs on a thread of its own (see `server::run`), never the task actors' thread, and
//! starts masters through [`crate::exec::spawn`] (no copy of the server), at most `max_forks` at
//! once: the rest wait their turn. A task waits until the masters started for it are up or have
//! failed — the handshakes it would otherwise make itself, at the same moment — and at most
//! `WARM_WAIT` (ssh's `ConnectTimeout`), then starts anyway. A master that has not come up within
//! `START_LIMIT` is killed (an ssh that found its socket taken would otherwise live on as a plain
//! connection); starters left by an agent that died are killed when the actor starts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use sha1::{Digest, Sha1};
use slog::{debug, info, warn, Logger};

use crate::exec::command::RunAs;
use crate::exec::spawn::{Child, Spawn};
use crate::settings::Settings;

/// How long a task waits for masters started for it before it starts anyway (`ConnectTimeout`).
const WARM_WAIT: Duration = Duration::from_secs(10);
/// How often idle and dead masters are looked for.
const SWEEP: Duration = Duration::from_millis(500);
/// How often masters being started are looked at (cheap when none is).
const POLL_STARTING: Duration = Duration::from_millis(50);
/// How long a master may take to come up (`ConnectTimeout` is 10 s) before it is killed.
const START_LIMIT: Duration = Duration::from_secs(30);

/// One master's key: (remote user, host, port).
type Key = (String, String, u16);

/// The control socket path ansible uses by default for (host, port, user) under `dir`.
pub fn control_path(dir: &Path, host: &str, port: u16, user: &str) -> PathBuf {
    let digest = Sha1::digest(format!("{host}-{port}-{user}").as_bytes());
    dir.join(&hex::encode(digest)[..10])
}

/// A master being started: the foreground ssh, which exits once the master is up (it daemonizes,
/// `ControlPersist`) or has failed.
struct Starting {
    child: Child,
    socket: PathBuf,
    since: Instant,
}

/// A master that is up.
struct Master {
    socket: PathBuf,
    /// The daemon's pid (reaped when it ends; the agent is its subreaper); unknown for one an
    /// earlier agent started.
    pid: Option<i32>,
    /// When a task last asked for it (least recently used is stopped first).
    used: Instant,
}

/// The connections actor.
pub struct Connections {
    settings: Arc<Settings>,
    dir: PathBuf,
    run_as: Option<RunAs>,
    log: Logger,
    starting: HashMap<Key, Starting>,
    /// Masters waiting for a turn to start (at most `max_forks` start at once), in order.
    waiting: VecDeque<Key>,
    waiting_keys: HashSet<Key>,
    /// Masters up, by key.
    up: HashMap<Key, Master>,
    /// Masters asked to stop, by pid, until they have ended and been reaped.
    stopping: Vec<i32>,
    /// Sockets of masters that could not be started, since their last start, and when: tasks
    /// waiting for them stop waiting. Kept for `WARM_WAIT`, as long as a task may wait.
    failed: Arc<Mutex<HashMap<PathBuf, Instant>>>,
}

impl Connections {
    /// Masters with their sockets in `dir` (created 0700, owned by `run_as` when set).
    pub fn new(
        settings: Arc<Settings>,
        dir: PathBuf,
        run_as: Option<RunAs>,
        log: Logger,
    ) -> Connections {
        Connections {
            settings,
            dir,
            run_as,
            log,
            starting: HashMap::new(),
            waiting: VecDeque::new(),
            waiting_keys: HashSet::new(),
            up: HashMap::new(),
            stopping: Vec::new(),
            failed: Arc::default(),
        }
    }

    /// Most masters being started at once.
    fn max_starting(&self) -> usize {
        self.settings.max_forks.max(1) as usize
    }

    /// The environment of ssh: the agent's own essentials, `HOME` of `run_as_user` when set.
    fn ssh(&self) -> Spawn {
        let mut cmd = Spawn::new("ssh");
        for var in ["PATH", "HOME", "USER", "LOGNAME", "SSH_AUTH_SOCK"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        if let Some(r) = &self.run_as {
            cmd.run_as(r.uid.as_raw(), r.gid.as_raw())
                .env("HOME", &r.home);
        }
        cmd.current_dir("/").nice(self.settings.task_nice);
        cmd
    }

    /// The ssh command of a master for `key`: it authenticates, then goes to the background and
    /// closes itself after `ssh_idle_secs` without clients, even if the agent is gone by then. It
    /// runs in a session of its own (every spawn does): no task's process group signal reaches it.
    fn master_command(&self, key: &Key, socket: &Path) -> Spawn {
        let (user, host, port) = key;
        let s = &self.settings;
        let mut cmd = self.ssh();
        cmd.arg("-M")
            .arg("-N")
            .arg("-C")
            .arg("-o")
            .arg("ControlMaster=yes")
            .arg("-o")
            .arg(format!("ControlPersist={}", s.ssh_idle_secs))
            .arg("-o")
            .arg(format!("ControlPath={}", socket.display()));
        for opt in [
            "BatchMode=yes",
            "ConnectTimeout=10",
            "ServerAliveInterval=15",
            "ServerAliveCountMax=3",
        ] {
            cmd.arg("-o").arg(opt);
        }
        cmd.arg("-p").arg(port.to_string());
        if !s.ssh_private_key.is_empty() {
            cmd.arg("-i").arg(&s.ssh_private_key);
        }
        for a in split_args(&s.ssh_common_args) {
            cmd.arg(a);
        }
        cmd.arg("-l").arg(user).arg("--").arg(host);
        cmd
    }

    /// `ssh -O <op>` on the master at `socket`: its exit status and what it printed.
    fn control(
        &self,
        op: &str,
        socket: &Path,
        host: &str,
    ) -> std::io::Result<(ExitStatus, String)> {
        let (mut read, write) = std::io::pipe()?;
        let mut cmd = self.ssh();
        cmd.arg("-O")
            .arg(op)
            .arg("-o")
            .arg(format!("ControlPath={}", socket.display()))
            .arg(host)
            .output(std::fs::File::from(std::os::fd::OwnedFd::from(write)));
        let mut child = cmd.spawn()?;
        // The write end lives only in the child now: the read ends when it exits.
        drop(cmd);
        let mut text = String::new();
        (&mut read).take(64 * 1024).read_to_string(&mut text).ok();
        Ok((child.wait_blocking()?, text))
    }

    /// Starts the master for `key` (its turn has come); false if it could not be started.
    fn start(&mut self, key: Key) -> bool {
        let socket = control_path(&self.dir, &key.1, key.2, &key.0);
        match self.master_command(&key, &socket).spawn() {
            Ok(child) => {
                debug!(self.log, "starting an ssh master"; "host" => &key.1, "user" => &key.0);
                self.failed_now(&socket, false);
                self.starting.insert(
                    key,
                    Starting {
                        child,
                        socket,
                        since: Instant::now(),
                    },
                );
                true
            }
            Err(e) => {
                warn!(self.log, "cannot start an ssh master"; "host" => &key.1, "error" => %e);
                self.failed_now(&socket, true);
                false
            }
        }
    }

    /// Notes that the master at `socket` failed (tasks waiting for it go on), or is being started.
    fn failed_now(&self, socket: &Path, failed: bool) {
        let mut set = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed {
            set.insert(socket.to_owned(), Instant::now());
        } else {
            set.remove(socket);
        }
    }

    /// Starts waiting masters while fewer than `max_forks` are starting.
    fn start_waiting(&mut self) {
        while self.starting.len() < self.max_starting() {
            let Some(key) = self.waiting.pop_front() else {
                break;
            };
            self.waiting_keys.remove(&key);
            self.start(key);
        }
    }

    /// Starts the masters missing for `start` (the first nodes of a task); the sockets to wait
    /// for, and the agent's sockets for every key of `all` it has or is starting a master for.
    fn take(&mut self, start: &[Key], all: &[Key]) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let mut wait = Vec::new();
        for key in start {
            let socket = control_path(&self.dir, &key.1, key.2, &key.0);
            if self.starting.contains_key(key) || self.waiting_keys.contains(key) {
                wait.push(socket);
                continue;
            }
            if let Some(m) = self.up.get_mut(key) {
                if m.socket.exists() {
                    continue;
                }
            }
            if socket.exists() {
                // Up (an earlier agent's, still warm), or left by a master that is gone (a crash):
                // a dead socket refuses.
                if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    self.up.insert(
                        key.clone(),
                        Master {
                            socket,
                            pid: None,
                            used: Instant::now(),
                        },
                    );
                    continue;
                }
                if let Err(e) = std::fs::remove_file(&socket) {
                    warn!(self.log, "cannot remove the dead socket of an ssh master"; "path" => socket.display().to_string(), "error" => %e);
                    continue;
                }
            }
            wait.push(socket);
            self.waiting_keys.insert(key.clone());
            self.waiting.push_back(key.clone());
        }
        let now = Instant::now();
        let mut links = Vec::new();
        for key in all {
            if let Some(m) = self.up.get_mut(key) {
                m.used = now;
                links.push(m.socket.clone());
            } else if let Some(st) = self.starting.get(key) {
                links.push(st.socket.clone());
            } else if self.waiting_keys.contains(key) {
                links.push(control_path(&self.dir, &key.1, key.2, &key.0));
            }
        }
        self.evict(start);
        self.start_waiting();
        (wait, links)
    }

    /// Past `max_ssh_masters` (up, starting and waiting), asks the least recently used masters
    /// that are up, other than those of `keep`, to stop.
    fn evict(&mut self, keep: &[Key]) {
        let held = self.up.len() + self.starting.len() + self.waiting.len();
        let over = held.saturating_sub(self.settings.max_ssh_masters);
        if over == 0 {
            return;
        }
        let mut old: Vec<(Instant, Key)> = self
            .up
            .iter()
            .filter(|(k, _)| !keep.contains(k))
            .map(|(k, m)| (m.used, k.clone()))
            .collect();
        old.sort();
        for (_, key) in old.into_iter().take(over) {
            let Some(m) = self.up.remove(&key) else {
                continue;
            };
            debug!(self.log, "stopping the least recently used ssh master"; "host" => &key.1);
            match self.control("stop", &m.socket, &key.1) {
                Ok((status, _)) if status.success() => {}
                Ok((status, text)) => {
                    warn!(self.log, "an ssh master did not stop (it closes itself when idle)"; "host" => &key.1, "status" => %status, "answer" => text.trim());
                }
                Err(e) => {
                    warn!(self.log, "cannot stop an ssh master (it closes itself when idle)"; "host" => &key.1, "error" => %e);
                }
            }
            // The daemon ends once its sessions have: the sweep reaps it then.
            if let Some(pid) = m.pid {
                self.stopping.push(pid);
            }
        }
    }

    /// Notes masters that came up or failed, and starts waiting ones in their place.
    fn poll_starting(&mut self) {
        if self.starting.is_empty() {
            return;
        }
        let log = self.log.clone();
        let mut came_up = Vec::new();
        let mut failed = Vec::new();
        self.starting.retain(|key, st| match st.child.try_wait() {
            Ok(None) if st.since.elapsed() < START_LIMIT => true,
            Ok(None) => {
                // Still in the foreground: not up (a good master daemonizes and this ssh exits),
                // perhaps a plain connection for good because its socket was taken.
                warn!(log, "an ssh master did not come up in time, killing it (its tasks connect directly)";
                      "host" => &key.1, "after_secs" => START_LIMIT.as_secs());
                if let Err(e) = st.child.kill() {
                    warn!(log, "cannot kill an ssh master being started"; "host" => &key.1, "error" => %e);
                }
                failed.push(st.socket.clone());
                false
            }
            Ok(Some(status)) => {
                if status.success() && st.socket.exists() {
                    came_up.push((key.clone(), st.socket.clone()));
                } else {
                    info!(log, "an ssh master could not be started (its tasks connect directly)";
                          "host" => &key.1, "status" => %status);
                    failed.push(st.socket.clone());
                }
                false
            }
            Err(e) => {
                warn!(log, "lost track of an ssh master being started"; "host" => &key.1, "error" => %e);
                failed.push(st.socket.clone());
                false
            }
        });
        for socket in failed {
            self.failed_now(&socket, true);
        }
        for (key, socket) in came_up {
            let pid = self.master_pid(&socket, &key.1);
            let used = Instant::now();
            self.up.insert(key, Master { socket, pid, used });
        }
        self.start_waiting();
    }

    /// The pid of the master listening on `socket` (`ssh -O check` says `Master running (pid=N)`).
    fn master_pid(&self, socket: &Path, host: &str) -> Option<i32> {
        let (_, text) = match self.control("check", socket, host) {
            Ok(answer) => answer,
            Err(e) => {
                warn!(self.log, "cannot ask an ssh master its pid"; "host" => host, "error" => %e);
                return None;
            }
        };
        let start = text.find("pid=")? + 4;
        text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    }

    /// Notes masters that came up or failed, and reaps those that ended (idle, or their node
    /// went away).
    fn sweep(&mut self) {
        self.poll_starting();
        let log = self.log.clone();
        self.up.retain(|key, m| {
            if m.socket.exists() {
                return true;
            }
            debug!(log, "an ssh master ended"; "host" => &key.1);
            if let Some(pid) = m.pid {
                crate::exec::procs::reap(&[pid]);
            }
            false
        });
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, at| at.elapsed() < WARM_WAIT);
        if !self.stopping.is_empty() {
            crate::exec::procs::reap(&self.stopping);
            self.stopping
                .retain(|pid| Path::new(&format!("/proc/{pid}")).exists());
        }
    }
}

/// ssh options from a settings string, split as a POSIX shell would (shlex); settings validation
/// has refused a string that does not split.
pub fn split_args(text: &str) -> Vec<String> {
    shlex::split(text).unwrap_or_default()
}

impl Actor for Connections {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Masters of an agent that died: those up serve on (they close when idle); those it was
        // still starting, or that never got their socket, would live on as plain connections.
        let left: Vec<i32> = crate::exec::procs::ssh_masters(&self.dir)
            .into_iter()
            .filter(|(pid, socket)| self.master_pid(socket, "left") != Some(*pid))
            .map(|(pid, _)| pid)
            .collect();
        if !left.is_empty() {
            info!(self.log, "killing ssh masters a previous run left half started"; "count" => left.len());
            crate::exec::procs::kill_now(&left);
        }
        ctx.run_interval(SWEEP, |act, _| act.sweep());
        ctx.run_interval(POLL_STARTING, |act, _| act.poll_starting());
    }
}

/// Make sure masters for the first nodes of a task are up (starting the missing ones); answers
/// once they are, or after a short wait (a task never waits long for a warm start), with the
/// agent's sockets the task may use (see [`crate::ansible::rundir::link_masters`]).
#[derive(Message)]
#[rtype(result = "Vec<PathBuf>")]
pub struct Acquire {
    pub user: String,
    pub hosts: Vec<String>,
    /// The task's forks: how many of its nodes ansible reaches at once.
    pub forks: u32,
}

impl Handler<Acquire> for Connections {
    type Result = ResponseFuture<Vec<PathBuf>>;
    fn handle(&mut self, msg: Acquire, _: &mut Context<Self>) -> Self::Result {
        let port = self.settings.ssh_port;
        let all: Vec<Key> = msg
            .hosts
            .into_iter()
            .map(|h| (msg.user.clone(), h, port))
            .collect();
        let first = (msg.forks.max(1) as usize).min(self.settings.max_ssh_masters);
        let (wait, links) = self.take(&all[..first.min(all.len())], &all);
        let failed = self.failed.clone();
        Box::pin(async move {
            let deadline = Instant::now() + WARM_WAIT;
            let pending = |s: &PathBuf| {
                !s.exists()
                    && !failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains_key(s)
            };
            while Instant::now() < deadline && wait.iter().any(pending) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            links
        })
    }
}

/// The socket of the master for (user, host) if it is up.
pub fn live_socket(dir: &Path, host: &str, port: u16, user: &str) -> Option<PathBuf> {
    let path = control_path(dir, host, port, user);
    path.exists().then_some(path)
}

/// At shutdown: with no task left running, close every master now; otherwise leave them to
/// close themselves when idle (tasks left to the next start keep their sessions).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAll {
    pub tasks_left: bool,
}

impl Handler<CloseAll> for Connections {
    type Result = ();
    fn handle(&mut self, msg: CloseAll, _: &mut Context<Self>) {
        self.sweep();
        if msg.tasks_left {
            return;
        }
        self.waiting.clear();
        self.waiting_keys.clear();
        let up: Vec<_> = self.up.drain().collect();
        for (key, Master { socket, pid, .. }) in up {
            if let Err(e) = self.control("exit", &socket, &key.1) {
                warn!(self.log, "cannot close an ssh master (it closes itself when idle)"; "host" => &key.1, "error" => %e);
            }
            if let Some(pid) = pid {
                std::thread::sleep(Duration::from_millis(20));
                crate::exec::procs::reap(&[pid]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_path_is_ansibles_default() {
        // ansible: sha1("127.0.0.2-2201-root").hexdigest()[:10]
        let p = control_path(Path::new("/cp"), "127.0.0.2", 2201, "root");
        assert_eq!(p, Path::new("/cp/80b42a6e30"));
        assert_ne!(
            p,
            control_path(Path::new("/cp"), "127.0.0.2", 2201, "ansible")
        );
    }

    #[test]
    fn splits_ssh_options_like_a_shell() {
        assert_eq!(
            split_args("-o UserKnownHostsFile=/dev/null  -o 'ProxyCommand=ssh -W %h:%p j'"),
            [
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ProxyCommand=ssh -W %h:%p j"
            ]
        );
        assert!(split_args("  ").is_empty());
    }
}
