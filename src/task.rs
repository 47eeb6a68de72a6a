//! TaskActor: one per running task. It writes the run directory, starts `ansible-playbook` in its
//! own session, follows `events.jsonl`, turns events into host results, kills the process group on
//! stop or time limit, records the end (through Persistence) and then tells the supervisor.
//!
//! Its own reads of the events file run under `ctx.wait`, so they never interleave with the end
//! sequence: the end always sees every event the process wrote.

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

/// How often the events file is read while the task runs.
const POLL: Duration = Duration::from_millis(200);

/// The actor of one task.
pub struct TaskActor {
    spec: TaskSpec,
    /// When the supervisor admitted the task: recorded as its start, so start times follow the
    /// queue order even when run directories of tasks admitted together are ready out of order.
    admitted_at: NaiveDateTime,
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
    /// Set once the task is being ended from outside, with the `err` to record.
    kill: Option<(Ending, String)>,
    ending: bool,
}

impl TaskActor {
    /// An actor for `spec`; it starts the process when started.
    pub fn new(
        spec: TaskSpec,
        admitted_at: NaiveDateTime,
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
            settings,
            run_root,
            persistence,
            supervisor,
            log,
            pgid: None,
            offset: 0,
            seq: 0,
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
        let path = self.dir.events();
        let offset = self.offset;
        let read = async move { read_from(path, offset).await };
        ctx.wait(read.into_actor(self).map(|chunk, act, _| match chunk {
            Ok(bytes) => act.consume(&bytes),
            Err(e) => warn!(act.log, "cannot read events file"; "error" => %e),
        }));
    }

    fn consume(&mut self, bytes: &[u8]) {
        let Some(last_nl) = bytes.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete = &bytes[..=last_nl];
        self.offset += complete.len() as u64;
        let mut events = Vec::new();
        for line in complete.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let text = String::from_utf8_lossy(line);
            let Some(ev) = parse_line(&text) else {
                warn!(
                    self.log,
                    "ignoring a line of events.jsonl that is not an event"
                );
                continue;
            };
            self.hosts.apply(&ev);
            self.seq += 1;
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
        let hosts = self.hosts.take_changed();
        if events.is_empty() && hosts.is_empty() {
            return;
        }
        self.persistence.do_send(SaveProgress {
            task_id: self.spec.id,
            events,
            offset: self.offset as i64,
            hosts,
        });
    }

    /// The process is gone (or never started): read the rest, clear leftovers, record the end.
    fn end(&mut self, exit: Result<ExitStatus, String>, ctx: &mut Context<Self>) {
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
        let group = self.pgid;
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
                        Ok(bytes) => act.consume(&bytes),
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

    fn record_end(
        &mut self,
        exit: Result<ExitStatus, String>,
        why: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        let (status, err, exit_code, ending) = match (&self.kill, &exit) {
            (Some((Ending::Stopped, err)), _) => {
                (Status::Stopped, Some(err.clone()), None, Ending::Stopped)
            }
            (Some((ending, err)), _) => (Status::Timeout, Some(err.clone()), None, *ending),
            (None, Err(reason)) => (Status::Failed, Some(reason.clone()), None, Ending::Exited),
            (None, Ok(st)) => {
                let (status, err) = self.judge(st, why);
                (status, err, st.code(), Ending::Exited)
            }
        };
        let exit_code = exit_code.or_else(|| exit.as_ref().ok().and_then(|s| s.code()));
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

    /// Status and `err` of a process that exited by itself.
    fn judge(&self, st: &ExitStatus, why: Option<String>) -> (Status, Option<String>) {
        if st.success() {
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
        let err = match (st.code(), why) {
            (Some(code), Some(why)) => format!("ansible-playbook exited with code {code}: {why}"),
            (Some(code), None) => format!("ansible-playbook exited with code {code}"),
            (None, _) => {
                use std::os::unix::process::ExitStatusExt;
                format!(
                    "ansible-playbook was killed by signal {}",
                    st.signal().unwrap_or(0)
                )
            }
        };
        (Status::Failed, Some(err))
    }
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
        let settings = self.settings.clone();
        let root = self.run_root.clone();
        let dir = self.dir.clone();
        let spec = self.spec.clone();
        let prepare = async move {
            let dir2 = dir.clone();
            let s2 = settings.clone();
            tokio::task::spawn_blocking(move || {
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
            let mut cmd = rundir::command(&settings, &root, &dir, spec.forks)
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
                        act.end(Err(reason), ctx);
                    }
                    Ok(child) => act.on_spawned(child, ctx),
                }),
        );
    }
}

impl TaskActor {
    fn on_spawned(&mut self, mut child: tokio::process::Child, ctx: &mut Context<Self>) {
        let Some(pid) = child.id().map(|p| p as i32) else {
            self.end(Err("ansible-playbook exited at once".into()), ctx);
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
        ctx.spawn(wait.into_actor(self).map(|status, act, ctx| {
            let exit = status.map_err(|e| format!("cannot wait for ansible-playbook: {e}"));
            act.end(exit, ctx);
        }));
        ctx.run_interval(POLL, |act, ctx| {
            if !act.ending {
                act.read_events(ctx);
            }
        });
        let limit = self.settings.task_time_limit_secs;
        ctx.run_later(Duration::from_secs(limit), move |act, ctx| {
            act.request_kill(Ending::Timeout, timeout_err(limit), ctx);
        });
        if let Some((ending, err)) = self.kill.take() {
            // Asked to end while the process was being started.
            self.request_kill(ending, err, ctx);
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
