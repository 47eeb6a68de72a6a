//! A run directory that cannot be written ends its task. When the disk under it fills (often the
//! playbook's own doing: a `delegate_to: localhost` writing into `playbook_dir`), ansible-playbook
//! stalls rather than exits, and only the time limit would end it. So every [`CHECK`] the task
//! looks at the disk's free space; under [`PROBE_BELOW`] it tries a write ([`disk::probe`]), and
//! when a second write [`AGAIN`] later fails too with a disk error (full, over quota, read-only,
//! failing), the task is ended as a stop ends it (processes killed here and on the nodes) with
//! status failed and an `err` that names the disk and the path.

use std::time::Duration;

use actix::prelude::*;
use slog::warn;

use super::*;
use crate::disk;

/// How often the run directory's disk is looked at.
const CHECK: Duration = Duration::from_secs(5);
/// Below this much free space, a write is tried.
const PROBE_BELOW: u64 = 1 << 20;
/// The second try after a failed write: a disk that is full for a moment is not yet a reason.
const AGAIN: Duration = Duration::from_secs(1);

/// What the checks have found so far.
#[derive(Debug, Default)]
pub(super) struct DiskState {
    /// A check is on its way.
    checking: bool,
    /// The last write failed with a disk error.
    failed_once: bool,
    /// A failure that is not about the disk was logged already.
    other_logged: bool,
}

impl TaskActor {
    /// Checks the run directory's disk every [`CHECK`] while the task runs.
    pub(super) fn watch_disk(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(CHECK, |act, ctx| act.check_disk(ctx));
    }

    fn check_disk(&mut self, ctx: &mut Context<Self>) {
        if self.ending || self.kill.is_some() || self.disk.checking {
            return;
        }
        self.disk.checking = true;
        let dir = self.dir.path.clone();
        let check = async move {
            tokio::task::spawn_blocking(move || {
                let roomy = disk::space(&dir).is_ok_and(|s| s.free >= PROBE_BELOW);
                if roomy {
                    return Ok(());
                }
                disk::probe(&dir).map_err(|e| {
                    let disk_error = disk::is_disk_error(&e);
                    (e, disk_error, disk::describe(&dir))
                })
            })
            .await
        };
        ctx.spawn(check.into_actor(self).map(|joined, act, ctx| {
            act.disk.checking = false;
            match joined {
                Ok(Ok(())) | Err(_) => act.disk.failed_once = false,
                Ok(Err((e, true, name))) => {
                    if !act.disk.failed_once {
                        act.disk.failed_once = true;
                        ctx.run_later(AGAIN, |act, ctx| act.check_disk(ctx));
                        return;
                    }
                    let err = format!(
                        "the run directory cannot be written: {} on {name}: {e}; the task was ended (its processes killed, its nodes cleaned)",
                        act.dir.path.display()
                    );
                    act.request_kill(Ending::Failed, err, ctx);
                }
                Ok(Err((e, false, _))) => {
                    // Not the disk (the playbook removed or locked its own directory, say): the
                    // task goes on, and its events tell the rest.
                    if !act.disk.other_logged {
                        warn!(act.log, "cannot write into the run directory"; "error" => %e);
                    }
                    act.disk.other_logged = true;
                }
            }
        }));
    }
}
