//! The supervisor's side of the shared queue (`shared_queue`): claiming the head of the table's
//! queue when there are free forks, applying stops asked through other agents, and ending the
//! tasks of agents that were lost. The SQL lives in `cluster::claim`.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use futures_util::FutureExt;
use slog::{info, warn};

use super::end::{EndReason, EndTask};
use super::TaskSupervisor;
use crate::ansible::events::Ending;
use crate::cluster::claim::{self, LostTask, Room};
use crate::exec::remote::{self, Cleaned, Node};
use crate::status::Status;
use crate::store::persistence::FinishTask;
use crate::task::{end_without_run, TaskSpec};

/// Claim from the shared queue now (a `NOTIFY` arrived).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Claim;

impl Handler<Claim> for TaskSupervisor {
    type Result = ();
    fn handle(&mut self, _: Claim, ctx: &mut Context<Self>) {
        self.claim(ctx);
    }
}

/// Apply the stops asked elsewhere for this agent's tasks now (a `NOTIFY downlink_stop`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CheckStops;

impl Handler<CheckStops> for TaskSupervisor {
    type Result = ();
    fn handle(&mut self, _: CheckStops, ctx: &mut Context<Self>) {
        self.check_stops(ctx);
    }
}

/// What ending a lost agent's task did on its nodes, for its `err`.
fn cleanup_note(marked: bool, cleaned: &HashMap<String, Cleaned>) -> String {
    if !marked {
        return "it had not started on its nodes".to_owned();
    }
    let killed: u32 = cleaned
        .values()
        .map(|c| match c {
            Cleaned::Clean { killed } | Cleaned::Left { killed, .. } => *killed,
            Cleaned::Failed(_) => 0,
        })
        .sum();
    let mut failed: Vec<&str> = cleaned
        .iter()
        .filter(|(_, c)| !matches!(c, Cleaned::Clean { .. }))
        .map(|(h, _)| h.as_str())
        .collect();
    failed.sort_unstable();
    if failed.is_empty() {
        format!("its nodes were cleaned first ({killed} processes of it ended there)")
    } else {
        format!(
            "its nodes were cleaned first ({killed} processes of it ended there), except {} where that failed",
            failed.join(", ")
        )
    }
}

/// The stored node list of a task row (a row that cannot be read has no nodes to end).
fn nodes_of(task: &crate::store::Task) -> Vec<String> {
    serde_json::from_str(&task.nodes).unwrap_or_default()
}

impl TaskSupervisor {
    /// Claims the head of the table's queue if it fits in the free forks, starts it, and claims
    /// again; one claim at a time. This agent's own queue (tasks it claimed before a restart)
    /// goes first.
    pub(super) fn claim(&mut self, ctx: &mut Context<Self>) {
        let Some(shared) = &self.shared else {
            return;
        };
        if self.closing || self.fenced || self.claiming || !self.admission.is_empty() {
            return;
        }
        if self.heartbeat.silent() > self.settings.fence_after() {
            // Overdue (just thawed, say): the heartbeat loop fences, then renews; claims wait.
            return;
        }
        let room = Room {
            free: self.admission.free(),
            max_forks: self.admission.max(),
            cluster_max_forks: shared.cluster_max_forks,
        };
        if room.free == 0 {
            return;
        }
        self.claiming = true;
        let me = self.settings.agent_name.clone();
        let job = shared.run(move |conn| claim::claim_head(conn, &me, room));
        ctx.spawn(job.into_actor(self).map(|claimed, act, ctx| {
            act.claiming = false;
            match claimed {
                Ok(Some(task)) => {
                    act.claim_failing = false;
                    match TaskSpec::from_row(&task) {
                        Ok(spec) => {
                            info!(act.log, "claimed a task from the shared queue"; "task_id" => spec.id);
                            act.admission.charge(act.admission.cost(spec.forks));
                            act.launch(spec, ctx);
                        }
                        Err(why) => act.unreadable(&task, why, ctx),
                    }
                    act.claim(ctx);
                }
                Ok(None) => act.claim_failing = false,
                Err(e) => {
                    if !act.claim_failing {
                        warn!(act.log, "cannot claim from the shared queue; trying again"; "error" => %e);
                    }
                    act.claim_failing = true;
                }
            }
        }));
    }

