//! TaskSupervisor: the FIFO queue of pending tasks, the global forks budget, stop routing and the
//! waiters of `parallel_run` and `/api/stop`.
//!
//! A task costs its forks (`min(fork_num, nodes, max_forks)`); the sum over running tasks never
//! exceeds `max_forks`. Pending tasks start strictly in arrival (id) order: a large task at the head
//! of the queue is not overtaken by smaller ones behind it, so nothing starves. Admission and
//! release happen inside this actor's handlers, one at a time, so they cannot race. A stored task
//! that asks for more forks than the budget now has (the operator lowered `max_forks` and
//! restarted) runs with the whole budget instead of waiting for ever.
//!
//! It is also the reconciler. It knows the truth of every task it holds: queued, started (the
//! [`MarkRunning`] its TaskActor sent), or ended with a write the database never took (kept in
//! `owed`, and in the run directory's `end.json`). Every `reconcile_secs` it hands those truths to
//! Persistence, which brings any row that fell behind up to them; an owed end is dropped once it
//! is written. A task whose TaskActor stops without an end (a panic) is ended here.

pub mod recovery;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use slog::{error, info, o, warn, Logger};
use tokio::sync::oneshot;

use crate::ansible::events::{Ending, Hosts};
use crate::ansible::rundir::RunDir;
use crate::exec::connections::CloseAll;
use crate::exec::Exec;
use crate::settings::Settings;
use crate::status::Status;
use crate::store::persistence::{FinishTask, MarkRunning, Persistence, Repair, Truth};
use crate::store::Finish;
use crate::supervisor::recovery::Plan;
use crate::task::{timeout_err, EndFile, Kill, Origin, TaskActor, TaskReport, TaskSpec};
use crate::time;

/// Places in the pending queue. A handler takes one before it stores a task and the supervisor
/// gives it back when the task leaves the queue, so a full queue refuses a task before anything
/// is stored.
#[derive(Debug)]
pub struct QueueSlots {
    used: AtomicUsize,
    max: usize,
}

impl QueueSlots {
    /// `max` places, all free.
    pub fn new(max: usize) -> Arc<QueueSlots> {
        Arc::new(QueueSlots {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Takes a place; false if the queue is full.
    pub fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                (u < self.max).then_some(u + 1)
            })
            .is_ok()
    }

    /// Gives a place back.
    pub fn give_back(&self) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(1))
            });
    }

    fn force_take(&self) {
        self.used.fetch_add(1, Ordering::SeqCst);
    }
}

struct Running {
    addr: Addr<TaskActor>,
    name: String,
    forks: u32,
    nodes: Vec<String>,
    /// Its process started, as recorded (or to be recorded) in its row.
    started: Option<MarkRunning>,
}

/// The supervisor actor.
pub struct TaskSupervisor {
    settings: Arc<Settings>,
    run_root: PathBuf,
    persistence: Addr<Persistence>,
    slots: Arc<QueueSlots>,
    log: Logger,
    used_forks: u32,
    queue: VecDeque<TaskSpec>,
    running: HashMap<i64, Running>,
    waiters: HashMap<i64, Vec<oneshot::Sender<()>>>,
    /// Ends the database has not taken yet: written again by the reconciler.
    owed: BTreeMap<i64, Finish>,
    /// A reconciliation is under way.
    reconciling: bool,
    /// Shutting down: nothing more is admitted.
    closing: bool,
    /// The shared queue (`shared_queue`): tasks are claimed from the table, not queued here.
    shared: Option<crate::cluster::claim::Shared>,
    /// A claim is under way.
    claiming: bool,
    /// The last claim failed (logged once until one succeeds).
    claim_failing: bool,
    /// Shared with every TaskActor: set at shutdown, so actors dropped with the server leave their
    /// processes to the next start.
    shutting_down: Arc<AtomicBool>,
    exec: Exec,
}

impl TaskSupervisor {
    /// A supervisor for tasks run under `run_root` (absolute, plugin installed).
    pub fn new(
        settings: Arc<Settings>,
        run_root: PathBuf,
        persistence: Addr<Persistence>,
        slots: Arc<QueueSlots>,
        exec: Exec,
        log: Logger,
    ) -> TaskSupervisor {
        TaskSupervisor {
            settings,
            run_root,
            persistence,
            slots,
            log,
            used_forks: 0,
            queue: VecDeque::new(),
            running: HashMap::new(),
            waiters: HashMap::new(),
            owed: BTreeMap::new(),
            reconciling: false,
            closing: false,
            shared: None,
            claiming: false,
            claim_failing: false,
            shutting_down: Arc::new(AtomicBool::new(false)),
            exec,
        }
    }

