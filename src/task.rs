//! TaskActor: one per running task. It writes the run directory, starts `ansible-playbook` in its
//! own session, follows `events.jsonl`, turns events into host results, kills the process group on
//! stop or time limit, records the end (through Persistence) and then tells the supervisor.
//!
//! After a restart it can instead adopt a task whose process outlived the previous server: it
//! rebuilds the host state from the whole events file, stores only the events not stored yet, and
//! watches the process through `/proc` (it is no longer our child, so there is no exit code).
//!
//! Its reads of the events file run under `ctx.wait`, so they never interleave with each other or
//! with the end sequence: the end always sees every event the process wrote.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::NaiveDateTime;
use nix::sys::signal::Signal;
use slog::{error, info, warn, Logger};

use crate::ansible::events::{parse_line, Ending, Hosts};
use crate::ansible::rundir::{self, Job, RunDir};
use crate::persistence::{FinishTask, MarkRunning, Persistence, SaveProgress};
use crate::procs;
use crate::settings::Settings;
use crate::status::Status;
use crate::store::{Finish, NewEvent};
use crate::supervisor::{timeout_err, TaskEnded, TaskSpec, TaskSupervisor};
use crate::time;

/// How often the events file is read (and an adopted process checked) while the task runs.
const POLL: Duration = Duration::from_millis(200);

/// Where the task's process comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Start `ansible-playbook` now.
    Spawn,
    /// A process started by an earlier server: follow it (or record its end if it is gone).
    Adopt {
        pid: i32,
        start_time: i64,
        /// Bytes of events.jsonl already stored.
        stored_offset: u64,
    },
}

/// How the process ended, as far as this actor could see.
#[derive(Debug)]
enum Exit {
    /// Our child exited with this status.
    Status(ExitStatus),
    /// An adopted process is gone; `at_start` if it was already gone when adopted.
    Vanished { pid: i32, at_start: bool },
    /// It never started.
    NotStarted(String),
}

/// The actor of one task.
pub struct TaskActor {
    spec: TaskSpec,
    /// When the supervisor admitted the task: recorded as its start, so start times follow the
    /// queue order even when run directories of tasks admitted together are ready out of order.
    admitted_at: NaiveDateTime,
    origin: Origin,
    settings: Arc<Settings>,
    run_root: PathBuf,
    dir: RunDir,
    persistence: Addr<Persistence>,
    supervisor: Addr<TaskSupervisor>,
    log: Logger,
    hosts: Hosts,
    /// Process (and group, and session) id once started.
    pgid: Option<i32>,
    /// Bytes of events.jsonl consumed (complete lines only).
    offset: u64,
    seq: i32,
    /// A read of the events file is queued: no second one may start from the same offset
    /// (actix's `run_interval` calls its closure once per missed tick when the thread is busy).
    reading: bool,
    /// A progress write is on its way: the next read waits (the file holds the rest meanwhile).
    saving: bool,
    /// Set once the task is being ended from outside, with the `err` to record.
    kill: Option<(Ending, String)>,
    ending: bool,
}

