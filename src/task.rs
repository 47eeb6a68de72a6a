//! TaskActor: one per running task. It writes the run directory, starts `ansible-playbook` in its
//! own session, follows `events.jsonl`, turns events into host results, kills the process group on
//! stop or time limit, records the end (through Persistence) and then tells the supervisor.
//!
//! After a restart it can instead adopt a task whose process outlived the previous server: it
//! rebuilds the host state from the events file, stores only the events not stored yet, and
//! watches the process through `/proc` (it is no longer our child, so there is no exit code).
//!
//! Whatever the files hold, the actor's memory stays bounded: `events.jsonl` is read through an
//! [`EventTail`] (one open descriptor, chunks of at most 256 KiB, over-long lines skipped), lines
//! that are not events are counted in a `lines_skipped` marker event, and `output.log` is held to
//! `max_output_bytes`. Its reads run under `ctx.wait`, so they never interleave with each other or
//! with the end sequence: the end always sees every event the process wrote.
//!
//! Before its end is sent to Persistence the verdict is also written to `end.json` in the run
//! directory, so an agent restarted before the database took it records the same end. If the
//! actor ever stops without recording an end (a panic in its code), its [`Guard`] kills the task's
//! process group and tells the supervisor, which releases the forks, answers the waiters and ends
//! the task as interrupted, saying so.

mod disk;
mod end_file;
mod ending;
mod follow;
mod guard;
pub mod ingest;
mod spec;
mod start;
pub mod verdict;

use end_file::HashMapCleaned;
pub use end_file::{read_end_file, EndFile};
use guard::Guard;
use ingest::Ingest;
pub use spec::{end_without_run, timeout_err, Origin, TaskReport, TaskSpec};

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::NaiveDateTime;
use slog::{info, Logger};

use crate::ansible::events::Ending;
use crate::ansible::rundir::RunDir;
use crate::ansible::tail::EventTail;
use crate::exec::cgroup::TaskCgroup;
use crate::exec::procs;
use crate::exec::Exec;
use crate::settings::Settings;
use crate::store::persistence::Persistence;
use verdict::Exit;

/// How often the events file is read (and an adopted process checked) while the task runs.
const POLL: Duration = Duration::from_millis(200);

/// The actor of one task.
pub struct TaskActor {
    spec: TaskSpec,
    /// When the supervisor admitted the task: recorded as its start, so start times follow the
    /// queue order even when run directories of tasks admitted together are ready out of order.
    admitted_at: NaiveDateTime,
    origin: Origin,
    settings: Arc<Settings>,
    /// The agent's run-directory root (callback plugin, ansible home).
    run_root: PathBuf,
    dir: RunDir,
    persistence: Addr<Persistence>,
    supervisor: Recipient<TaskReport>,
    log: Logger,
    /// Events and host results from events.jsonl.
    ingest: Ingest,
    /// Process (and group, and session) id once started.
    pgid: Option<i32>,
    /// The events file; taken while a read of it runs on the blocking pool.
    tail: Option<EventTail>,
    /// Bytes of output.log cut off past `max_output_bytes`.
    output_cut: u64,
    /// A read of the events file is queued: no second one may start from the same offset
    /// (actix's `run_interval` calls its closure once per missed tick when the thread is busy).
    reading: bool,
    /// A progress write is on its way: the next read waits (the file holds the rest meanwhile).
    saving: bool,
    /// Set once the task is being ended from outside, with the `err` to record.
    kill: Option<(Ending, String)>,
    /// The verdict an earlier server wrote to `end.json` (adopted task).
    recorded: Option<EndFile>,
    ending: bool,
    guard: Guard,
    exec: Exec,
    /// The task's cgroup, in cgroup mode, once started (or adopted).
    cgroup: Option<TaskCgroup>,
    /// The task's mark on its nodes (`DOWNLINK_TASK`), once known.
    mark: Option<String>,
    /// The run directory's disk as the last checks found it.
    disk: disk::DiskState,
}

impl TaskActor {
    /// An actor for `spec` in run directory `dir`; when started it spawns or adopts the process
    /// as `origin` says.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: TaskSpec,
        admitted_at: NaiveDateTime,
        origin: Origin,
        settings: Arc<Settings>,
        run_root: PathBuf,
        dir: RunDir,
        persistence: Addr<Persistence>,
        supervisor: Recipient<TaskReport>,
        shutting_down: Arc<AtomicBool>,
        exec: Exec,
        log: Logger,
    ) -> TaskActor {
        let guard_dir = dir.clone();
        TaskActor {
            // Read from the start, also when adopted: the host state is rebuilt from every line.
            tail: Some(EventTail::new(dir.events(), 0)),
            dir,
            // Lines up to the stored offset were stored by an earlier server (adopted task).
            ingest: Ingest::new(
                spec.id,
                &spec.nodes,
                match origin {
                    Origin::Adopt { stored_offset, .. } => stored_offset,
                    Origin::Spawn => 0,
                },
                settings.max_event_bytes,
                settings.max_events_per_task,
            ),
            guard: Guard {
                id: spec.id,
                supervisor: supervisor.clone(),
                pgid: None,
                cgroup: None,
                dir: guard_dir,
                armed: true,
                shutting_down,
            },
            spec,
            admitted_at,
            origin,
            settings,
            run_root,
            persistence,
            supervisor,
            log,
            pgid: None,
            output_cut: 0,
            reading: false,
            saving: false,
            kill: None,
            recorded: None,
            ending: false,
            exec,
            cgroup: None,
            mark: None,
            disk: disk::DiskState::default(),
        }
    }

    fn set_pgid(&mut self, pgid: Option<i32>) {
        self.pgid = pgid;
        self.guard.pgid = pgid;
    }
}

impl Actor for TaskActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        match self.origin {
            Origin::Spawn => self.spawn_process(ctx),
            Origin::Adopt {
                pid, start_time, ..
            } => {
                // Its cgroup (if it ran in one) and its mark on the nodes, from the earlier run.
                let cgroups = self.exec.tracking.cgroups().cloned();
                let (id, mark_file) = (self.spec.id, self.dir.remote_mark());
                let found = async move {
                    tokio::task::spawn_blocking(move || {
                        let cgroup = cgroups.and_then(|c| c.task(id).ok());
                        let mark = std::fs::read_to_string(mark_file).ok();
                        (cgroup, mark)
                    })
                    .await
                    .unwrap_or((None, None))
                };
                ctx.wait(found.into_actor(self).map(move |(cgroup, mark), act, ctx| {
                    act.guard.cgroup = cgroup.clone();
                    act.cgroup = cgroup;
                    act.mark = mark.map(|m| m.trim().to_owned()).filter(|m| !m.is_empty());
                    if procs::is_alive(pid, start_time) {
                        info!(act.log, "re-adopted a running task"; "pid" => pid);
                        act.set_pgid(Some(pid));
                        act.read_events(ctx);
                        act.follow(ctx);
                    } else {
                        act.end(
                            Exit::Vanished {
                                pid,
                                at_start: true,
                            },
                            ctx,
                        );
                    }
                }));
            }
        }
    }
}

/// End the task: SIGTERM to its process group, SIGKILL after the grace period.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Kill {
    pub ending: Ending,
    pub err: String,
}

impl Handler<Kill> for TaskActor {
    type Result = ();
    fn handle(&mut self, msg: Kill, ctx: &mut Context<Self>) {
        if self.pgid.is_none() && !self.ending {
            // Not started yet: remembered and applied right after the spawn.
            self.kill.get_or_insert((msg.ending, msg.err));
            return;
        }
        self.request_kill(msg.ending, msg.err, ctx);
    }
}
