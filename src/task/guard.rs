//! The panic guard: a task actor that goes away without recording its end kills its processes
//! and tells the supervisor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use nix::sys::signal::Signal;

use crate::ansible::rundir::RunDir;
use crate::exec::cgroup::TaskCgroup;
use crate::exec::procs;

use super::TaskReport;

/// Kills every process of the task (its cgroup, and its process group) and tells the supervisor
/// if the actor goes away without having recorded its end (its code panicked). Not when the whole
/// server is shutting down: then the process is left to the next start, which adopts it.
pub(super) struct Guard {
    pub(super) id: i64,
    pub(super) supervisor: Recipient<TaskReport>,
    pub(super) pgid: Option<i32>,
    /// ansible's workers each start a session of their own: only the cgroup holds them all
    /// (without one, they are found by the run directory's mark).
    pub(super) cgroup: Option<TaskCgroup>,
    pub(super) dir: RunDir,
    pub(super) armed: bool,
    pub(super) shutting_down: Arc<AtomicBool>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.armed || self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        match (&self.cgroup, self.pgid) {
            (Some(cg), _) => cg.kill(),
            (None, Some(pgid)) => {
                procs::kill_leftovers(&self.dir.mark(), &self.dir.path, Some(pgid));
            }
            (None, None) => {}
        }
        if let Some(pgid) = self.pgid {
            procs::signal_group(pgid, Signal::SIGKILL);
        }
        self.supervisor.do_send(TaskReport::Lost {
            id: self.id,
            killed: self.pgid.is_some(),
        });
    }
}
