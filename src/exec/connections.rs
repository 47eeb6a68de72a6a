//! Warm SSH connections, owned by the agent. A task's ssh clients never start a multiplexing
//! master of their own (`ControlMaster=no`): the masters are downlink's, one per (remote user,
//! host, port) — the key is the agent's — started outside every task's cgroup and process group,
//! shared by consecutive and concurrent tasks, and closed when idle for `ssh_idle_secs`, when
//! their connection dies (an unreachable node), and when the server stops for good. They close
//! themselves when idle (`ControlPersist`), so even a crashed agent leaks none for long. A stop kills
//! the task's own multiplexed clients (they are in its cgroup) and never a master, so no other
//! task loses its connection.
//!
//! The control socket of a master is where ansible looks by default: `<control dir>/<first ten
//! hex digits of sha1("host-port-user")>` under `ANSIBLE_SSH_CONTROL_PATH_DIR`, which downlink
//! sets to `<run root>/.cp` (0700, owned by `run_as_user` when set). With `ControlMaster=no` a
//! task's ssh uses a master when its socket is there and connects directly when it is not, so a
//! master that is not up yet (or failed) costs a task nothing but the warm start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use actix::prelude::*;
use sha1::{Digest, Sha1};
use slog::{debug, info, warn, Logger};

use crate::exec::command::RunAs;
use crate::settings::Settings;

/// How long a task waits for masters started for it before it starts anyway.
const WARM_WAIT: Duration = Duration::from_millis(1500);
/// How often idle and dead masters are looked for.
const SWEEP: Duration = Duration::from_millis(500);

/// One master's key: (remote user, host, port).
type Key = (String, String, u16);

