//! At start: carrying out the recovery plan (`recovery::plan` decides it from the rows and run
//! directories): record the ends it decided, adopt what an earlier server left running, and queue
//! its pending tasks again in their original order.

use actix::prelude::*;
use slog::{o, warn};

use super::recovery::Plan;
use super::TaskSupervisor;
use crate::ansible::rundir::RunDir;
use crate::store::persistence::MarkRunning;
use crate::task::Origin;

/// Carry out a recovery plan.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Recover(pub Plan);

impl Handler<Recover> for TaskSupervisor {
    type Result = ();
    fn handle(&mut self, msg: Recover, ctx: &mut Context<Self>) {
        let Plan {
            adopt,
            requeue,
            end,
        } = msg.0;
        for fin in end {
            let log = self.log.new(o!("task_id" => fin.id));
            warn!(log, "ending a task left by an earlier run"; "status" => fin.status.code(), "err" => fin.err.clone());
            if self.settings.remove_extra_vars_at_end {
                let params = RunDir::of(&self.run_root, fin.id).extra_vars();
                match std::fs::remove_file(&params) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        warn!(log, "cannot remove the params file of an ended task"; "path" => params.display().to_string(), "error" => %e)
                    }
                }
            }
            self.record_end(fin, ctx);
        }
        for orphan in adopt {
            let origin = Origin::Adopt {
                pid: orphan.pid,
                start_time: orphan.start_time,
                stored_offset: orphan.stored_offset,
            };
            // Sent before anything the adopted actor writes, so it lands first.
            if let Some(mark) = &orphan.unrecorded_start {
                self.persistence.do_send(mark.clone());
            }
            let started = orphan.unrecorded_start.clone().unwrap_or(MarkRunning {
                task_id: orphan.spec.id,
                nodes: orphan.spec.nodes.clone(),
                started_at: orphan.started_at,
                pid: orphan.pid,
                pid_start_time: orphan.start_time,
                instance: orphan
                    .dir
                    .path
                    .parent()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                forks: orphan.spec.forks,
                remote_mark: None,
            });
            // Adopted with the forks it started with, even above today's budget.
            self.admission.charge(orphan.spec.forks);
            self.start_task(
                orphan.spec,
                orphan.started_at,
                origin,
                orphan.dir,
                Some(started),
                ctx,
            );
        }
        for spec in requeue {
            self.slots.force_take();
            self.admission.push(spec);
        }
        self.admit(ctx);
    }
}
