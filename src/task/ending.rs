//! Ending a task: stop and time-limit kills, draining the rest of its events, cleaning its
//! nodes, and recording the end (`end.json`, then Persistence, then the supervisor).
use std::time::Duration;

use actix::prelude::*;
use nix::sys::signal::Signal;
use slog::{error, info, warn};

use super::verdict::{verdict, Exit, Verdict};
use crate::ansible::events::Ending;
use crate::ansible::rundir::{self};
use crate::exec::procs;
use crate::exec::remote::{self};
use crate::status::Status;
use crate::store::persistence::FinishTask;
use crate::store::{Finish, Usage};
use crate::time;

use super::*;

impl TaskActor {
    /// Sends SIGTERM to every process of the task now (its cgroup, and its process group) and
    /// kills them all after the grace period.
    pub(super) fn terminate(&mut self, ctx: &mut Context<Self>) {
        let Some(pgid) = self.pgid else {
            return;
        };
        procs::signal_group(pgid, Signal::SIGTERM);
        if let Some(cg) = self.cgroup.clone() {
            tokio::task::spawn_blocking(move || cg.signal(Signal::SIGTERM));
        }
        let grace = Duration::from_secs(self.settings.stop_grace_secs);
        ctx.run_later(grace, move |act, _| {
            if act.pgid.is_some() {
                warn!(
                    act.log,
                    "the task's processes outlived the grace period, killing them"
                );
                procs::signal_group(pgid, Signal::SIGKILL);
                if let Some(cg) = act.cgroup.clone() {
                    tokio::task::spawn_blocking(move || cg.kill());
                }
            }
        });
    }

    pub(super) fn request_kill(&mut self, ending: Ending, err: String, ctx: &mut Context<Self>) {
        if self.kill.is_some() || self.ending {
            return;
        }
        info!(self.log, "ending task"; "reason" => %err);
        match ending {
            Ending::Stopped => self.exec.metrics.kill(crate::metrics::Kill::Stop),
            Ending::Timeout => self.exec.metrics.kill(crate::metrics::Kill::TimeLimit),
            _ => {}
        }
        self.kill = Some((ending, err));
        self.terminate(ctx);
    }

    /// The process is gone (or never started): read the rest, clear leftovers, record the end.
    pub(super) fn end(&mut self, exit: Exit, ctx: &mut Context<Self>) {
        if self.ending {
            return;
        }
        self.ending = true;
        self.drain(exit, ctx);
    }