/// The control socket path ansible uses by default for (host, port, user) under `dir`.
pub fn control_path(dir: &Path, host: &str, port: u16, user: &str) -> PathBuf {
    let digest = Sha1::digest(format!("{host}-{port}-{user}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(&hex[..10])
}

/// A master being started: the foreground ssh, which exits once the master is up (it daemonizes,
/// `ControlPersist`) or has failed.
struct Starting {
    child: tokio::process::Child,
    socket: PathBuf,
}

/// The connections actor.
pub struct Connections {
    settings: std::sync::Arc<Settings>,
    dir: PathBuf,
    run_as: Option<RunAs>,
    log: Logger,
    starting: HashMap<Key, Starting>,
    /// Masters up, by key: the daemon's pid (reaped when it ends; the agent is its subreaper).
    up: HashMap<Key, (PathBuf, Option<i32>)>,
}

impl Connections {
    /// Masters with their sockets in `dir` (created 0700, owned by `run_as` when set).
    pub fn new(
        settings: std::sync::Arc<Settings>,
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
            up: HashMap::new(),
        }
    }

    /// The ssh command of a master for `key`: it authenticates, then goes to the background and
    /// closes itself after `ssh_idle_secs` without clients, even if the agent is gone by then.
    fn master_command(&self, key: &Key, socket: &Path) -> tokio::process::Command {
        let (user, host, port) = key;
        let s = &self.settings;
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(["-M", "-N", "-C", "-o", "ControlMaster=yes"])
            .arg("-o")
            .arg(format!("ControlPersist={}", s.ssh_idle_secs))
            .arg("-o")
            .arg(format!("ControlPath={}", socket.display()))
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"])
            .args([
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ServerAliveCountMax=3",
            ])
            .arg("-p")
            .arg(port.to_string());
        if !s.ssh_private_key.is_empty() {
            cmd.arg("-i").arg(&s.ssh_private_key);
        }
        cmd.args(split_args(&s.ssh_common_args))
            .arg("-l")
            .arg(user)
            .arg("--")
            .arg(host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env_clear()
            .kill_on_drop(true);
        for var in ["PATH", "HOME", "USER", "LOGNAME", "SSH_AUTH_SOCK"] {
            if let Ok(v) = std::env::var(var) {
                cmd.env(var, v);
            }
        }
        if let Some(r) = &self.run_as {
            cmd.uid(r.uid.as_raw())
                .gid(r.gid.as_raw())
                .env("HOME", &r.home);
        }
        // Its own session: no task's process group signal reaches it.
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        cmd
    }

    /// Starts the masters missing for these keys; the sockets to wait for.
    fn take(&mut self, keys: Vec<Key>) -> Vec<PathBuf> {
        let mut wait = Vec::new();
        for key in keys {
            let socket = control_path(&self.dir, &key.1, key.2, &key.0);
            if self.starting.contains_key(&key) {
                wait.push(socket);
                continue;
            }
            if socket.exists() {
                // Up, or left by a master that is gone (a crash): a dead socket refuses.
                if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    continue;
                }
                let _ = std::fs::remove_file(&socket);
            }
            match self.master_command(&key, &socket).spawn() {
                Ok(child) => {
                    debug!(self.log, "starting an ssh master"; "host" => &key.1, "user" => &key.0);
                    wait.push(socket.clone());
                    self.starting.insert(key, Starting { child, socket });
                }
                Err(e) => {
                    warn!(self.log, "cannot start an ssh master"; "host" => &key.1, "error" => %e)
                }
            }
        }
        wait
    }

    /// Notes masters that came up or failed, and reaps those that ended (idle, or their node
    /// went away).
    fn sweep(&mut self) {
        let log = self.log.clone();
        let mut came_up = Vec::new();
        self.starting.retain(|key, st| match st.child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                if status.success() && st.socket.exists() {
                    came_up.push((key.clone(), st.socket.clone()));
                } else {
                    info!(log, "an ssh master could not be started (its tasks connect directly)";
                          "host" => &key.1, "status" => %status);
                }
                false
            }
            Err(_) => false,
        });
        for (key, socket) in came_up {
            let pid = master_pid(&socket, &key.1);
            self.up.insert(key, (socket, pid));
        }
        self.up.retain(|key, (socket, pid)| {
            if socket.exists() {
                return true;
            }
            debug!(log, "an ssh master ended"; "host" => &key.1);
            if let Some(pid) = pid {
                crate::exec::procs::reap(&[*pid]);
            }
            false
        });
    }
}

/// The pid of the master listening on `socket` (`ssh -O check` says `Master running (pid=N)`).
fn master_pid(socket: &Path, host: &str) -> Option<i32> {
    let out = std::process::Command::new("ssh")
        .args(["-O", "check", "-o"])
        .arg(format!("ControlPath={}", socket.display()))
        .arg(host)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let start = text.find("pid=")? + 4;
    text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// ssh options from a settings string, split as a POSIX shell would (shlex); settings validation
/// has refused a string that does not split.
pub fn split_args(text: &str) -> Vec<String> {
    shlex::split(text).unwrap_or_default()
}

impl Actor for Connections {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(SWEEP, |act, _| act.sweep());
    }
}

/// Make sure masters for these nodes of a task are up (starting the missing ones); answers once
/// they are, or after a short wait (a task never waits long for a warm start).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Acquire {
    pub user: String,
    pub hosts: Vec<String>,
}

impl Handler<Acquire> for Connections {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: Acquire, _: &mut Context<Self>) -> Self::Result {
        let port = self.settings.ssh_port;
        let keys = msg
            .hosts
            .into_iter()
            .map(|h| (msg.user.clone(), h, port))
            .collect();
        let wait = self.take(keys);
        Box::pin(async move {
            let deadline = Instant::now() + WARM_WAIT;
            while Instant::now() < deadline && wait.iter().any(|s| !s.exists()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
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
        for (key, (socket, pid)) in self.up.drain() {
            let _ = std::process::Command::new("ssh")
                .args(["-O", "exit", "-o"])
                .arg(format!("ControlPath={}", socket.display()))
                .arg(&key.1)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
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
