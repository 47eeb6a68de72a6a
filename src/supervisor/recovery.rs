//! Restart recovery as a plan: what an earlier run of this agent left unfinished, read from its
//! rows and its run directories, and what to do with each task. The plan only reads; the
//! supervisor carries it out, every write going through Persistence in order.
//!
//! A task belongs to this agent when its `tasks.agent` is this `agent_name` (or NULL: stored before
//! agents had names; with `shared_queue`, NULL is the shared queue's and nobody's). For each
//! unfinished one:
//!
//! | row | run directory | plan |
//! |---|---|---|
//! | pending | has `end.json` (stopped while the database was away) | end as recorded, never run |
//! | pending | has `events.jsonl` (started, start not recorded) | record the start, adopt |
//! | pending | params not stored (`store_params = false`) | end failed, saying why |
//! | pending | otherwise | queue again, in id order |
//! | running | found (recorded root first, then this agent's root) | adopt (ends at once if its process is gone) |
//! | running | not found | end interrupted, naming where it looked |
//! | unreadable row | | end, saying what could not be read |

use std::path::{Path, PathBuf};

use chrono::NaiveDateTime;

use crate::ansible::events::Ending;
use crate::ansible::rundir::RunDir;
use crate::exec::procs;
use crate::status::Status;
use crate::store::db::DbConnection;
use crate::store::persistence::MarkRunning;
use crate::store::{self, Finish, StoreError, Task};
use crate::task::read_end_file;
use crate::task::TaskSpec;
use crate::time;

/// A task an earlier server left running (or started without recording it), to adopt.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub spec: TaskSpec,
    pub dir: RunDir,
    pub started_at: NaiveDateTime,
    pub pid: i32,
    pub start_time: i64,
    pub stored_offset: u64,
    /// Its start was never recorded: record it before adopting.
    pub unrecorded_start: Option<MarkRunning>,
}

/// What to do with every unfinished task of this agent.
#[derive(Debug, Default)]
pub struct Plan {
    pub adopt: Vec<Orphan>,
    pub requeue: Vec<TaskSpec>,
    pub end: Vec<Finish>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.adopt.is_empty() && self.requeue.is_empty() && self.end.is_empty()
    }
}

/// The plan for the unfinished tasks of `agent`, whose run directories are now under `run_root`.
/// With `shared` (the shared queue), unclaimed tasks are the queue's, not this agent's.
pub fn plan(
    conn: &mut DbConnection,
    agent: &str,
    run_root: &Path,
    shared: bool,
) -> Result<Plan, StoreError> {
    let mut plan = Plan::default();
    for task in store::tasks_with_status(conn, agent, &Status::LIVE, !shared)? {
        plan_one(&mut plan, task, run_root);
    }
    Ok(plan)
}

fn ended(task: &Task, nodes: &[String], status: Status, err: String, ending: Ending) -> Finish {
    crate::task::end_without_run(task.id, nodes, status, ending, err)
}

fn plan_one(plan: &mut Plan, task: Task, run_root: &Path) {
    let running = task.status == Status::Running.code();
    let spec = match TaskSpec::from_row(&task) {
        Ok(spec) => spec,
        Err(e) => {
            let (status, ending) = if running {
                (Status::Interrupted, Ending::Interrupted)
            } else {
                (Status::Failed, Ending::Exited)
            };
            let err =
                format!("downlink could not read this task's stored row after a restart ({e})");
            plan.end.push(ended(&task, &[], status, err, ending));
            return;
        }
    };
    let here = RunDir::of(run_root, task.id);
    if !running {
        if let Some(file) = read_end_file(&here) {
            let status = Status::from_code(file.status).unwrap_or(Status::Stopped);
            let mut fin = ended(&task, &spec.nodes, status, String::new(), file.ending());
            fin.err = file.err;
            plan.end.push(fin);
            return;
        }
        if !here.events().exists() {
            if task.params == "null" {
                let err = "its params were not stored (store_params = false), so it could not run after downlink restarted".to_owned();
                plan.end.push(ended(
                    &task,
                    &spec.nodes,
                    Status::Failed,
                    err,
                    Ending::Exited,
                ));
            } else {
                plan.requeue.push(spec);
            }
            return;
        }
        // Started, but the server died before recording it: record the start, then adopt.
        let (pid, start_time) = procs::leader(&here.mark()).unwrap_or((0, 0));
        let started_at = time::now();
        let mark = MarkRunning {
            task_id: task.id,
            nodes: spec.nodes.clone(),
            started_at,
            pid,
            pid_start_time: start_time,
            instance: run_root.to_string_lossy().into_owned(),
            forks: spec.forks,
            remote_mark: std::fs::read_to_string(here.remote_mark())
                .ok()
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty()),
        };
        plan.adopt.push(Orphan {
            spec,
            dir: here,
            started_at,
            pid,
            start_time,
            stored_offset: 0,
            unrecorded_start: Some(mark),
        });
        return;
    }
    // Where it ran (the recorded root), else where this agent keeps run directories now.
    let mut looked: Vec<PathBuf> = Vec::new();
    let recorded = task
        .instance
        .as_deref()
        .map(|root| RunDir::of(Path::new(root), task.id));
    let found = recorded
        .into_iter()
        .chain(std::iter::once(here))
        .find(|dir| {
            looked.push(dir.path.clone());
            dir.path.is_dir()
        });
    let Some(dir) = found else {
        looked.dedup();
        let places: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
        let err = format!(
            "its run directory was not found when downlink restarted (looked in {}), so its end is unknown",
            places.join(" and ")
        );
        plan.end.push(ended(
            &task,
            &spec.nodes,
            Status::Interrupted,
            err,
            Ending::Interrupted,
        ));
        return;
    };
    let (pid, start_time) = match (task.pid, task.pid_start_time) {
        (Some(pid), Some(start)) => (pid, start),
        _ => procs::leader(&dir.mark()).unwrap_or((0, 0)),
    };
    plan.adopt.push(Orphan {
        spec,
        dir,
        started_at: task.started_at.unwrap_or_else(time::now),
        pid,
        start_time,
        stored_offset: u64::try_from(task.events_offset).unwrap_or(0),
        unrecorded_start: None,
    });
}
