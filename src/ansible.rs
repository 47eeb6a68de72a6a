//! Ansible integration: what a request's playbook and params may look like, the run directory and
//! command line of one task, and the event stream its callback plugin writes.
//!
//! Nothing from a request reaches a shell: the playbook, inventory and extra vars go into files,
//! everything else into argv and the environment of `ansible-playbook`.

pub mod events;
pub mod params;
pub mod playbook;
pub mod rundir;
pub mod tail;

/// The callback plugin, shipped inside the binary.
pub const CALLBACK_PLUGIN: &str = include_str!("ansible/downlink_events.py");
/// Its name, for `ANSIBLE_CALLBACKS_ENABLED`.
pub const CALLBACK_NAME: &str = "downlink_events";
/// The environment variable every process of a task inherits: its value is the task's run
/// directory, so the task's processes can be found in `/proc` even after they leave its process
/// group (an SSH ControlPersist master does).
pub const TASK_MARK_VAR: &str = "DOWNLINK_TASK_MARK";