    /// Stops asked through other agents for this agent's tasks are applied here, as a local
    /// `/api/stop` would (read on a NOTIFY, at every heartbeat, and after a restart).
    pub(super) fn check_stops(&mut self, ctx: &mut Context<Self>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let me = self.settings.agent_name.clone();
        let job = shared.run(move |conn| claim::stops_for(conn, &me));
        ctx.spawn(job.into_actor(self).map(|asked, act, ctx| {
            let asked = match asked {
                Ok(asked) => asked,
                Err(e) => {
                    // Read again at the next heartbeat or NOTIFY.
                    warn!(act.log, "cannot read the stops asked through other agents"; "error" => %e);
                    return;
                }
            };
            for (id, reason) in asked {
                let here = act.running.contains_key(&id) || act.admission.get(id).is_some();
                if here {
                    let reason = EndReason::parse(reason.as_deref());
                    info!(act.log, "ending a task as asked through another agent"; "task_id" => id, "reason" => reason.as_str());
                    ctx.address().do_send(EndTask {
                        id,
                        name: None,
                        reason,
                    });
                }
            }
        }));
    }

    /// Other agents whose lease ran out get a note on their live tasks; past
    /// `lost_agent_grace_secs` those tasks end interrupted (written here, as any end).
    pub(super) fn reap_lost(&mut self, ctx: &mut Context<Self>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let me = self.settings.agent_name.clone();
        let lease = self.settings.lease();
        let grace = Duration::from_secs(self.settings.lost_agent_grace_secs);
        let job = shared.run(move |conn| claim::lost_agents(conn, &me, lease, grace));
        ctx.spawn(job.into_actor(self).map(|found, act, ctx| {
            let to_end = match found {
                Ok(to_end) => to_end,
                Err(e) => {
                    warn!(act.log, "cannot look for lost agents"; "error" => %e);
                    return;
                }
            };
            for lost in to_end {
                act.end_lost(lost, ctx);
            }
        }));
    }

    /// Ends a lost agent's task as interrupted: first what it started on its nodes (as a stop
    /// cleans them), then its row, so that once the row says 7 nothing of it runs on the nodes.
    /// Its processes on the lost agent's machine end by that agent's own fencing.
    fn end_lost(&mut self, lost: LostTask, ctx: &mut Context<Self>) {
        let id = lost.task.id;
        if !self.reaping.insert(id) {
            return;
        }
        warn!(self.log, "ending a task of a lost agent"; "task_id" => id, "agent" => lost.task.agent.clone());
        let nodes = nodes_of(&lost.task);
        let cleaning = match &lost.remote_mark {
            Some(mark) => {
                let s = &self.settings;
                let reach = Node::all(
                    s,
                    &self.exec.control_dir,
                    &lost.task.remote_user,
                    nodes.clone(),
                );
                remote::clean(
                    reach,
                    mark.clone(),
                    Duration::from_secs(s.remote_cleanup_secs),
                    s.remote_cleanup_concurrency,
                )
                .boxed_local()
            }
            None => async { HashMap::new() }.boxed_local(),
        };
        ctx.spawn(cleaning.into_actor(self).map(move |cleaned, act, ctx| {
            let note = cleanup_note(lost.remote_mark.is_some(), &cleaned);
            let err = format!("{}; {note}", lost.err);
            let fin = end_without_run(id, &nodes, Status::Interrupted, Ending::Interrupted, err);
            let sent = act.persistence.send(FinishTask(fin));
            ctx.spawn(sent.into_actor(act).map(move |res, act, _| {
                // Recorded or not, it is let go: if it is still live, the next look finds it.
                act.reaping.remove(&id);
                if !matches!(res, Ok(Ok(_))) {
                    warn!(act.log, "the end of a lost agent's task was not recorded; tried again at the next look"; "task_id" => id);
                }
            }));
        }));
    }

    /// A claimed task whose row cannot be read as a task: it ends failed, saying why.
    fn unreadable(&mut self, task: &crate::store::Task, why: String, ctx: &mut Context<Self>) {
        let fin = end_without_run(
            task.id,
            &nodes_of(task),
            Status::Failed,
            Ending::Interrupted,
            format!("the stored task cannot be read: {why}"),
        );
        self.record_end(fin, ctx);
    }
}
