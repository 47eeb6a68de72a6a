//! TaskSupervisor: the FIFO queue of pending tasks, the global forks budget, stop routing and the
//! waiters of `parallel_run` and `/api/stop`.
//!
//! A task costs its forks (`min(fork_num, nodes, max_forks)`); the sum over running tasks never
//! exceeds `max_forks`. Pending tasks start strictly in arrival (id) order: a large task at the head
//! of the queue is not overtaken by smaller ones behind it, so nothing starves. Admission and
//! release happen inside this actor's handlers, one at a time, so they cannot race.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use serde_json::{Map, Value};
use slog::{info, o, warn, Logger};
use tokio::sync::oneshot;

use crate::ansible::events::{Ending, Hosts};
use crate::persistence::{FinishTask, Persistence};
use crate::settings::Settings;
use crate::status::Status;
use crate::store::Finish;
use crate::store::Task;
use crate::task::{Kill, Origin, TaskActor};
use crate::time;

/// Everything needed to run a stored task.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub id: i64,
    pub name: String,
    pub nodes: Vec<String>,
    pub remote_user: String,
    pub content: String,
    pub params: Map<String, Value>,
    pub forks: u32,
    pub correlation_id: String,
    pub source: String,
}

impl TaskSpec {
    /// The spec of a stored task (after a restart).
    pub fn from_row(task: &Task) -> Result<TaskSpec, String> {
        let nodes: Vec<String> =
            serde_json::from_str(&task.nodes).map_err(|e| format!("nodes: {e}"))?;
        // `null`: not stored (store_params = false); an adopted task no longer needs them.
        let params: Option<Map<String, Value>> =
            serde_json::from_str(&task.params).map_err(|e| format!("params: {e}"))?;
        let params = params.unwrap_or_default();
        Ok(TaskSpec {
            id: task.id,
            name: task.name.clone(),
            nodes,
            remote_user: task.remote_user.clone(),
            content: task.content.clone(),
            params,
            forks: u32::try_from(task.forks).unwrap_or(1).max(1),
            correlation_id: task.correlation_id.clone(),
            source: task.source.clone(),
        })
    }
}

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
    forks: u32,
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
    /// Shutting down: nothing more is admitted.
    closing: bool,
}

impl TaskSupervisor {
    /// A supervisor for tasks run under `run_root` (absolute, plugin installed).
    pub fn new(
        settings: Arc<Settings>,
        run_root: PathBuf,
        persistence: Addr<Persistence>,
        slots: Arc<QueueSlots>,
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
            closing: false,
        }
    }

    /// Starts queued tasks from the head while the budget allows.
    fn admit(&mut self, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        while let Some(head) = self.queue.front() {
            if self.used_forks + head.forks > self.settings.max_forks {
                break;
            }
            let Some(spec) = self.queue.pop_front() else {
                break;
            };
            self.slots.give_back();
            self.start_task(spec, time::now(), Origin::Spawn, ctx);
        }
    }

    /// Charges the task's forks and starts its actor.
    fn start_task(
        &mut self,
        spec: TaskSpec,
        started_at: chrono::NaiveDateTime,
        origin: Origin,
        ctx: &mut Context<Self>,
    ) {
        self.used_forks += spec.forks;
        let log = self
            .log
            .new(o!("task_id" => spec.id, "task_name" => spec.name.clone()));
        info!(log, "task admitted"; "forks" => spec.forks, "forks_in_use" => self.used_forks);
        let (id, forks) = (spec.id, spec.forks);
        let addr = TaskActor::new(
            spec,
            started_at,
            origin,
            self.settings.clone(),
            self.run_root.clone(),
            self.persistence.clone(),
            ctx.address(),
            log,
        )
        .start();
        self.running.insert(id, Running { addr, forks });
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
        self.queue_in_order(msg.spec);
        let rx = msg.wait.then(|| self.wait_for(id));
        self.admit(ctx);
        rx
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
    pub reason: EndReason,
}

