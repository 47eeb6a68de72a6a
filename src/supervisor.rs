//! TaskSupervisor: the actor that admits tasks (the FIFO queue and forks budget of
//! [`admission`]), starts a TaskActor for each, routes ends ([`end`]), claims from the shared
//! queue ([`shared`]) and, at start, carries out the recovery plan ([`recover`]).
//!
//! Admission and release happen inside this actor's handlers, one at a time, so they cannot race.
//!
//! It is also the reconciler. It knows the truth of every task it holds: queued, started (the
//! [`MarkRunning`] its TaskActor sent), or ended with a write the database never took (kept in
//! `owed`, and in the run directory's `end.json`). Every `reconcile_secs` it hands those truths to
//! Persistence, which brings any row that fell behind up to them; an owed end is dropped once it
//! is written. A task whose TaskActor stops without an end (a panic) is ended here.

pub mod admission;
pub mod end;
pub mod fence;
pub mod recover;
pub mod recovery;
pub mod shared;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use slog::{info, o, warn, Logger};
use tokio::sync::oneshot;

use crate::ansible::events::Ending;
use crate::ansible::rundir::RunDir;
use crate::exec::connections::CloseAll;
use crate::exec::Exec;
use crate::settings::Settings;
use crate::store::persistence::{MarkRunning, Persistence, Repair, Truth};
use crate::store::Finish;
use crate::task::{Kill, Origin, TaskActor, TaskReport, TaskSpec};
use crate::time;
use admission::{Admission, Queued};

pub use admission::{QueuePlace, QueueSlots};
pub use end::{stop_err, EndOutcome, EndReason, EndTask};
pub use fence::{Fence, HeartbeatClock, Renewed};
pub use recover::Recover;
pub use shared::{CheckStops, Claim};

impl Queued for TaskSpec {
    fn id(&self) -> i64 {
        self.id
    }
    fn forks(&self) -> u32 {
        self.forks
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
    /// The pending queue and the forks budget.
    admission: Admission<TaskSpec>,
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
    /// Lost agents' tasks being ended here (their nodes being cleaned).
    reaping: std::collections::HashSet<i64>,
    /// This agent's heartbeat is overdue: its tasks were stopped and nothing is claimed until it
    /// is renewed (`fence.rs`).
    fenced: bool,
    /// When the heartbeat was last renewed (written by the heartbeat loop).
    heartbeat: Arc<fence::HeartbeatClock>,
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
            admission: Admission::new(settings.max_forks),
            settings,
            run_root,
            persistence,
            slots,
            log,
            running: HashMap::new(),
            waiters: HashMap::new(),
            owed: BTreeMap::new(),
            reconciling: false,
            closing: false,
            shared: None,
            claiming: false,
            claim_failing: false,
            reaping: Default::default(),
            fenced: false,
            heartbeat: Arc::default(),
            shutting_down: Arc::new(AtomicBool::new(false)),
            exec,
        }
    }

    /// The clock the heartbeat loop keeps (claims wait while it is overdue).
    pub fn heartbeat_clock(&self) -> Arc<fence::HeartbeatClock> {
        self.heartbeat.clone()
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
        while let Some(spec) = self.admission.admit_head() {
            self.slots.give_back();
            self.launch(spec, ctx);
        }
        self.claim(ctx);
    }

    /// Starts a task taken from the head of the queue (this agent's or the shared one), its
    /// forks already charged.
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

    /// Starts a task's actor (its forks are charged by the caller).
    fn start_task(
        &mut self,
        spec: TaskSpec,
        started_at: chrono::NaiveDateTime,
        origin: Origin,
        dir: RunDir,
        started: Option<MarkRunning>,
        ctx: &mut Context<Self>,
    ) {
        let log = self
            .log
            .new(o!("task_id" => spec.id, "task_name" => spec.name.clone()));
        info!(log, "task admitted"; "forks" => spec.forks, "forks_in_use" => self.admission.used());
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
}

impl Actor for TaskSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = std::time::Duration::from_secs(self.settings.reconcile_secs);
        ctx.run_interval(every, |act, ctx| act.reconcile(ctx));
        if self.shared.is_some() {
            // The fallback for a lost NOTIFY.
            ctx.run_interval(std::time::Duration::from_secs(1), |act, ctx| act.claim(ctx));
            ctx.run_interval(self.settings.heartbeat(), |act, ctx| {
                act.check_stops(ctx);
                act.check_ended_elsewhere(ctx);
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
        self.admission.push(msg.spec);
        let rx = msg.wait.then(|| self.wait_for(id));
        self.admit(ctx);
        rx
    }
}

/// Where a pending task stands in the queue, for `/api/check`.
#[derive(Message)]
#[rtype(result = "Option<QueuePlace>")]
pub struct WhereInQueue(pub i64);

impl Handler<WhereInQueue> for TaskSupervisor {
    type Result = Option<QueuePlace>;
    fn handle(&mut self, msg: WhereInQueue, _: &mut Context<Self>) -> Self::Result {
        if self.closing {
            return Some(QueuePlace {
                position: self.admission.place(msg.0).and_then(|p| p.position),
                waiting_for: "the server is shutting down; it starts after the next start"
                    .to_owned(),
            });
        }
        if let Some(place) = self.admission.place(msg.0) {
            return Some(place);
        }
        // Pending in its row but not queued: admitted and starting, or about to be queued.
        let waiting_for = if self.running.contains_key(&msg.0) {
            "admitted; ansible-playbook is starting"
        } else {
            "accepted; joining the queue"
        };
        Some(QueuePlace {
            position: None,
            waiting_for: waiting_for.to_owned(),
        })
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
            queued: self.admission.len(),
            forks_in_use: self.admission.used(),
            forks_budget: self.settings.max_forks,
        }
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
        let log = self.log.clone();
        Box::pin(async move {
            for rx in ends {
                // Answered when the task's end is handled (or the supervisor is gone).
                rx.await.ok();
            }
            if let Err(e) = connections.send(CloseAll { tasks_left: false }).await {
                warn!(log, "cannot close the SSH connections at shutdown"; "error" => %e);
            }
        })
    }
}