    /// Reads what is left of the events file chunk by chunk, each stored before the next is read
    /// (so the end costs no more memory than a poll), then finishes.
    pub(super) fn drain(&mut self, exit: Exit, ctx: &mut Context<Self>) {
        let Some(tail) = self.tail.take() else {
            self.finish(exit, ctx);
            return;
        };
        let read = async move {
            tokio::task::spawn_blocking(move || {
                let mut tail = tail;
                let chunk = tail.read(true);
                (tail, chunk)
            })
            .await
        };
        ctx.wait(read.into_actor(self).map(move |joined, act, ctx| {
            let Ok((tail, chunk)) = joined else {
                act.finish(exit, ctx);
                return;
            };
            act.tail = Some(tail);
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    warn!(act.log, "cannot read events file"; "error" => %e);
                    act.finish(exit, ctx);
                    return;
                }
            };
            let more = chunk.more;
            match act.consume(chunk) {
                Some(save) => ctx.wait(save.into_actor(act).map(move |_, act, ctx| {
                    if more {
                        act.drain(exit, ctx);
                    } else {
                        act.finish(exit, ctx);
                    }
                })),
                None if more => act.drain(exit, ctx),
                None => act.finish(exit, ctx),
            }
        }));
    }

    /// Empties the task's cgroup (or, without one, sweeps its marked processes), finds ansible's
    /// error line, closes output.log; after a stop or a time limit, cleans the task's nodes; then
    /// records the end.
    pub(super) fn finish(&mut self, exit: Exit, ctx: &mut Context<Self>) {
        let mark = self.dir.mark();
        let dir_path = self.dir.path.clone();
        let output = self.dir.output();
        let run_dir = self.dir.clone();
        // Only the group of our own child (already waited for) may be reaped here.
        let group = if matches!(exit, Exit::Exited { .. }) {
            self.pgid
        } else {
            None
        };
        let limit = self.settings.max_output_bytes;
        let cut_before = self.output_cut;
        let adopted = matches!(self.origin, Origin::Adopt { .. });
        let cgroup = self.cgroup.clone();
        let grace = Duration::from_secs(self.settings.stop_grace_secs.max(1));
        let cg_log = self.log.clone();
        let local = async move {
            tokio::task::spawn_blocking(move || {
                let (killed, emptied, usage) = match &cgroup {
                    Some(cg) => {
                        let (emptied, mut seen) = cg.empty(grace);
                        let usage = cg.usage();
                        if emptied {
                            if let Err(e) = cg.remove() {
                                warn!(cg_log, "cannot remove the task's cgroup; it is left behind"; "error" => %e);
                            }
                        }
                        procs::reap_group(group);
                        seen.sort_unstable();
                        seen.dedup();
                        procs::reap(&seen);
                        (seen.len(), emptied, usage)
                    }
                    None => (
                        procs::kill_leftovers(&mark, &dir_path, group),
                        true,
                        Usage::default(),
                    ),
                };
                let cut = rundir::bound_output(&output, limit).unwrap_or(0);
                if cut_before + cut > 0 {
                    rundir::note_output_cut(&output, limit, cut_before + cut);
                }
                let why = rundir::error_line(&output);
                let recorded = adopted.then(|| read_end_file(&run_dir)).flatten();
                let fenced = std::fs::read_to_string(run_dir.fenced())
                    .ok()
                    .map(|f| f.trim().to_owned())
                    .filter(|f| !f.is_empty());
                (killed, emptied, usage, cut, why, (recorded, fenced))
            })
            .await
        };
        ctx.wait(local.into_actor(self).map(move |joined, act, ctx| {
            let Ok((killed, emptied, usage, cut, why, (recorded, fenced))) = joined else {
                act.set_pgid(None);
                act.record_end(exit, None, Usage::default(), HashMapCleaned::new(), ctx);
                return;
            };
            if killed > 0 {
                info!(act.log, "killed processes left by the task"; "count" => killed);
            }
            if !emptied {
                error!(
                    act.log,
                    "the task's cgroup is not empty after the grace period"
                );
            }
            act.output_cut += cut;
            act.set_pgid(None);
            act.recorded = recorded;
            if let (None, Some(reason)) = (&act.kill, fenced) {
                // The task's watchdog ended it (this agent's lease ran out): an end from outside,
                // so its nodes are cleaned as after a stop.
                warn!(act.log, "the task's watchdog ended it"; "reason" => &reason);
                act.kill = Some((Ending::Interrupted, reason));
            }
            // After a stop or a time limit, the work the task started on its nodes goes too.
            let clean = act.kill.is_some() && act.recorded.is_none();
            match (clean, act.mark.clone()) {
                (true, Some(mark)) => {
                    let nodes = act.cleanup_nodes();
                    let s = &act.settings;
                    let cleanup = remote::clean(
                        nodes,
                        mark,
                        Duration::from_secs(s.remote_cleanup_secs),
                        s.remote_cleanup_concurrency,
                    );
                    ctx.wait(cleanup.into_actor(act).map(move |cleaned, act, ctx| {
                        act.record_end(exit, why, usage, cleaned, ctx);
                    }));
                }
                _ => act.record_end(exit, why, usage, HashMapCleaned::new(), ctx),
            }
        }));
    }

    /// The nodes the task may have started processes on, and how to reach each.
    pub(super) fn cleanup_nodes(&self) -> Vec<remote::Node> {
        remote::Node::all(
            &self.settings,
            &self.exec.control_dir,
            &self.spec.remote_user,
            self.ingest.hosts.reachable(),
        )
    }

    pub(super) fn record_end(
        &mut self,
        exit: Exit,
        why: Option<String>,
        usage: Usage,
        cleaned: HashMapCleaned,
        ctx: &mut Context<Self>,
    ) {
        let exit_code = match &exit {
            Exit::Exited { code, .. } => *code,
            _ => None,
        };
        let (v, exit_code) = match self.recorded.take() {
            // An earlier server decided this end before the database took it.
            Some(file) => (
                Verdict {
                    status: Status::from_code(file.status).unwrap_or(Status::Failed),
                    ending: file.ending(),
                    err: file.err,
                },
                file.exit_code,
            ),
            None => (
                verdict(self.kill.as_ref(), &exit, &self.ingest.hosts, why),
                exit_code,
            ),
        };
        let ended_at = time::now();
        let ran = (ended_at - self.admitted_at).num_milliseconds() as f64 / 1000.0;
        self.exec.metrics.ran(ran);
        let fin = Finish {
            id: self.spec.id,
            status: v.status,
            err: v.err,
            exit_code,
            ended_at,
            hosts: super::end_file::with_cleanup(self.ingest.hosts.finish(v.ending), &cleaned),
            usage,
        };
        let file = EndFile {
            status: fin.status.code(),
            err: fin.err.clone(),
            exit_code,
        };
        let dir = self.dir.clone();
        let persistence = self.persistence.clone();
        let status = fin.status;
        let remove_params = self.settings.remove_extra_vars_at_end;
        let log = self.log.clone();
        let write = async move {
            let written = tokio::task::spawn_blocking(move || {
                if remove_params {
                    match std::fs::remove_file(dir.extra_vars()) {
                        // Gone already if an earlier server removed it before a crash.
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(format!("cannot remove extra_vars.json (the params): {e}"))
                        }
                    }
                }
                file.write(&dir)
                    .map_err(|e| format!("cannot write end.json: {e}"))
            })
            .await;
            // The database is still told; only a crash before it answers would lose the verdict
            // the file keeps.
            if let Err(why) = written.map_err(|e| e.to_string()).and_then(|w| w) {
                warn!(log, "the run directory did not take the end"; "error" => why);
            }
            let sent = persistence.send(FinishTask(fin.clone())).await;
            (fin, sent)
        };
        ctx.wait(write.into_actor(self).map(move |(fin, sent), act, ctx| {
            let unrecorded = match sent {
                Ok(Ok(_)) => {
                    info!(act.log, "task ended"; "status" => status.code());
                    None
                }
                Ok(Err(e)) => {
                    error!(act.log, "cannot record the end of the task now; it is kept and written when the database answers"; "error" => %e);
                    Some(fin)
                }
                Err(e) => {
                    error!(act.log, "persistence is gone"; "error" => %e);
                    Some(fin)
                }
            };
            act.guard.armed = false;
            act.supervisor.do_send(TaskReport::Ended {
                id: act.spec.id,
                unrecorded,
            });
            ctx.stop();
        }));
    }
}
