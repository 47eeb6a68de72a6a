//! The command line of a task: `ansible-playbook` with the task's inventory, forks and extra vars,
//! in its run directory, with the environment downlink sets (and nothing of the server's own),
//! joining the task's cgroup and dropping to `run_as_user` in the child before it execs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

use crate::ansible::rundir::{self, Owner, RunDir};
use crate::ansible::{CALLBACK_NAME, TASK_MARK_VAR};
use crate::exec::cgroup::TaskCgroup;
use crate::exec::spawn::Spawn;
use crate::settings::Settings;

/// The OS user `ansible-playbook` runs as (setting `run_as_user`).
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
}

impl RunAs {
    /// The owner of what this user's playbooks write (run directories, control sockets).
    pub fn owner(&self) -> Owner {
        (self.uid, self.gid)
    }
}

/// Resolves `run_as_user` and `run_as_group`; `None` when unset.
pub fn run_as(settings: &Settings) -> io::Result<Option<RunAs>> {
    if settings.run_as_user.is_empty() {
        return Ok(None);
    }
    let missing = |what: &str, name: &str| io::Error::other(format!("no such {what}: {name}"));
    let user = User::from_name(&settings.run_as_user)
        .map_err(io::Error::from)?
        .ok_or_else(|| missing("user", &settings.run_as_user))?;
    let gid = if settings.run_as_group.is_empty() {
        user.gid
    } else {
        Group::from_name(&settings.run_as_group)
            .map_err(io::Error::from)?
            .ok_or_else(|| missing("group", &settings.run_as_group))?
            .gid
    };
    Ok(Some(RunAs {
        name: user.name,
        uid: user.uid,
        gid,
        home: user.dir,
    }))
}

/// The `ansible-playbook` command of a task: its own session (so its whole process group can be
/// signalled and it does not depend on the server's terminal), a clean environment (the server's
/// own variables, database URL included, never reach a playbook), output into `output.log`.
pub fn command(
    settings: &Settings,
    root: &Path,
    dir: &RunDir,
    forks: u32,
    run_as: Option<&RunAs>,
    cgroup: Option<&TaskCgroup>,
    mark: &str,
) -> io::Result<Spawn> {
    let output = fs::OpenOptions::new().append(true).open(dir.output())?;
    let mut cmd = Spawn::new(&settings.ansible_playbook);
    cmd.current_dir(&dir.path)
        .arg("-i")
        .arg("inventory.yml")
        .arg("--forks")
        .arg(forks.to_string())
        .arg("-e")
        .arg("@extra_vars.json")
        .arg("playbook.yml")
        .output(output);
    for var in ["PATH", "HOME", "USER", "LOGNAME", "SSH_AUTH_SOCK"] {
        if let Ok(v) = std::env::var(var) {
            cmd.env(var, v);
        }
    }
    cmd.env("LANG", "C.UTF-8").env("LC_ALL", "C.UTF-8");
    if let Some(r) = run_as {
        cmd.env("HOME", &r.home)
            .env("USER", &r.name)
            .env("LOGNAME", &r.name);
    }
    // A task's ssh uses the agent's master where the task's control directory links to one,
    // and elsewhere starts a master of its own there, as ansible does by default
    // (exec::connections). An ANSIBLE_SSH_ARGS in ansible_env replaces this.
    cmd.env(
        "ANSIBLE_SSH_ARGS",
        "-C -o ControlMaster=auto -o ControlPersist=60s",
    );
    cmd.envs(&settings.ansible_env);
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    cmd.env("ANSIBLE_CALLBACK_PLUGINS", path(root.join(".plugins")))
        .env("ANSIBLE_CALLBACKS_ENABLED", CALLBACK_NAME)
        .env("ANSIBLE_HOME", path(root.join(".ansible")))
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", path(dir.control_dir()))
        .env("DOWNLINK_REMOTE_MARK", mark)
        .env("ANSIBLE_LOCAL_TEMP", path(dir.path.join("tmp")))
        .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("DOWNLINK_EVENTS_FILE", path(dir.events()))
        .env(
            "DOWNLINK_EVENTS_MAX_BYTES",
            settings.max_events_file_bytes.to_string(),
        )
        .env(TASK_MARK_VAR, dir.mark());
    if settings.shared_queue {
        // The task's own watchdog (in the callback plugin): past this age of the agent's lease,
        // other agents may soon declare this one lost, so the run ends itself.
        cmd.env("DOWNLINK_LEASE_FILE", path(rundir::lease_file(root)))
            .env(
                "DOWNLINK_LEASE_SECS",
                format!("{:.3}", settings.watchdog_after().as_secs_f64()),
            );
    }
    // In the child, before exec: a session of its own, the task's cgroup (joined while still
    // privileged), then the run_as user (exec::spawn).
    if let Some(cg) = cgroup {
        // The watchdog kills the run through it (ansible's workers lead sessions of their own).
        cmd.env("DOWNLINK_TASK_CGROUP", path(cg.path.clone()));
        cmd.join(cg.join_files());
    }
    if let Some(r) = run_as {
        cmd.run_as(r.uid.as_raw(), r.gid.as_raw());
    }
    cmd.nice(settings.task_nice);
    Ok(cmd)
}