    /// With the shared queue: claims are made from the table.
    pub fn with_shared(mut self, shared: Option<crate::cluster::claim::Shared>) -> TaskSupervisor {
        self.shared = shared;
        self
    }

    /// Starts queued tasks from the head while the budget allows, then (shared queue) claims.
    fn admit(&mut self, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        let max = self.settings.max_forks;
        while let Some(head) = self.queue.front() {
            // A task stored under a larger budget runs with the budget there is now.
            if self.used_forks + head.forks.min(max) > max {
                break;
            }
            let Some(spec) = self.queue.pop_front() else {
                break;
            };
            self.slots.give_back();
            self.launch(spec, ctx);
        }
        self.claim(ctx);
    }

    /// Starts a task taken from the head of the queue (this agent's or the shared one).
    fn launch(&mut self, mut spec: TaskSpec, ctx: &mut Context<Self>) {
        let max = self.settings.max_forks;
        if spec.forks > max {
            info!(self.log, "task asks for more forks than max_forks; it runs with max_forks";
                  "task_id" => spec.id, "forks" => spec.forks, "max_forks" => max);
            spec.forks = max;
        }
        let dir = RunDir::of(&self.run_root, spec.id);
        let now = time::now();
        let waited = (now - spec.created_at).num_milliseconds() as f64 / 1000.0;
        self.exec.metrics.waited(waited);
        self.start_task(spec, now, Origin::Spawn, dir, None, ctx);
    }

