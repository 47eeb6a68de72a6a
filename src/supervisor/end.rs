//! End routing: ending a task from outside (`/api/stop`, a `parallel_run` deadline, a stop asked
//! through another agent), the end of a task whose actor went away, and the waiters that are
//! answered once an end is recorded.

use actix::prelude::*;
use slog::{error, info, o, warn};

use super::TaskSupervisor;
use crate::ansible::events::Ending;
use crate::ansible::rundir::RunDir;
use crate::settings::Settings;
use crate::status::Status;
use crate::store::persistence::FinishTask;
use crate::store::Finish;
use crate::task::{end_without_run, timeout_err, EndFile, Kill};

/// Why a task is being ended from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// `/api/stop`.
    Stop,
    /// A `parallel_run` deadline passed.
    Timeout,
    /// Fencing: this agent could not renew its heartbeat for `fence_after` (`supervisor/fence.rs`).
    Fenced,
    /// Another agent has recorded the task's end already (it declared this one lost).
    EndedElsewhere,
}

impl EndReason {
    /// How it is stored in `tasks.stop_reason` (a stop asked through another agent).
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Stop => "stop",
            EndReason::Timeout => "timeout",
            EndReason::Fenced => "fenced",
            EndReason::EndedElsewhere => "ended elsewhere",
        }
    }

    /// The reason stored as `as_str` says; anything else is a stop.
    pub fn parse(s: Option<&str>) -> EndReason {
        match s {
            Some("timeout") => EndReason::Timeout,
            _ => EndReason::Stop,
        }
    }

    /// The status, ending and `err` of a task ended so.
    pub fn outcome(self, settings: &Settings) -> (Status, Ending, String) {
        match self {
            EndReason::Stop => (Status::Stopped, Ending::Stopped, stop_err()),
            EndReason::Timeout => (
                Status::Timeout,
                Ending::Timeout,
                timeout_err(settings.parallel_run_timeout_secs),
            ),
            EndReason::Fenced => (
                Status::Interrupted,
                Ending::Interrupted,
                format!(
                    "agent {} renewed no heartbeat for {} s (cut off from its database, or frozen), so it stopped this task itself before other agents could declare it lost: its processes were killed and its nodes cleaned",
                    settings.agent_name,
                    settings.fence_after().as_secs()
                ),
            ),
            EndReason::EndedElsewhere => (
                Status::Interrupted,
                Ending::Interrupted,
                format!(
                    "another agent recorded this task's end while agent {} was out of reach; what was left of it here was killed and its nodes cleaned",
                    settings.agent_name
                ),
            ),
        }
    }
}

/// `err` of a stopped task.
pub fn stop_err() -> String {
    "stopped through /api/stop".to_owned()
}

/// What became of a request to end a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndOutcome {
    /// The task has ended and its end is recorded.
    Ended,
    /// The task is neither queued nor running here.
    NotLive,
    /// Its end could not be recorded.
    Failed(String),
}

/// End a task (pending or running); answers once its end is recorded.
#[derive(Message)]
#[rtype(result = "EndOutcome")]
pub struct EndTask {
    pub id: i64,
    /// When set, the task must also have this name (a stop checked here, the database being away).
    pub name: Option<String>,
    pub reason: EndReason,
}

