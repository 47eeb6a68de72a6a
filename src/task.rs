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

pub mod verdict;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::NaiveDateTime;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use slog::{error, info, warn, Logger};

use crate::ansible::events::{parse_line, Ending, Event, Hosts};
use crate::ansible::rundir::{self, Job, RunDir};
use crate::ansible::tail::{self, Chunk, EventTail, Piece};
use crate::exec::cgroup::TaskCgroup;
use crate::exec::command::{self, RunAs};
use crate::exec::connections::{self, Acquire};
use crate::exec::procs;
use crate::exec::remote::{self, Cleaned};
use crate::exec::spawn;
use crate::exec::Exec;
use crate::settings::Settings;
use crate::status::Status;
use crate::store::clean;
use crate::store::persistence::{FinishTask, MarkRunning, Persistence, SaveProgress};
use crate::store::{Finish, HostState, NewEvent, Task, Usage};
use crate::time;
use verdict::{verdict, Exit, Verdict};

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
    /// When the task was stored (its queue wait starts here).
    pub created_at: NaiveDateTime,
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
            created_at: task.created_at,
        })
    }
}

/// `err` of a task killed at its time limit.
pub fn timeout_err(secs: u64) -> String {
    format!("killed after running past its time limit of {secs} s")
}

/// What a TaskActor tells its supervisor (through a `Recipient`, so this module does not depend
/// on the supervisor's).
#[derive(Message)]
#[rtype(result = "()")]
pub enum TaskReport {
    /// Its process started (the same record it sent to Persistence).
    Started(MarkRunning),
    /// It ended; `unrecorded` is the end the database did not take (the reconciler writes it).
    Ended { id: i64, unrecorded: Option<Finish> },
    /// The actor went away without recording an end (its code panicked); `killed` if the task's
    /// process group was killed then.
    Lost { id: i64, killed: bool },
}

/// How often the events file is read (and an adopted process checked) while the task runs.
const POLL: Duration = Duration::from_millis(200);
/// Longest excerpt of a skipped line kept in its marker event.
const EXCERPT: usize = 200;

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

/// The verdict as written to `end.json` before it is sent to the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndFile {
    pub status: i32,
    pub err: Option<String>,
    pub exit_code: Option<i32>,
}

impl EndFile {
    /// How host results close for this status.
    pub fn ending(&self) -> Ending {
        match self.status {
            5 => Ending::Stopped,
            6 => Ending::Timeout,
            7 => Ending::Interrupted,
            _ => Ending::Exited,
        }
    }
}

/// What the cleanup found on each node.
type HashMapCleaned = std::collections::HashMap<String, Cleaned>;

/// Host results after a stop or time limit, with what cleaning each node found: a host that
/// could not be cleaned says so in its message (a failure message it already has is kept).
fn with_cleanup(mut hosts: Vec<HostState>, cleaned: &HashMapCleaned) -> Vec<HostState> {
    if cleaned.is_empty() {
        return hosts;
    }
    for h in &mut hosts {
        let ended = h.result.as_deref().unwrap_or("stopped").to_owned();
        let note = match cleaned.get(&h.host) {
            Some(Cleaned::Clean { .. }) => continue,
            Some(Cleaned::Left { left, .. }) => format!(
                "{ended}; {left} processes of this task could not be killed on the node"
            ),
            Some(Cleaned::Failed(why)) => format!(
                "{ended}; the node could not be cleaned ({why}): processes this task started there may still run"
            ),
            None if matches!(ended.as_str(), "failed" | "unreachable") => continue,
            None => format!(
                "{ended}; cleaning the node did not finish in time: processes this task started there may still run"
            ),
        };
        h.msg.get_or_insert(note);
    }
    hosts
}

/// Reads a run directory's `end.json`, if it has a readable one.
pub fn read_end_file(dir: &RunDir) -> Option<EndFile> {
    let text = std::fs::read(dir.verdict()).ok()?;
    serde_json::from_slice(&text).ok()
}

impl EndFile {
    /// Writes it as the run directory's `end.json` (creating the directory for a task that never
    /// ran). Blocking.
    pub fn write(&self, dir: &RunDir) -> std::io::Result<()> {
        std::fs::create_dir_all(&dir.path)?;
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.verdict(), json)
    }
}

