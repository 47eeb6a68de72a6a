//! Starting a task: the run directory, the cgroup and the spawn (off the actors' thread), then
//! following the process (our child, or an adopted one through `/proc`).
use std::time::Duration;

use actix::prelude::*;
use slog::{error, info};

use super::verdict::Exit;
use crate::ansible::events::Ending;
use crate::ansible::rundir::{self, Job};
use crate::exec::command::{self, RunAs};
use crate::exec::connections::Acquire;
use crate::exec::procs;
use crate::exec::remote::{self};
use crate::exec::spawn;
use crate::store::persistence::MarkRunning;
use crate::time;

use super::*;

impl TaskActor {
    pub(super) fn spawn_process(&mut self, ctx: &mut Context<Self>) {
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
            // Gone (shutting down): the task connects directly, as without a master.
            let masters = connections
                .send(Acquire {
                    user: spec.remote_user.clone(),
                    hosts: spec.nodes.clone(),
                    forks: spec.forks,
                })
                .await
                .unwrap_or_default();
            // The run directory, the cgroup and the fork and exec all on the blocking pool: a
            // spawn waits for the child's exec, which must not hold up the actors' thread.
            tokio::task::spawn_blocking(move || {
                let job = Job {
                    nodes: &spec.nodes,
                    remote_user: &spec.remote_user,
                    content: &spec.content,
                    params: &spec.params,
                    masters: &masters,
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

    pub(super) fn on_spawned(
        &mut self,
        mut child: spawn::Child,
        started: i64,
        ctx: &mut Context<Self>,
    ) {
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
            remote_mark: self.mark.clone(),
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
    pub(super) fn follow(&mut self, ctx: &mut Context<Self>) {
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
        self.watch_disk(ctx);
        if let Some((ending, err)) = self.kill.take() {
            // Asked to end while the process was being started.
            self.request_kill(ending, err, ctx);
        }
    }
}
