//! A task's run directory: the files `ansible-playbook` runs on (its command line is
//! `exec::command`'s).
//!
//! ```text
//! <root> = <run_dir>/<agent_name>: the agent's own run-directory root
//! <root>/.plugins/downlink_events.py   the callback plugin (written at start)
//! <root>/.ansible/                     ANSIBLE_HOME shared by all tasks
//! <root>/<task id>/inventory.yml       exactly the task's nodes, connection variables
//!                     playbook.yml        the playbook, or a play importing tasks.yml
//!                     tasks.yml           a task list, verbatim
//!                     extra_vars.json     params as a JSON object
//!                     ansible.cfg         downlink's ansible defaults (see ANSIBLE_CFG)
//!                     events.jsonl        written by the callback plugin
//!                     output.log          ansible's own output (stdout and stderr)
//!                     end.json            the verdict, written just before it is sent to the database
//!                     remote-mark         the task's mark on its nodes (DOWNLINK_TASK=<mark>)
//!                     fenced              why the task's watchdog ended it (the agent's lease ran out)
//!                     tmp/                ansible's local temp files
//!                     cp/                 the task's SSH control sockets: links to the agent's
//!                                         masters, and the task's own (exec::connections)
//! <root>/.cp/                          the agent's SSH control sockets (exec::connections)
//! <root>/.lease                        touched at every heartbeat renewed (shared_queue): each
//!                                      task's watchdog ends the task when it grows too old
//! ```

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;

use nix::unistd::{chown, Gid, Uid};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::playbook::{classify, Shape, TASK_LIST_WRAPPER};
use super::{CALLBACK_NAME, CALLBACK_PLUGIN};
use crate::settings::Settings;

/// Files of one task's run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// The run directory of task `id` under the (absolute) root.
    pub fn of(root: &Path, id: i64) -> RunDir {
        RunDir {
            path: root.join(id.to_string()),
        }
    }

    /// Where the callback plugin writes events.
    pub fn events(&self) -> PathBuf {
        self.path.join("events.jsonl")
    }

    /// ansible's own output.
    pub fn output(&self) -> PathBuf {
        self.path.join("output.log")
    }

    /// The params, as ansible's `-e @extra_vars.json`.
    pub fn extra_vars(&self) -> PathBuf {
        self.path.join("extra_vars.json")
    }

    /// The verdict file (see `task::EndFile`).
    pub fn verdict(&self) -> PathBuf {
        self.path.join("end.json")
    }

    /// The file holding the task's mark on its nodes.
    pub fn remote_mark(&self) -> PathBuf {
        self.path.join("remote-mark")
    }

    /// Written by the task's watchdog when it ended the task (the agent's lease ran out): why.
    pub fn fenced(&self) -> PathBuf {
        self.path.join("fenced")
    }

    /// The task's SSH control-socket directory (`ANSIBLE_SSH_CONTROL_PATH_DIR`).
    pub fn control_dir(&self) -> PathBuf {
        self.path.join("cp")
    }

    /// The value of the task's process marker.
    pub fn mark(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }
}

/// Who owns a run directory when `ansible-playbook` runs as another user (`run_as_user`).
pub type Owner = (Uid, Gid);

/// Makes the run-directory root absolute and writes the callback plugin into it.
pub fn install(root: &Path, owner: Option<Owner>) -> io::Result<PathBuf> {
    fs::create_dir_all(root)?;
    let root = root.canonicalize()?;
    if root.as_os_str().len() > MAX_ROOT_LEN {
        return Err(io::Error::other(format!(
            "{} is too long for ssh's control sockets ({} bytes; at most {MAX_ROOT_LEN}: a task's \
             socket <root>/<id>/cp/<10 hex>.<16 chars> must fit the 107 bytes of a Unix socket \
             path): choose a shorter run_dir or agent_name",
            root.display(),
            root.as_os_str().len()
        )));
    }
    let plugins = root.join(".plugins");
    fs::create_dir_all(&plugins)?;
    fs::create_dir_all(root.join(".ansible"))?;
    let cp = control_dir(&root);
    fs::create_dir_all(&cp)?;
    fs::set_permissions(&cp, fs::Permissions::from_mode(0o700))?;
    fs::write(plugins.join(format!("{CALLBACK_NAME}.py")), CALLBACK_PLUGIN)?;
    if let Some((uid, gid)) = owner {
        // ansible's home (caches, collections) and the control sockets must be the playbook user's.
        chown(&root.join(".ansible"), Some(uid), Some(gid)).map_err(io::Error::from)?;
        chown(&cp, Some(uid), Some(gid)).map_err(io::Error::from)?;
    }
    Ok(root)
}