/// Kills every process of the task (its cgroup, and its process group) and tells the supervisor
/// if the actor goes away without having recorded its end (its code panicked). Not when the whole
/// server is shutting down: then the process is left to the next start, which adopts it.
struct Guard {
    id: i64,
    supervisor: Recipient<TaskReport>,
    pgid: Option<i32>,
    /// ansible's workers each start a session of their own: only the cgroup holds them all
    /// (without one, they are found by the run directory's mark).
    cgroup: Option<TaskCgroup>,
    dir: RunDir,
    armed: bool,
    shutting_down: Arc<AtomicBool>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.armed || self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        match (&self.cgroup, self.pgid) {
            (Some(cg), _) => cg.kill(),
            (None, Some(pgid)) => {
                procs::kill_leftovers(&self.dir.mark(), &self.dir.path, Some(pgid));
            }
            (None, None) => {}
        }
        if let Some(pgid) = self.pgid {
            procs::signal_group(pgid, Signal::SIGKILL);
        }
        self.supervisor.do_send(TaskReport::Lost {
            id: self.id,
            killed: self.pgid.is_some(),
        });
    }
}

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
    hosts: Hosts,
    /// Process (and group, and session) id once started.
    pgid: Option<i32>,
    /// The events file; taken while a read of it runs on the blocking pool.
    tail: Option<EventTail>,
    seq: i32,
    /// Lines of events.jsonl that were not events.
    skipped: u64,
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
            hosts: Hosts::new(&spec.nodes),
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
            seq: 0,
            skipped: 0,
            output_cut: 0,
            reading: false,
            saving: false,
            kill: None,
            recorded: None,
            ending: false,
            exec,
            cgroup: None,
            mark: None,
        }
    }

    fn set_pgid(&mut self, pgid: Option<i32>) {
        self.pgid = pgid;
        self.guard.pgid = pgid;
    }

    /// Sends SIGTERM to every process of the task now (its cgroup, and its process group) and
    /// kills them all after the grace period.
    fn terminate(&mut self, ctx: &mut Context<Self>) {
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

    fn request_kill(&mut self, ending: Ending, err: String, ctx: &mut Context<Self>) {
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

    /// Reads the next chunk of events.jsonl (and holds output.log to its limit) on the blocking
    /// pool, blocking the actor's other work meanwhile.
    fn read_events(&mut self, ctx: &mut Context<Self>) {
        if self.reading {
            return;
        }
        let output = self.dir.output();
        let limit = self.settings.max_output_bytes;
        // An idle task (nothing new in events.jsonl, output.log within its limit) is checked
        // here with an fstat and a stat, without a trip to the blocking pool and back.
        let output_over = std::fs::metadata(&output).map_or(true, |m| m.len() > limit);
        let Some(tail) = self.tail.as_mut() else {
            return;
        };
        if !output_over && !tail.changed().unwrap_or(true) {
            return;
        }
        let Some(tail) = self.tail.take() else {
            return;
        };
        self.reading = true;
        let read = async move {
            tokio::task::spawn_blocking(move || {
                let mut tail = tail;
                let chunk = tail.read(false);
                let cut = rundir::bound_output(&output, limit);
                (tail, chunk, cut)
            })
            .await
        };
        ctx.wait(read.into_actor(self).map(|joined, act, ctx| {
            act.reading = false;
            let Ok((tail, chunk, cut)) = joined else {
                error!(act.log, "the events reader stopped unexpectedly");
                return;
            };
            act.tail = Some(tail);
            act.note_output_cut(cut);
            match chunk {
                Ok(chunk) => {
                    let more = chunk.more;
                    if let Some(save) = act.consume(chunk) {
                        act.saving = true;
                        ctx.spawn(save.into_actor(act).map(move |_, act, ctx| {
                            act.saving = false;
                            // A full chunk: more is waiting; read it now rather than next tick.
                            if more && !act.ending {
                                act.read_events(ctx);
                            }
                        }));
                    }
                }
                Err(e) => warn!(act.log, "cannot read events file"; "error" => %e),
            }
        }));
    }

    fn note_output_cut(&mut self, cut: std::io::Result<u64>) {
        match cut {
            Ok(0) => {}
            Ok(n) => {
                if self.output_cut == 0 {
                    warn!(self.log, "output.log reached max_output_bytes; cutting what passes it";
                          "max_output_bytes" => self.settings.max_output_bytes);
                }
                self.output_cut += n;
            }
            Err(e) => warn!(self.log, "cannot check the size of output.log"; "error" => %e),
        }
    }

    /// Applies the pieces read to the host state; the write that stores what is new, if any.
    ///
    /// Every line gets one sequence number, an event or a `line_skipped` marker for a line that is
    /// not one, so an adopting server numbers the file exactly as the server before it did.
    fn consume(&mut self, chunk: Chunk) -> Option<Request<Persistence, SaveProgress>> {
        fail::fail_point!(
            "task-consume",
            self.spec.name.starts_with("failpoint-panic"),
            |_| None
        );
        // Lines up to the stored offset were stored by an earlier server (adopted task).
        let stored = match self.origin {
            Origin::Adopt { stored_offset, .. } => stored_offset,
            Origin::Spawn => 0,
        };
        let mut events = Vec::new();
        let mut offset = 0;
        for (end, piece) in chunk.pieces {
            offset = end;
            let (event, skipped) = match piece {
                Piece::Line(bytes) | Piece::Cut(bytes) => match self.decode(&bytes) {
                    Ok(ev) => (Some(ev), None),
                    Err(excerpt) => (
                        None,
                        Some(json!({"bytes": bytes.len(), "excerpt": excerpt})),
                    ),
                },
                Piece::TooLong(len) => (
                    None,
                    Some(json!({"bytes": len, "excerpt": null,
                    "why": format!("longer than {} bytes", tail::MAX_LINE)})),
                ),
                Piece::Truncated(len) => (
                    None,
                    Some(json!({"bytes": 0, "excerpt": null,
                    "why": format!("events.jsonl was truncated to {len} bytes while the task ran")})),
                ),
            };
            let keep = end > stored;
            if let Some(ev) = event {
                self.hosts.apply(&ev);
                self.seq += 1;
                if keep {
                    self.push(ev.host, ev.kind, ev.task, ev.payload, ev.time, &mut events);
                }
            } else if let Some(mut detail) = skipped {
                self.seq += 1;
                self.skipped += 1;
                if self.skipped == 1 {
                    warn!(self.log, "events.jsonl holds lines that are not events; each is stored as a line_skipped marker");
                }
                detail["event"] = json!("line_skipped");
                if keep {
                    self.push(
                        None,
                        "line_skipped".into(),
                        None,
                        detail.to_string(),
                        time::now(),
                        &mut events,
                    );
                }
            }
        }
        let hosts = self.hosts.take_changed();
        if events.is_empty() && hosts.is_empty() {
            return None;
        }
        Some(self.persistence.send(SaveProgress {
            task_id: self.spec.id,
            events,
            offset: offset.max(stored) as i64,
            hosts,
        }))
    }

    /// One line as an event; an excerpt of it if it is not one.
    fn decode(&self, bytes: &[u8]) -> Result<Event, String> {
        let text = clean::bytes(bytes);
        let line = text.trim();
        let max = self.settings.max_event_bytes;
        parse_line(line, max)
            .or_else(|| clean::repair_json_escapes(line).and_then(|fixed| parse_line(&fixed, max)))
            .ok_or_else(|| line.chars().take(EXCERPT).collect())
    }

    /// Keeps an event (already numbered) for storing, within `max_events_per_task`; the first
    /// one past the limit is replaced by an `events_truncated` marker.
    fn push(
        &self,
        host: Option<String>,
        kind: String,
        task_name: Option<String>,
        payload: String,
        created_at: NaiveDateTime,
        out: &mut Vec<NewEvent>,
    ) {
        let limit = self.settings.max_events_per_task;
        let event = |host, kind, task_name, payload| NewEvent {
            task_id: self.spec.id,
            seq: self.seq,
            host,
            kind,
            task_name,
            payload,
            created_at,
        };
        if self.seq == limit + 1 {
            out.push(event(None, "events_truncated".into(), None, format!(
                "{{\"event\":\"events_truncated\",\"stored\":{limit},\"note\":\"later events are not stored; host results still count them; all are in events.jsonl\"}}"
            )));
        } else if self.seq <= limit {
            out.push(event(host, kind, task_name, payload));
        }
    }

    /// The process is gone (or never started): read the rest, clear leftovers, record the end.
    fn end(&mut self, exit: Exit, ctx: &mut Context<Self>) {
        if self.ending {
            return;
        }
        self.ending = true;
        self.drain(exit, ctx);
    }

    /// Reads what is left of the events file chunk by chunk, each stored before the next is read
    /// (so the end costs no more memory than a poll), then finishes.
    fn drain(&mut self, exit: Exit, ctx: &mut Context<Self>) {
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
    fn finish(&mut self, exit: Exit, ctx: &mut Context<Self>) {
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
        let local = async move {
            tokio::task::spawn_blocking(move || {
                let (killed, emptied, usage) = match &cgroup {
                    Some(cg) => {
                        let (emptied, mut seen) = cg.empty(grace);
                        let usage = cg.usage();
                        if emptied {
                            cg.remove();
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
                (killed, emptied, usage, cut, why, recorded)
            })
            .await
        };
        ctx.wait(local.into_actor(self).map(move |joined, act, ctx| {
            let Ok((killed, emptied, usage, cut, why, recorded)) = joined else {
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
    fn cleanup_nodes(&self) -> Vec<remote::Node> {
        let s = &self.settings;
        let options = connections::split_args(&s.ssh_common_args);
        self.hosts
            .reachable()
            .into_iter()
            .map(|host| remote::Node {
                control_path: connections::live_socket(
                    &self.exec.control_dir,
                    &host,
                    s.ssh_port,
                    &self.spec.remote_user,
                ),
                host,
                user: self.spec.remote_user.clone(),
                port: s.ssh_port,
                key: s.ssh_private_key.clone(),
                options: options.clone(),
            })
            .collect()
    }

    fn record_end(
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
                verdict(self.kill.as_ref(), &exit, &self.hosts, why),
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
            hosts: with_cleanup(self.hosts.finish(v.ending), &cleaned),
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
        let write = async move {
            let _ = tokio::task::spawn_blocking(move || {
                if remove_params {
                    // Gone already if an earlier server removed it before a crash.
                    let _ = std::fs::remove_file(dir.extra_vars());
                }
                file.write(&dir)
            })
            .await;
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

    fn spawn_process(&mut self, ctx: &mut Context<Self>) {
        let settings = self.settings.clone();
        let root = self.run_root.clone();
        let dir = self.dir.clone();
        let spec = self.spec.clone();
        let cgroups = self.exec.tracking.cgroups().cloned();
        let connections = self.exec.connections.clone();
        let mark = remote::new_mark(&settings.agent_name, spec.id);
        self.mark = Some(mark.clone());
        let prepare = async move {
            // Warm connections first: the agent's masters, outside this task's cgroup.
            let _ = connections
                .send(Acquire {
                    user: spec.remote_user.clone(),
                    hosts: spec.nodes.clone(),
                })
                .await;
            // The run directory, the cgroup and the fork and exec all on the blocking pool: a
            // spawn waits for the child's exec, which must not hold up the actors' thread.
            tokio::task::spawn_blocking(move || {
                let job = Job {
                    nodes: &spec.nodes,
                    remote_user: &spec.remote_user,
                    content: &spec.content,
                    params: &spec.params,
                };
                let prepared = command::run_as(&settings).and_then(|run_as| {
                    let owner = run_as.as_ref().map(RunAs::owner);
                    rundir::prepare(&settings, &dir, &job, &mark, owner)?;
                    let cgroup = cgroups.map(|c| c.task(spec.id)).transpose()?;
                    let cmd = command::command(
                        &settings,
                        &root,
                        &dir,
                        spec.forks,
                        run_as.as_ref(),
                        cgroup.as_ref(),
                        &mark,
                    )?;
                    Ok((cmd, cgroup))
                });
                let (cmd, cgroup) =
                    prepared.map_err(|e| format!("cannot prepare the run directory: {e}"))?;
                let child = cmd.spawn().map_err(|e| {
                    format!(
                        "cannot start ansible-playbook ({}): {e}",
                        settings.ansible_playbook
                    )
                })?;
                let started = procs::start_time(child.id()).unwrap_or(0);
                Ok::<_, String>((child, started, cgroup))
            })
            .await
            .map_err(|e| e.to_string())?
        };
        ctx.wait(
            prepare
                .into_actor(self)
                .map(|spawned, act, ctx| match spawned {
                    Err(reason) => {
                        error!(act.log, "task could not start"; "error" => %reason);
                        act.end(Exit::NotStarted(reason), ctx);
                    }
                    Ok((child, started, cgroup)) => {
                        act.guard.cgroup = cgroup.clone();
                        act.cgroup = cgroup;
                        act.on_spawned(child, started, ctx)
                    }
                }),
        );
    }

    fn on_spawned(&mut self, mut child: spawn::Child, started: i64, ctx: &mut Context<Self>) {
        let pid = child.id();
        self.set_pgid(Some(pid));
        info!(self.log, "ansible-playbook started"; "pid" => pid, "forks" => self.spec.forks);
        let mark = MarkRunning {
            task_id: self.spec.id,
            nodes: self.spec.nodes.clone(),
            started_at: self.admitted_at,
            pid,
            pid_start_time: started,
            instance: self.run_root.to_string_lossy().into_owned(),
            forks: self.spec.forks,
        };
        self.supervisor.do_send(TaskReport::Started(mark.clone()));
        self.persistence.do_send(mark);
        let wait = async move { child.wait().await };
        ctx.spawn(wait.into_actor(self).map(|status, act, ctx| match status {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt;
                act.end(
                    Exit::Exited {
                        code: st.code(),
                        signal: st.signal(),
                    },
                    ctx,
                )
            }
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