impl Handler<EndTask> for TaskSupervisor {
    type Result = ResponseFuture<EndOutcome>;
    fn handle(&mut self, msg: EndTask, ctx: &mut Context<Self>) -> Self::Result {
        let (status, ending, err) = msg.reason.outcome(&self.settings);
        let named = |spec_name: &str| msg.name.as_deref().is_none_or(|n| n == spec_name);
        if self.admission.get(msg.id).is_some_and(|t| !named(&t.name))
            || self.running.get(&msg.id).is_some_and(|r| !named(&r.name))
        {
            return Box::pin(async { EndOutcome::NotLive });
        }
        if self.owed.contains_key(&msg.id) {
            // Ended already; its end waits for the database.
            let why = "its end is not recorded yet: the database is unavailable".to_owned();
            return Box::pin(async move { EndOutcome::Failed(why) });
        }
        if let Some(spec) = self.admission.remove(msg.id) {
            self.slots.give_back();
            let log = self
                .log
                .new(o!("task_id" => spec.id, "task_name" => spec.name.clone()));
            info!(log, "pending task ended"; "status" => status.code());
            let fin = end_without_run(spec.id, &spec.nodes, status, ending, err);
            // Kept until the database takes it, so it never runs, not even after a restart.
            self.owed.insert(spec.id, fin.clone());
            let verdict = RunDir::of(&self.run_root, spec.id);
            let file = EndFile {
                status: status.code(),
                err: fin.err.clone(),
                exit_code: None,
            };
            let rx = self.wait_for(spec.id);
            let persistence = self.persistence.clone();
            let me = ctx.address();
            return Box::pin(async move {
                let written = tokio::task::spawn_blocking(move || file.write(&verdict)).await;
                if let Err(e) = written
                    .map_err(|e| e.to_string())
                    .and_then(|w| w.map_err(|e| e.to_string()))
                {
                    warn!(log, "cannot write end.json of a stopped pending task"; "error" => e);
                }
                let outcome = match persistence.send(FinishTask(fin)).await {
                    Ok(Ok(_)) => EndOutcome::Ended,
                    Ok(Err(e)) => EndOutcome::Failed(e.to_string()),
                    Err(e) => EndOutcome::Failed(e.to_string()),
                };
                me.do_send(Settled {
                    id: msg.id,
                    recorded: outcome == EndOutcome::Ended,
                });
                // Woken by Settled; a supervisor gone meanwhile answers as well.
                rx.await.ok();
                outcome
            });
        }
        let Some(running) = self.running.get(&msg.id) else {
            return Box::pin(async { EndOutcome::NotLive });
        };
        running.addr.do_send(Kill { ending, err });
        let rx = self.wait_for(msg.id);
        Box::pin(async move {
            // Answered when the task's end is handled; a supervisor gone meanwhile as well.
            rx.await.ok();
            EndOutcome::Ended
        })
    }
}

/// A task ended without a TaskActor (stopped while pending): wake its waiters, and forget its end
/// once the database has it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Settled {
    pub id: i64,
    pub recorded: bool,
}

impl Handler<Settled> for TaskSupervisor {
    type Result = ();
    fn handle(&mut self, msg: Settled, _: &mut Context<Self>) {
        if msg.recorded {
            self.owed.remove(&msg.id);
        }
        self.wake(msg.id);
    }
}

impl TaskSupervisor {
    /// Frees a task's forks and wakes its waiters; keeps its end if the database did not take it.
    pub(super) fn ended(&mut self, id: i64, unrecorded: Option<Finish>, ctx: &mut Context<Self>) {
        match self.running.remove(&id) {
            Some(r) => self.admission.release(r.forks),
            None => warn!(self.log, "end of an unknown task"; "task_id" => id),
        }
        if let Some(fin) = unrecorded {
            self.owed.insert(id, fin);
        }
        self.wake(id);
        self.admit(ctx);
    }

    /// A TaskActor went away without recording an end (its code panicked): end its task here.
    pub(super) fn lost(&mut self, id: i64, killed: bool, ctx: &mut Context<Self>) {
        let Some(running) = self.running.get(&id) else {
            return;
        };
        error!(self.log, "the actor of a task stopped unexpectedly; ending the task"; "task_id" => id);
        let err = format!(
            "downlink's supervision of this task failed unexpectedly (an internal error, see the server log){}",
            if killed { "; ansible-playbook was killed" } else { "" }
        );
        let fin = end_without_run(
            id,
            &running.nodes,
            Status::Interrupted,
            Ending::Interrupted,
            err,
        );
        let sent = self.persistence.send(FinishTask(fin.clone()));
        ctx.spawn(sent.into_actor(self).map(move |res, act, ctx| {
            let unrecorded = (!matches!(res, Ok(Ok(_)))).then_some(fin);
            act.ended(id, unrecorded, ctx);
        }));
    }

    /// Records an end decided here (the task never ran, or ran elsewhere), keeping it owed until
    /// the database takes it; then wakes the task's waiters.
    pub(super) fn record_end(&mut self, fin: Finish, ctx: &mut Context<Self>) {
        let id = fin.id;
        self.owed.insert(id, fin.clone());
        let sent = self.persistence.send(FinishTask(fin));
        ctx.spawn(sent.into_actor(self).map(move |res, act, _| {
            if let Ok(Ok(_)) = res {
                act.owed.remove(&id);
            }
            act.wake(id);
        }));
    }

    pub(super) fn wait_for(&mut self, id: i64) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters.entry(id).or_default().push(tx);
        rx
    }

    pub(super) fn wake(&mut self, id: i64) {
        for tx in self.waiters.remove(&id).unwrap_or_default() {
            // A waiter that went away (its client hung up) needs no answer.
            tx.send(()).ok();
        }
    }
}