/// The longest run-directory root: a Unix socket path holds 107 bytes, and ssh binds a master's
/// socket first as `<socket>.<16 random characters>`; a task's socket is
/// `<root>/<id up to 12 digits>/cp/<10 hex digits>`.
const MAX_ROOT_LEN: usize = 107 - (1 + 12 + 4 + 10 + 17);

/// The agent's SSH control-socket directory under its run-directory root.
pub fn control_dir(root: &Path) -> PathBuf {
    root.join(".cp")
}

/// The agent's lease file: its modification time is the last heartbeat this agent renewed.
pub fn lease_file(root: &Path) -> PathBuf {
    root.join(".lease")
}

/// Marks the lease renewed now (creates the file the first time).
pub fn renew_lease(root: &Path) -> io::Result<()> {
    let path = lease_file(root);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    file.set_modified(std::time::SystemTime::now())
}

/// What a run directory is made from.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    pub nodes: &'a [String],
    pub remote_user: &'a str,
    pub content: &'a str,
    pub params: &'a Map<String, Value>,
    /// The agent's SSH masters the task may use (`exec::connections::Acquire`).
    pub masters: &'a [PathBuf],
}

/// Writes the run directory of a task (replacing any left from an earlier database), owned by
/// `owner` if there is one.
pub fn prepare(
    settings: &Settings,
    dir: &RunDir,
    job: &Job<'_>,
    mark: &str,
    owner: Option<Owner>,
) -> io::Result<()> {
    if dir.path.exists() {
        fs::remove_dir_all(&dir.path)?;
    }
    fs::create_dir_all(dir.path.join("tmp"))?;
    fs::write(dir.remote_mark(), mark)?;
    fs::write(
        dir.path.join("inventory.yml"),
        inventory(settings, job.nodes, job.remote_user).to_string(),
    )?;
    match classify(job.content) {
        Ok(Shape::TaskList) => {
            fs::write(dir.path.join("tasks.yml"), job.content)?;
            fs::write(dir.path.join("playbook.yml"), TASK_LIST_WRAPPER)?;
        }
        // Validated before the task was stored; a playbook that no longer parses is ansible's to report.
        Ok(Shape::Playbook) | Err(_) => fs::write(dir.path.join("playbook.yml"), job.content)?,
    }
    fs::write(
        dir.extra_vars(),
        Value::Object(job.params.clone()).to_string(),
    )?;
    fs::write(dir.path.join("ansible.cfg"), ANSIBLE_CFG)?;
    link_masters(&dir.control_dir(), job.masters)?;
    fs::write(dir.events(), b"")?;
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.output())?;
    // The run directory holds the extra vars (often secrets): owner only.
    let owner = |path: &Path| match owner {
        Some((uid, gid)) => chown(path, Some(uid), Some(gid)).map_err(io::Error::from),
        None => Ok(()),
    };
    for entry in fs::read_dir(&dir.path)? {
        let entry = entry?;
        let mode = if entry.file_type()?.is_dir() {
            0o700
        } else {
            0o600
        };
        fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode))?;
        owner(&entry.path())?;
    }
    fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o700))?;
    owner(&dir.path)?;
    Ok(())
}

/// The task's control directory, with a link named as ansible names a node's socket to each agent
/// master the task may use (the names are the same hash in both directories), so that the task's
/// ssh (`ControlMaster=auto`) multiplexes over the agent's master instead of starting its own.
pub fn link_masters(control_dir: &Path, masters: &[PathBuf]) -> io::Result<()> {
    fs::create_dir_all(control_dir)?;
    for socket in masters {
        if let Some(name) = socket.file_name() {
            std::os::unix::fs::symlink(socket, control_dir.join(name))?;
        }
    }
    Ok(())
}

/// `ansible.cfg` in the run directory (ansible reads the working directory's before `~/.ansible.cfg`
/// and `/etc/ansible/ansible.cfg`; `ANSIBLE_CONFIG` in `ansible_env` points it elsewhere).
/// ansible's main process polls its workers every millisecond by default, which with tens of
/// tasks at once keeps both cores busy doing nothing; 20 ms costs a task at most that per result.
pub const ANSIBLE_CFG: &str = "\
# Written by downlink for this task.
[defaults]
internal_poll_interval = 0.02
";

