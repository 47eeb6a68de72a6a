//! The execution layer: what a task is on this machine and on its nodes, owned by downlink.
//!
//! - [`cgroup`]: a task is a cgroup v2; everything it starts here is found, signalled, killed and
//!   measured (CPU, peak memory) through it, and its end waits until the cgroup is empty.
//! - [`connections`]: the agent's SSH multiplexing masters, warm across tasks, outside every task.
//! - [`remote`]: the mark every process of a task carries on its nodes, and the cleanup that ends
//!   them after a stop or a time limit.
//! - [`spawn`]: starting a task's process with `clone(CLONE_VM | CLONE_VFORK)`, never a fork of
//!   the server.
//!
//! The TaskActor asks this layer to start, signal and clean; nothing else touches processes.

pub mod procs;

pub mod cgroup;
pub mod command;
pub mod connections;
pub mod remote;
pub mod spawn;

use std::path::PathBuf;

use actix::Addr;

use cgroup::Cgroups;
use connections::Connections;

/// How a task's local processes are tracked.
#[derive(Debug, Clone)]
pub enum Tracking {
    /// Each task is a cgroup v2.
    Cgroup(Cgroups),
    /// No writable cgroup v2: processes are found by the environment marker every process of the
    /// task inherits, and by their command line naming the task's run directory.
    Fallback(String),
}

impl Tracking {
    /// What `/readyz` and the start-up log say.
    pub fn describe(&self) -> String {
        match self {
            Tracking::Cgroup(c) => c.describe(),
            Tracking::Fallback(why) => format!(
                "fallback: no writable cgroup v2 ({why}); processes are found by their environment marker and command line"
            ),
        }
    }

    /// The cgroups, in cgroup mode.
    pub fn cgroups(&self) -> Option<&Cgroups> {
        match self {
            Tracking::Cgroup(c) => Some(c),
            Tracking::Fallback(_) => None,
        }
    }
}

/// What every TaskActor shares.
#[derive(Clone)]
pub struct Exec {
    pub tracking: Tracking,
    pub connections: Addr<Connections>,
    /// Where the agent's SSH control sockets live (`ANSIBLE_SSH_CONTROL_PATH_DIR`).
    pub control_dir: PathBuf,
    /// Kills and run times are counted here.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}