impl TaskActor {
    /// An actor for `spec`; when started it spawns or adopts the process as `origin` says.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: TaskSpec,
        admitted_at: NaiveDateTime,
        origin: Origin,
        settings: Arc<Settings>,
        run_root: PathBuf,
        persistence: Addr<Persistence>,
        supervisor: Addr<TaskSupervisor>,
        log: Logger,
    ) -> TaskActor {
        TaskActor {
            dir: RunDir::of(&run_root, spec.id),
            hosts: Hosts::new(&spec.nodes),
            spec,
            admitted_at,
            origin,
            settings,
            run_root,
            persistence,
            supervisor,
            log,
            pgid: None,
            offset: 0,
            seq: 0,
            reading: false,
            saving: false,
            kill: None,
            ending: false,
        }
    }

    /// Sends SIGTERM to the whole process group now and SIGKILL after the grace period.
    fn terminate(&mut self, ctx: &mut Context<Self>) {
        let Some(pgid) = self.pgid else {
            return;
        };
        procs::signal_group(pgid, Signal::SIGTERM);
        let grace = Duration::from_secs(self.settings.stop_grace_secs);
        ctx.run_later(grace, move |act, _| {
            if act.pgid.is_some() {
                warn!(
                    act.log,
                    "process group outlived the grace period, killing it"
                );
                procs::signal_group(pgid, Signal::SIGKILL);
            }
        });
    }

    fn request_kill(&mut self, ending: Ending, err: String, ctx: &mut Context<Self>) {
        if self.kill.is_some() || self.ending {
            return;
        }
        info!(self.log, "ending task"; "reason" => %err);
        self.kill = Some((ending, err));
        self.terminate(ctx);
    }

    /// Reads new complete lines of events.jsonl, blocking the actor's other work meanwhile.
    fn read_events(&mut self, ctx: &mut Context<Self>) {
        if self.reading {
            return;
        }
        self.reading = true;
        let path = self.dir.events();
        let offset = self.offset;
        let read = async move { read_from(path, offset).await };
        ctx.wait(read.into_actor(self).map(|chunk, act, ctx| {
            act.reading = false;
            match chunk {
                Ok(bytes) => act.consume(&bytes, ctx),
                Err(e) => warn!(act.log, "cannot read events file"; "error" => %e),
            }
        }));
    }

    /// Applies complete lines to the host state and sends what is new to Persistence.
    fn consume(&mut self, bytes: &[u8], ctx: &mut Context<Self>) {
        let Some(last_nl) = bytes.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let stored = match self.origin {
            Origin::Adopt { stored_offset, .. } => stored_offset,
            Origin::Spawn => 0,
        };
        let mut events = Vec::new();
        for line in bytes[..=last_nl].split_inclusive(|&b| b == b'\n') {
            self.offset += line.len() as u64;
            let text = String::from_utf8_lossy(line);
            if text.trim().is_empty() {
                continue;
            }
            let Some(ev) = parse_line(text.trim_end(), self.settings.max_event_bytes) else {
                warn!(
                    self.log,
                    "ignoring a line of events.jsonl that is not an event"
                );
                continue;
            };
            self.hosts.apply(&ev);
            self.seq += 1;
            let limit = self.settings.max_events_per_task;
            // Events up to the stored offset are already in the database (adopted task).
            if self.offset > stored && self.seq == limit + 1 {
                events.push(NewEvent {
                    task_id: self.spec.id,
                    seq: self.seq,
                    host: None,
                    kind: "events_truncated".into(),
                    task_name: None,
                    payload: format!(
                        "{{\"event\":\"events_truncated\",\"stored\":{limit},\"note\":\"later events are not stored; host results still count them; all are in events.jsonl\"}}"
                    ),
                    created_at: ev.time,
                });
            } else if self.offset > stored && self.seq <= limit {
                events.push(NewEvent {
                    task_id: self.spec.id,
                    seq: self.seq,
                    host: ev.host,
                    kind: ev.kind,
                    task_name: ev.task,
                    payload: ev.payload,
                    created_at: ev.time,
                });
            }
        }
        let hosts = self.hosts.take_changed();
        if events.is_empty() && hosts.is_empty() {
            return;
        }
        self.saving = true;
        let save = self.persistence.send(SaveProgress {
            task_id: self.spec.id,
            events,
            offset: self.offset as i64,
            hosts,
        });
        ctx.spawn(save.into_actor(self).map(|_, act, _| act.saving = false));
    }

    /// The process is gone (or never started): read the rest, clear leftovers, record the end.
    fn end(&mut self, exit: Exit, ctx: &mut Context<Self>) {
        if self.ending {
            return;
        }
        self.ending = true;
        // One future for the whole sequence: actix polls `ctx.wait` futures last-in first-out, so
        // separate waits for "read the rest" and "sweep" would run in the wrong order.
        let events = self.dir.events();
        let offset = self.offset;
        let mark = self.dir.mark();
        let output = self.dir.output();
        // Only the group of our own child (already waited for) may be reaped here.
        let group = if matches!(exit, Exit::Status(_)) {
            self.pgid
        } else {
            None
        };
        let rest = async move {
            let bytes = read_from(events, offset).await;
            let swept = tokio::task::spawn_blocking(move || {
                let killed = procs::kill_marked(&mark, group);
                let text = std::fs::read_to_string(output).unwrap_or_default();
                (killed, rundir::error_line(&text))
            })
            .await
            .unwrap_or((0, None));
            (bytes, swept)
        };
        ctx.wait(
            rest.into_actor(self)
                .map(move |(bytes, (killed, why)), act, ctx| {
                    match bytes {
                        Ok(bytes) => act.consume(&bytes, ctx),
                        Err(e) => warn!(act.log, "cannot read events file"; "error" => %e),
                    }
                    if killed > 0 {
                        info!(act.log, "killed processes left by the task"; "count" => killed);
                    }
                    act.pgid = None;
                    act.record_end(exit, why, ctx);
                }),
        );
    }

    fn record_end(&mut self, exit: Exit, why: Option<String>, ctx: &mut Context<Self>) {
        let (status, err, ending) = match (&self.kill, &exit) {
            (Some((Ending::Stopped, err)), _) => {
                (Status::Stopped, Some(err.clone()), Ending::Stopped)
            }
            (Some((ending, err)), _) => (Status::Timeout, Some(err.clone()), *ending),
            (None, Exit::NotStarted(reason)) => {
                (Status::Failed, Some(reason.clone()), Ending::Exited)
            }
            (None, Exit::Status(st)) => {
                let (status, err) = self.judge(st.success(), st.code(), exit_signal(st), why);
                (status, err, Ending::Exited)
            }
            (None, Exit::Vanished { pid, at_start }) => {
                if self.hosts.has_final_stats() {
                    // It finished while no server watched: its stats say how.
                    let ok = self.hosts.failures().is_empty();
                    let (status, err) = self.judge(ok, None, None, why);
                    (status, err, Ending::Exited)
                } else if *at_start {
                    let err =
                        format!("ansible-playbook (pid {pid}) was gone when downlink restarted");
                    (Status::Interrupted, Some(err), Ending::Interrupted)
                } else {
                    let detail = why.map(|w| format!(": {w}")).unwrap_or_default();
                    let err = format!(
                        "ansible-playbook (pid {pid}) ended without its final stats{detail}"
                    );
                    (Status::Failed, Some(err), Ending::Exited)
                }
            }
        };
        let exit_code = match &exit {
            Exit::Status(st) => st.code(),
            _ => None,
        };
        let fin = Finish {
            id: self.spec.id,
            status,
            err,
            exit_code,
            ended_at: time::now(),
            hosts: self.hosts.finish(ending),
        };
        let fut = self.persistence.send(FinishTask(fin));
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
            match res {
                Ok(Ok(_)) => info!(act.log, "task ended"; "status" => status.code()),
                Ok(Err(e)) => error!(act.log, "cannot record the end of the task"; "error" => %e),
                Err(e) => error!(act.log, "persistence is gone"; "error" => %e),
            }
            act.supervisor.do_send(TaskEnded(act.spec.id));
            ctx.stop();
        }));
    }

    /// Status and `err` of a process that ended by itself.
    fn judge(
        &self,
        success: bool,
        code: Option<i32>,
        signal: Option<i32>,
        why: Option<String>,
    ) -> (Status, Option<String>) {
        if success {
            return (Status::Success, None);
        }
        let failures = self.hosts.failures();
        if !failures.is_empty() {
            let detail: Vec<String> = failures
                .iter()
                .map(|(host, kind, msg)| match msg {
                    Some(m) => format!("{host} {kind} ({})", one_line(m, 200)),
                    None => format!("{host} {kind}"),
                })
                .collect();
            let err = format!(
                "{} of {} hosts failed: {}",
                failures.len(),
                self.hosts.len(),
                detail.join("; ")
            );
            return (Status::Failed, Some(err));
        }
        let err = match (code, signal, why) {
            (Some(code), _, Some(why)) => {
                format!("ansible-playbook exited with code {code}: {why}")
            }
            (Some(code), _, None) => format!("ansible-playbook exited with code {code}"),
            (None, Some(sig), _) => format!("ansible-playbook was killed by signal {sig}"),
            (None, None, why) => why.unwrap_or_else(|| "ansible-playbook failed".into()),
        };
        (Status::Failed, Some(err))
    }

    fn spawn_process(&mut self, ctx: &mut Context<Self>) {
        let settings = self.settings.clone();
        let root = self.run_root.clone();
        let dir = self.dir.clone();
        let spec = self.spec.clone();
        let prepare = async move {
            let dir2 = dir.clone();
            let s2 = settings.clone();
            let run_as = tokio::task::spawn_blocking(move || {
                let job = Job {
                    nodes: &spec.nodes,
                    remote_user: &spec.remote_user,
                    content: &spec.content,
                    params: &spec.params,
                };
                rundir::prepare(&s2, &dir2, &job)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot prepare the run directory: {e}"))?;
            let mut cmd = rundir::command(&settings, &root, &dir, spec.forks, run_as.as_ref())
                .map_err(|e| format!("cannot prepare the run directory: {e}"))?;
            cmd.spawn().map_err(|e| {
                format!(
                    "cannot start ansible-playbook ({}): {e}",
                    settings.ansible_playbook
                )
            })
        };
        ctx.wait(
            prepare
                .into_actor(self)
                .map(|spawned, act, ctx| match spawned {
                    Err(reason) => {
                        error!(act.log, "task could not start"; "error" => %reason);
                        act.end(Exit::NotStarted(reason), ctx);
                    }
                    Ok(child) => act.on_spawned(child, ctx),
                }),
        );
    }

    fn on_spawned(&mut self, mut child: tokio::process::Child, ctx: &mut Context<Self>) {
        let Some(pid) = child.id().map(|p| p as i32) else {
            self.end(
                Exit::NotStarted("ansible-playbook exited at once".into()),
                ctx,
            );
            return;
        };
        self.pgid = Some(pid);
        let started = procs::start_time(pid).unwrap_or(0);
        info!(self.log, "ansible-playbook started"; "pid" => pid, "forks" => self.spec.forks);
        self.persistence.do_send(MarkRunning {
            task_id: self.spec.id,
            nodes: self.spec.nodes.clone(),
            started_at: self.admitted_at,
            pid,
            pid_start_time: started,
            instance: self.run_root.to_string_lossy().into_owned(),
        });
        let wait = async move { child.wait().await };
        ctx.spawn(wait.into_actor(self).map(|status, act, ctx| match status {
            Ok(st) => act.end(Exit::Status(st), ctx),
            Err(e) => act.end(
                Exit::NotStarted(format!("cannot wait for ansible-playbook: {e}")),
                ctx,
            ),
        }));
        self.follow(ctx);
    }

    /// Polls the events file and arms the time limit; for an adopted process, also watches it.
    fn follow(&mut self, ctx: &mut Context<Self>) {
        let adopted = match self.origin {
            Origin::Adopt {
                pid, start_time, ..
            } => Some((pid, start_time)),
            Origin::Spawn => None,
        };
        ctx.run_interval(POLL, move |act, ctx| {
            if act.ending {
                return;
            }
            if let Some((pid, start)) = adopted {
                if !procs::is_alive(pid, start) {
                    act.end(
                        Exit::Vanished {
                            pid,
                            at_start: false,
                        },
                        ctx,
                    );
                    return;
                }
            }
            if !act.saving {
                act.read_events(ctx);
            }
        });
        let limit = self.settings.task_time_limit_secs;
        let elapsed = (time::now() - self.admitted_at)
            .to_std()
            .unwrap_or_default();
        let left = Duration::from_secs(limit).saturating_sub(elapsed);
        ctx.run_later(left, move |act, ctx| {
            act.request_kill(Ending::Timeout, timeout_err(limit), ctx);
        });
        if let Some((ending, err)) = self.kill.take() {
            // Asked to end while the process was being started.
            self.request_kill(ending, err, ctx);
        }
    }
}

fn exit_signal(st: &ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    st.signal()
}

fn one_line(s: &str, max: usize) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(max)
        .collect()
}

async fn read_from(path: PathBuf, offset: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).await?;
    Ok(buf)
}

impl Actor for TaskActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        match self.origin {
            Origin::Spawn => self.spawn_process(ctx),
            Origin::Adopt {
                pid, start_time, ..
            } => {
                if procs::is_alive(pid, start_time) {
                    info!(self.log, "re-adopted a running task"; "pid" => pid);
                    self.pgid = Some(pid);
                    // The whole file, to rebuild the host state; only new events are stored.
                    self.read_events(ctx);
                    self.follow(ctx);
                } else {
                    self.end(
                        Exit::Vanished {
                            pid,
                            at_start: true,
                        },
                        ctx,
                    );
                }
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