/// The inventory: JSON (which ansible's YAML inventory plugin reads) with exactly the nodes.
pub fn inventory(settings: &Settings, nodes: &[String], user: &str) -> Value {
    let hosts: Map<String, Value> = nodes.iter().map(|n| (n.clone(), json!({}))).collect();
    let mut vars = Map::new();
    vars.insert("ansible_user".into(), json!(user));
    vars.insert("ansible_port".into(), json!(settings.ssh_port));
    if !settings.ssh_private_key.is_empty() {
        vars.insert(
            "ansible_ssh_private_key_file".into(),
            json!(settings.ssh_private_key),
        );
    }
    if !settings.ssh_common_args.is_empty() {
        vars.insert(
            "ansible_ssh_common_args".into(),
            json!(settings.ssh_common_args),
        );
    }
    if !settings.ansible_python_interpreter.is_empty() {
        vars.insert(
            "ansible_python_interpreter".into(),
            json!(settings.ansible_python_interpreter),
        );
    }
    json!({ "all": { "hosts": hosts, "vars": vars } })
}

/// Bytes of the end of `output.log` searched for ansible's error line.
const ERROR_TAIL: u64 = 64 * 1024;

/// The first line that says what went wrong in the last 64 KiB of ansible's output, for `err`:
/// read from the tail, so a huge output costs no more than a small one.
pub fn error_line(output: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = fs::File::open(output).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(ERROR_TAIL)))
        .ok()?;
    let mut tail = Vec::new();
    file.take(ERROR_TAIL).read_to_end(&mut tail).ok()?;
    error_line_in(&crate::store::clean::bytes(&tail))
}

fn error_line_in(output: &str) -> Option<String> {
    output
        .lines()
        .find(|l| l.starts_with("ERROR!") || l.starts_with("[ERROR]"))
        .map(|l| l.chars().take(500).collect())
}

/// Cuts `output.log` back to `limit` bytes if it grew past it; the bytes cut.
///
/// ansible writes it through its own descriptor (O_APPEND), so the file cannot be capped from
/// the writing side; cutting it at every poll keeps it within `limit` plus what one poll interval
/// of output adds. The head is kept: it says what ran.
pub fn bound_output(output: &Path, limit: u64) -> io::Result<u64> {
    let len = fs::metadata(output)?.len();
    if len <= limit {
        return Ok(0);
    }
    fs::OpenOptions::new()
        .write(true)
        .open(output)?
        .set_len(limit)?;
    Ok(len - limit)
}

/// Appends the line that says how much of `output.log` was cut.
pub fn note_output_cut(output: &Path, limit: u64, cut: u64) {
    use std::io::Write;
    if let Ok(mut f) = fs::OpenOptions::new().append(true).open(output) {
        // A note that cannot be written (a full disk) leaves the output as it is.
        writeln!(
            f,
            "\n[downlink] output.log reached max_output_bytes ({limit} bytes): {cut} more bytes of ansible's output were not kept"
        )
        .ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_holds_exactly_the_nodes() {
        let mut s = Settings::defaults();
        s.ssh_private_key = "/k".into();
        s.ansible_python_interpreter = "/usr/bin/python3".into();
        let inv = inventory(&s, &["127.0.0.2".into(), "::1".into()], "root");
        assert_eq!(
            inv,
            json!({"all": {"hosts": {"127.0.0.2": {}, "::1": {}}, "vars": {
                "ansible_user": "root", "ansible_port": 22,
                "ansible_ssh_private_key_file": "/k",
                "ansible_python_interpreter": "/usr/bin/python3"}}})
        );
    }

    #[test]
    fn finds_ansible_error_lines_in_the_tail() {
        assert_eq!(
            error_line_in("x\n[ERROR]: the playbook could not be found\nmore"),
            Some("[ERROR]: the playbook could not be found".into())
        );
        assert_eq!(error_line_in("all good"), None);
        let dir = std::env::temp_dir().join(format!("dl-rundir-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("output.log");
        let mut text = vec![b'.'; 200_000];
        text.extend_from_slice(b"\n\xff\0[ERROR]: no\n[ERROR]: bad \xff thing\n");
        fs::write(&out, &text).unwrap();
        assert_eq!(error_line(&out), Some("[ERROR]: bad \u{FFFD} thing".into()));
    }

    #[test]
    fn output_is_cut_back_to_its_limit() {
        let dir = std::env::temp_dir().join(format!("dl-rundir-cut-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("output.log");
        fs::write(&out, vec![b'a'; 10_000]).unwrap();
        assert_eq!(bound_output(&out, 4096).unwrap(), 10_000 - 4096);
        assert_eq!(bound_output(&out, 4096).unwrap(), 0);
        note_output_cut(&out, 4096, 5904);
        let text = fs::read_to_string(&out).unwrap();
        assert!(text.ends_with("5904 more bytes of ansible's output were not kept\n"));
    }
}