    /// Shared queue: claims the head of the table's queue if it fits in the free forks, starts
    /// it, and claims again; one claim at a time. This agent's own queue (tasks it claimed before a
    /// restart) goes first.
    fn claim(&mut self, ctx: &mut Context<Self>) {
        let Some(shared) = &self.shared else {
            return;
        };
        if self.closing || self.claiming || !self.queue.is_empty() {
            return;
        }
        let max = self.settings.max_forks;
        let room = crate::cluster::claim::Room {
            free: max.saturating_sub(self.used_forks),
            max_forks: max,
            cluster_max_forks: shared.cluster_max_forks,
        };
        if room.free == 0 {
            return;
        }
        self.claiming = true;
        let me = self.settings.agent_name.clone();
        let job = shared.run(move |conn| crate::cluster::claim::claim_head(conn, &me, room));
        ctx.spawn(job.into_actor(self).map(|claimed, act, ctx| {
            act.claiming = false;
            match claimed {
                Ok(Some(task)) => {
                    act.claim_failing = false;
                    match TaskSpec::from_row(&task) {
                        Ok(spec) => {
                            info!(act.log, "claimed a task from the shared queue"; "task_id" => spec.id);
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

    /// Shared queue: stops asked through other agents for this agent's tasks are applied here,
    /// as a local `/api/stop` would (read on a NOTIFY, at every heartbeat, and after a restart).
    fn check_stops(&mut self, ctx: &mut Context<Self>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let me = self.settings.agent_name.clone();
        let job = shared.run(move |conn| crate::cluster::claim::stops_for(conn, &me));
        ctx.spawn(job.into_actor(self).map(|asked, act, ctx| {
            for (id, reason) in asked.unwrap_or_default() {
                let here = act.running.contains_key(&id) || act.queue.iter().any(|t| t.id == id);
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

    /// Shared queue: other agents whose lease ran out get a note on their live tasks; past
    /// `lost_agent_grace_secs` those tasks end interrupted (written here, as any end).
    fn reap_lost(&mut self, ctx: &mut Context<Self>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let me = self.settings.agent_name.clone();
        let beat = std::time::Duration::from_secs(self.settings.heartbeat_secs.max(1));
        let lease = beat * crate::cluster::agents::LEASE_HEARTBEATS;
        let grace = std::time::Duration::from_secs(self.settings.lost_agent_grace_secs);
        let job =
            shared.run(move |conn| crate::cluster::claim::lost_agents(conn, &me, lease, grace));
        ctx.spawn(job.into_actor(self).map(|found, act, _| {
            let to_end = match found {
                Ok(to_end) => to_end,
                Err(e) => {
                    warn!(act.log, "cannot look for lost agents"; "error" => %e);
                    return;
                }
            };
            for (task, err) in to_end {
                warn!(act.log, "ending a task of a lost agent"; "task_id" => task.id, "agent" => task.agent.clone());
                let nodes: Vec<String> = serde_json::from_str(&task.nodes).unwrap_or_default();
                act.persistence.do_send(FinishTask(Finish {
                    id: task.id,
                    status: Status::Interrupted,
                    err: Some(err),
                    exit_code: None,
                    ended_at: time::now(),
                    hosts: Hosts::new(&nodes).finish(Ending::Interrupted),
                    usage: Default::default(),
                }));
            }
        }));
    }

    /// A claimed task whose row cannot be read as a task: it ends failed, saying why.
    fn unreadable(&mut self, task: &crate::store::Task, why: String, ctx: &mut Context<Self>) {
        let nodes: Vec<String> = serde_json::from_str(&task.nodes).unwrap_or_default();
        let fin = Finish {
            id: task.id,
            status: Status::Failed,
            err: Some(format!("the stored task cannot be read: {why}")),
            exit_code: None,
            ended_at: time::now(),
            hosts: Hosts::new(&nodes).finish(Ending::Interrupted),
            usage: Default::default(),
        };
        let id = task.id;
        self.owed.insert(id, fin.clone());
        let sent = self.persistence.send(FinishTask(fin));
        ctx.spawn(sent.into_actor(self).map(move |res, act, _| {
            if let Ok(Ok(_)) = res {
                act.owed.remove(&id);
            }
            act.wake(id);
        }));
    }

    /// Charges the task's forks and starts its actor.
    fn start_task(
        &mut self,
        spec: TaskSpec,
        started_at: chrono::NaiveDateTime,
        origin: Origin,
        dir: RunDir,
        started: Option<MarkRunning>,
        ctx: &mut Context<Self>,
    ) {
        self.used_forks += spec.forks;
        let log = self
            .log
            .new(o!("task_id" => spec.id, "task_name" => spec.name.clone()));
        info!(log, "task admitted"; "forks" => spec.forks, "forks_in_use" => self.used_forks);
        let (id, forks, nodes, name) = (spec.id, spec.forks, spec.nodes.clone(), spec.name.clone());
        let addr = TaskActor::new(
            spec,
            started_at,
            origin,
            self.settings.clone(),
            self.run_root.clone(),
            dir,
            self.persistence.clone(),
            ctx.address().recipient(),
            self.shutting_down.clone(),
            self.exec.clone(),
            log,
        )
        .start();
        self.running.insert(
            id,
            Running {
                addr,
                name,
                forks,
                nodes,
                started,
            },
        );
    }

    /// Frees a task's forks and wakes its waiters; keeps its end if the database did not take it.
    fn ended(&mut self, id: i64, unrecorded: Option<Finish>, ctx: &mut Context<Self>) {
        match self.running.remove(&id) {
            Some(r) => self.used_forks = self.used_forks.saturating_sub(r.forks),
            None => warn!(self.log, "end of an unknown task"; "task_id" => id),
        }
        if let Some(fin) = unrecorded {
            self.owed.insert(id, fin);
        }
        self.wake(id);
        self.admit(ctx);
    }

    /// A TaskActor went away without recording an end (its code panicked): end its task here.
    fn lost(&mut self, id: i64, killed: bool, ctx: &mut Context<Self>) {
        let Some(running) = self.running.get(&id) else {
            return;
        };
        error!(self.log, "the actor of a task stopped unexpectedly; ending the task"; "task_id" => id);
        let err = format!(
            "downlink's supervision of this task failed unexpectedly (an internal error, see the server log){}",
            if killed { "; ansible-playbook was killed" } else { "" }
        );
        let fin = Finish {
            id,
            status: Status::Interrupted,
            err: Some(err),
            exit_code: None,
            ended_at: time::now(),
            hosts: Hosts::new(&running.nodes).finish(Ending::Interrupted),
            usage: Default::default(),
        };
        let sent = self.persistence.send(FinishTask(fin.clone()));
        ctx.spawn(sent.into_actor(self).map(move |res, act, ctx| {
            let unrecorded = (!matches!(res, Ok(Ok(_)))).then_some(fin);
            act.ended(id, unrecorded, ctx);
        }));
    }

    /// Hands what this supervisor knows to Persistence, which repairs the rows that are behind.
    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        if self.reconciling {
            return;
        }
        let mut truths: Vec<Truth> = self
            .running
            .values()
            .filter_map(|r| r.started.clone().map(Truth::Running))
            .collect();
        truths.extend(self.owed.values().cloned().map(Truth::Ended));
        if truths.is_empty() {
            return;
        }
        let owed: Vec<i64> = self.owed.keys().copied().collect();
        self.reconciling = true;
        let sent = self.persistence.send(Repair(truths));
        ctx.spawn(sent.into_actor(self).map(move |res, act, _| {
            act.reconciling = false;
            if let Ok(Ok(_)) = res {
                for id in owed {
                    if act.owed.remove(&id).is_some() {
                        info!(act.log, "an end the database had missed is recorded now"; "task_id" => id);
                    }
                }
            }
        }));
    }

    /// Queues a task in id (arrival) order, even if two inserts answered out of order.
    fn queue_in_order(&mut self, spec: TaskSpec) {
        let at = self.queue.partition_point(|t| t.id < spec.id);
        self.queue.insert(at, spec);
    }

    fn wait_for(&mut self, id: i64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiters.entry(id).or_default().push(tx);
        rx
    }

    fn wake(&mut self, id: i64) {
        for tx in self.waiters.remove(&id).unwrap_or_default() {
            let _ = tx.send(());
        }
    }
}

impl Actor for TaskSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = std::time::Duration::from_secs(self.settings.reconcile_secs);
        ctx.run_interval(every, |act, ctx| act.reconcile(ctx));
        if self.shared.is_some() {
            // The fallback for a lost NOTIFY.
            ctx.run_interval(std::time::Duration::from_secs(1), |act, ctx| act.claim(ctx));
            let beat = std::time::Duration::from_secs(self.settings.heartbeat_secs.max(1));
            ctx.run_interval(beat, |act, ctx| {
                act.check_stops(ctx);
                act.reap_lost(ctx);
            });
        }
    }
}

/// Queue a stored task; with `wait`, also answer a receiver that fires when it has ended.
#[derive(Message)]
#[rtype(result = "Option<oneshot::Receiver<()>>")]
pub struct Enqueue {
    pub spec: TaskSpec,
    pub wait: bool,
}

impl Handler<Enqueue> for TaskSupervisor {
    type Result = Option<oneshot::Receiver<()>>;
    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.spec.id;
        if self.shared.is_some() {
            // Stored unclaimed: it is the shared queue's, claimed by whichever agent has room.
            self.slots.give_back();
            let rx = msg.wait.then(|| self.wait_for(id));
            self.claim(ctx);
            return rx;
        }
        self.queue_in_order(msg.spec);
        let rx = msg.wait.then(|| self.wait_for(id));
        self.admit(ctx);
        rx
    }
}

/// Where a pending task stands in the queue, for `/api/check`.
#[derive(Message)]
#[rtype(result = "Option<QueuePlace>")]
pub struct WhereInQueue(pub i64);

/// A pending task's place: its position (1 = next to start) and what it waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePlace {
    pub position: usize,
    pub waiting_for: String,
}

impl Handler<WhereInQueue> for TaskSupervisor {
    type Result = Option<QueuePlace>;
    fn handle(&mut self, msg: WhereInQueue, _: &mut Context<Self>) -> Self::Result {
        let ahead = self.queue.iter().position(|t| t.id == msg.0)?;
        let max = self.settings.max_forks;
        let needs = self.queue[ahead].forks.min(max);
        let waiting_for = if self.closing {
            "the server is shutting down; it starts after the next start".to_owned()
        } else {
            let forks = if needs == 1 { "fork" } else { "forks" };
            let free = max.saturating_sub(self.used_forks);
            let before = match ahead {
                0 => "first in the queue".to_owned(),
                1 => "1 task ahead".to_owned(),
                n => format!("{n} tasks ahead"),
            };
            format!("needs {needs} {forks}, {free} of {max} free; {before}")
        };
        Some(QueuePlace {
            position: ahead + 1,
            waiting_for,
        })
    }
}

/// Why a task is being ended from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// `/api/stop`.
    Stop,
    /// A `parallel_run` deadline passed.
    Timeout,
}

impl EndReason {
    /// How it is stored in `tasks.stop_reason` (a stop asked through another agent).
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Stop => "stop",
            EndReason::Timeout => "timeout",
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
        }
    }
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
        if self.queue.iter().any(|t| t.id == msg.id && !named(&t.name))
            || self.running.get(&msg.id).is_some_and(|r| !named(&r.name))
        {
            return Box::pin(async { EndOutcome::NotLive });
        }
        if self.owed.contains_key(&msg.id) {
            // Ended already; its end waits for the database.
            let why = "its end is not recorded yet: the database is unavailable".to_owned();
            return Box::pin(async move { EndOutcome::Failed(why) });
        }
        if let Some(pos) = self.queue.iter().position(|t| t.id == msg.id) {
            let Some(spec) = self.queue.remove(pos) else {
                return Box::pin(async { EndOutcome::NotLive });
            };
            self.slots.give_back();
            let log = self
                .log
                .new(o!("task_id" => spec.id, "task_name" => spec.name.clone()));
            info!(log, "pending task ended"; "status" => status.code());
            let fin = Finish {
                id: spec.id,
                status,
                err: Some(err),
                exit_code: None,
                ended_at: time::now(),
                hosts: Hosts::new(&spec.nodes).finish(ending),
                usage: Default::default(),
            };
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
                if !matches!(written, Ok(Ok(()))) {
                    warn!(log, "cannot write end.json of a stopped pending task");
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
                let _ = rx.await;
                outcome
            });
        }
        let Some(running) = self.running.get(&msg.id) else {
            return Box::pin(async { EndOutcome::NotLive });
        };
        running.addr.do_send(Kill { ending, err });
        let rx = self.wait_for(msg.id);
        Box::pin(async move {
            let _ = rx.await;
            EndOutcome::Ended
        })
    }
}

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

/// This agent's queue and forks, for `/metrics`.
#[derive(Message)]
#[rtype(result = "Load")]
pub struct GetLoad;

#[derive(Debug, Clone, Copy, MessageResponse)]
pub struct Load {
    pub queued: usize,
    pub forks_in_use: u32,
    pub forks_budget: u32,
}

impl Handler<GetLoad> for TaskSupervisor {
    type Result = Load;
    fn handle(&mut self, _: GetLoad, _: &mut Context<Self>) -> Load {
        Load {
            queued: self.queue.len(),
            forks_in_use: self.used_forks,
            forks_budget: self.settings.max_forks,
        }
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

impl Handler<TaskReport> for TaskSupervisor {
    type Result = ();
    fn handle(&mut self, msg: TaskReport, ctx: &mut Context<Self>) {
        match msg {
            TaskReport::Started(mark) => {
                if let Some(r) = self.running.get_mut(&mark.task_id) {
                    r.started = Some(mark);
                }
            }
            TaskReport::Ended { id, unrecorded } => self.ended(id, unrecorded, ctx),
            TaskReport::Lost { id, killed } => self.lost(id, killed, ctx),
        }
    }
}

/// `err` of a stopped task.
pub fn stop_err() -> String {
    "stopped through /api/stop".to_owned()
}

/// At start: carry out the recovery plan (see `recovery`): record the ends it decided, adopt what
/// an earlier server left running, and queue its pending tasks again in their original order.
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
                let _ = std::fs::remove_file(RunDir::of(&self.run_root, fin.id).extra_vars());
            }
            self.owed.insert(fin.id, fin.clone());
            let id = fin.id;
            let sent = self.persistence.send(FinishTask(fin));
            ctx.spawn(sent.into_actor(self).map(move |res, act, _| {
                if let Ok(Ok(_)) = res {
                    act.owed.remove(&id);
                }
            }));
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
            let started = MarkRunning {
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
            };
            let started = orphan.unrecorded_start.clone().unwrap_or(started);
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
            self.queue_in_order(spec);
        }
        self.admit(ctx);
    }
}

/// At shutdown: admit nothing more; with `stop_tasks`, stop every running task (status 5) and
/// answer once they are recorded.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close {
    pub stop_tasks: bool,
}

impl Handler<Close> for TaskSupervisor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: Close, _: &mut Context<Self>) -> Self::Result {
        self.closing = true;
        self.shutting_down.store(true, Ordering::SeqCst);
        let connections = self.exec.connections.clone();
        if !msg.stop_tasks {
            connections.do_send(CloseAll {
                tasks_left: !self.running.is_empty(),
            });
            return Box::pin(async {});
        }
        let ids: Vec<i64> = self.running.keys().copied().collect();
        let mut ends = Vec::new();
        for id in ids {
            if let Some(r) = self.running.get(&id) {
                r.addr.do_send(Kill {
                    ending: Ending::Stopped,
                    err: "stopped because downlink was shut down".into(),
                });
            }
            ends.push(self.wait_for(id));
        }
        Box::pin(async move {
            for rx in ends {
                let _ = rx.await;
            }
            let _ = connections.send(CloseAll { tasks_left: false }).await;
        })
    }
}