impl Handler<EndTask> for TaskSupervisor {
    type Result = ResponseFuture<EndOutcome>;
    fn handle(&mut self, msg: EndTask, ctx: &mut Context<Self>) -> Self::Result {
        let (status, ending, err) = match msg.reason {
            EndReason::Stop => (Status::Stopped, Ending::Stopped, stop_err()),
            EndReason::Timeout => (
                Status::Timeout,
                Ending::Timeout,
                timeout_err(self.settings.parallel_run_timeout_secs),
            ),
        };
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
            };
            let rx = self.wait_for(spec.id);
            let persistence = self.persistence.clone();
            let me = ctx.address();
            return Box::pin(async move {
                let outcome = match persistence.send(FinishTask(fin)).await {
                    Ok(Ok(_)) => EndOutcome::Ended,
                    Ok(Err(e)) => EndOutcome::Failed(e.to_string()),
                    Err(e) => EndOutcome::Failed(e.to_string()),
                };
                me.do_send(Wake(msg.id));
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

/// Wake the waiters of a task that ended without a TaskActor (stopped while pending).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Wake(pub i64);

impl Handler<Wake> for TaskSupervisor {
    type Result = ();
    fn handle(&mut self, msg: Wake, _: &mut Context<Self>) {
        self.wake(msg.0);
    }
}

/// A receiver that fires when the task has ended; `None` if it is not live here.
#[derive(Message)]
#[rtype(result = "Option<oneshot::Receiver<()>>")]
pub struct WaitEnd(pub i64);

impl Handler<WaitEnd> for TaskSupervisor {
    type Result = Option<oneshot::Receiver<()>>;
    fn handle(&mut self, msg: WaitEnd, _: &mut Context<Self>) -> Self::Result {
        let live = self.running.contains_key(&msg.0) || self.queue.iter().any(|t| t.id == msg.0);
        live.then(|| self.wait_for(msg.0))
    }
}

/// Sent by a TaskActor once its end is recorded: frees its forks and wakes its waiters.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TaskEnded(pub i64);

impl Handler<TaskEnded> for TaskSupervisor {
    type Result = ();
    fn handle(&mut self, msg: TaskEnded, ctx: &mut Context<Self>) {
        match self.running.remove(&msg.0) {
            Some(r) => self.used_forks -= r.forks,
            None => warn!(self.log, "end of an unknown task"; "task_id" => msg.0),
        }
        self.wake(msg.0);
        self.admit(ctx);
    }
}

/// Current load, for tests and operators.
#[derive(Message)]
#[rtype(result = "Load")]
pub struct GetLoad;

/// Forks in use and task counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, MessageResponse)]
pub struct Load {
    pub forks_in_use: u32,
    pub running: usize,
    pub queued: usize,
}

impl Handler<GetLoad> for TaskSupervisor {
    type Result = Load;
    fn handle(&mut self, _: GetLoad, _: &mut Context<Self>) -> Load {
        Load {
            forks_in_use: self.used_forks,
            running: self.running.len(),
            queued: self.queue.len(),
        }
    }
}

/// `err` of a stopped task.
pub fn stop_err() -> String {
    "stopped through /api/stop".to_owned()
}

/// `err` of a task killed at its time limit.
pub fn timeout_err(secs: u64) -> String {
    format!("killed after running past its time limit of {secs} s")
}

/// A task an earlier server left running (or started without recording it), to adopt.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub spec: TaskSpec,
    pub started_at: chrono::NaiveDateTime,
    pub pid: i32,
    pub start_time: i64,
    pub stored_offset: u64,
}

/// At start: adopt what an earlier server left running, and queue its pending tasks again in
/// their original order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Recover {
    pub orphans: Vec<Orphan>,
    pub pending: Vec<TaskSpec>,
}

impl Handler<Recover> for TaskSupervisor {
    type Result = ();
    fn handle(&mut self, msg: Recover, ctx: &mut Context<Self>) {
        for orphan in msg.orphans {
            let origin = Origin::Adopt {
                pid: orphan.pid,
                start_time: orphan.start_time,
                stored_offset: orphan.stored_offset,
            };
            self.start_task(orphan.spec, orphan.started_at, origin, ctx);
        }
        for spec in msg.pending {
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
        if !msg.stop_tasks {
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
        })
    }
}
