//! Warm SSH connections, owned by the agent. A task's ssh clients never start a multiplexing
//! master of their own (`ControlMaster=no`): the masters are downlink's, one per (remote user,
//! host, port) — the key is the agent's — started outside every task's cgroup and process group,
//! shared by consecutive and concurrent tasks, and closed when idle for `ssh_idle_secs`, when
//! their connection dies (an unreachable node), and when the server stops for good. A stop kills
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

use crate::ansible::rundir::RunAs;
use crate::settings::Settings;

/// How long a task waits for masters started for it before it starts anyway.
const WARM_WAIT: Duration = Duration::from_millis(1500);
/// How often idle and dead masters are looked for.
const SWEEP: Duration = Duration::from_secs(2);

/// One master's key: (remote user, host, port).
type Key = (String, String, u16);

/// The control socket path ansible uses by default for (host, port, user) under `dir`.
pub fn control_path(dir: &Path, host: &str, port: u16, user: &str) -> PathBuf {
    let digest = Sha1::digest(format!("{host}-{port}-{user}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    dir.join(&hex[..10])
}

struct Master {
    child: tokio::process::Child,
    socket: PathBuf,
    /// Tasks using it now.
    users: u32,
    /// Since when nobody uses it.
    idle_since: Instant,
}

/// The connections actor.
pub struct Connections {
    settings: std::sync::Arc<Settings>,
    dir: PathBuf,
    run_as: Option<RunAs>,
    log: Logger,
    masters: HashMap<Key, Master>,
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
            masters: HashMap::new(),
        }
    }

    /// The ssh command of a master for `key`.
    fn master_command(&self, key: &Key, socket: &Path) -> tokio::process::Command {
        let (user, host, port) = key;
        let s = &self.settings;
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(["-M", "-N", "-C"])
            .args(["-o", "ControlMaster=yes", "-o", "ControlPersist=no"])
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
            .kill_on_drop(false);
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

    /// Takes a master for each key (starting the missing ones); the sockets of new masters.
    fn take(&mut self, keys: Vec<Key>) -> Vec<PathBuf> {
        let mut starting = Vec::new();
        for key in keys {
            if let Some(m) = self.masters.get_mut(&key) {
                m.users += 1;
                continue;
            }
            let socket = control_path(&self.dir, &key.1, key.2, &key.0);
            // A socket left by an earlier run: told to stop taking new sessions (its own go on).
            if socket.exists() {
                let _ = std::fs::remove_file(&socket);
            }
            match self.master_command(&key, &socket).spawn() {
                Ok(child) => {
                    debug!(self.log, "ssh master started"; "host" => &key.1, "user" => &key.0);
                    starting.push(socket.clone());
                    self.masters.insert(
                        key,
                        Master {
                            child,
                            socket,
                            users: 1,
                            idle_since: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    warn!(self.log, "cannot start an ssh master"; "host" => &key.1, "error" => %e)
                }
            }
        }
        starting
    }

    /// Ends masters that died (their node went away) or were idle too long.
    fn sweep(&mut self) {
        let idle = Duration::from_secs(self.settings.ssh_idle_secs);
        let log = self.log.clone();
        self.masters.retain(|key, m| {
            if let Ok(Some(status)) = m.child.try_wait() {
                info!(log, "ssh master ended (connection lost or refused)"; "host" => &key.1, "status" => %status);
                let _ = std::fs::remove_file(&m.socket);
                return false;
            }
            if m.users == 0 && m.idle_since.elapsed() >= idle {
                debug!(log, "closing an idle ssh master"; "host" => &key.1);
                let _ = m.child.start_kill();
                let _ = std::fs::remove_file(&m.socket);
                return false;
            }
            true
        });
    }
}

/// ssh options from a settings string, split on white space (quotes group words).
pub fn split_args(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            (None, c) => word.push(c),
        }
    }
    if any || !word.is_empty() {
        out.push(word);
    }
    out
}

impl Actor for Connections {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(SWEEP, |act, _| act.sweep());
    }
}

/// Take masters for these nodes of a task (user, hosts); answers once new masters are up, or after
/// a short wait (a task never waits long for a warm start).
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
        let starting = self.take(keys);
        Box::pin(async move {
            let deadline = Instant::now() + WARM_WAIT;
            while Instant::now() < deadline && starting.iter().any(|s| !s.exists()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    }
}

/// A task no longer uses its masters.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Release {
    pub user: String,
    pub hosts: Vec<String>,
}

impl Handler<Release> for Connections {
    type Result = ();
    fn handle(&mut self, msg: Release, _: &mut Context<Self>) {
        let port = self.settings.ssh_port;
        for host in msg.hosts {
            if let Some(m) = self.masters.get_mut(&(msg.user.clone(), host, port)) {
                m.users = m.users.saturating_sub(1);
                if m.users == 0 {
                    m.idle_since = Instant::now();
                }
            }
        }
    }
}

/// The socket of the master for (user, host) if it is up.
pub fn live_socket(dir: &Path, host: &str, port: u16, user: &str) -> Option<PathBuf> {
    let path = control_path(dir, host, port, user);
    path.exists().then_some(path)
}

/// At shutdown: close masters nobody uses; tell the others to take no new sessions and end when
/// their last one does (tasks left running go on, and later connect directly).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseAll;

impl Handler<CloseAll> for Connections {
    type Result = ();
    fn handle(&mut self, _: CloseAll, _: &mut Context<Self>) {
        for (key, mut m) in self.masters.drain() {
            if m.users == 0 {
                let _ = m.child.start_kill();
            } else {
                let _ = std::process::Command::new("ssh")
                    .args(["-O", "stop", "-o"])
                    .arg(format!("ControlPath={}", m.socket.display()))
                    .arg(&key.1)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = std::fs::remove_file(&m.socket);
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
