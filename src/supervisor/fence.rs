//! Fencing (`shared_queue`): once any agent has recorded a task as interrupted (7), nothing of it
//! runs anywhere. Other agents end a lost agent's live tasks `lost_after` (`Settings::lost_after`)
//! after its last heartbeat, cleaning their nodes first (`shared.rs`). So an agent stops its own
//! tasks before that:
//!
//! - **Cut off** (it runs, but cannot renew its heartbeat): at `fence_after` without a renewal
//!   the heartbeat loop sends [`Fence`]; every task here ends as a stop ends it (killed here,
//!   nodes cleaned), status 7 with an `err` that says why, recorded once the database is back, and
//!   nothing is claimed until a heartbeat is renewed again ([`Renewed`]).
//! - **Frozen** (SIGSTOP, a paused VM: it cannot act at all): each task's own watchdog, a thread
//!   of its `ansible-playbook` (the callback plugin), ends the run at `watchdog_after` without a
//!   renewed lease (`<root>/.lease`). When the agent runs again it fences as above.
//! - **Ended elsewhere**: at every heartbeat it asks which of its tasks another agent has ended
//!   meanwhile, and kills what is left of them at once ([`TaskSupervisor::check_ended_elsewhere`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use slog::{info, warn};

use super::end::{EndReason, EndTask};
use super::TaskSupervisor;
use crate::cluster::claim;

/// When this agent's heartbeat was last renewed, shared by the heartbeat loop (which writes it)
/// and the supervisor (which claims nothing while it is older than `fence_after`). The loop's
/// [`Fence`] comes at its next tick; a thawed agent could otherwise claim a task first and then
/// fence it, or claim while other agents still read it as lost.
#[derive(Debug)]
pub struct HeartbeatClock {
    origin: Instant,
    renewed_ms: AtomicU64,
}

impl Default for HeartbeatClock {
    fn default() -> Self {
        HeartbeatClock {
            origin: Instant::now(),
            renewed_ms: AtomicU64::new(0),
        }
    }
}

impl HeartbeatClock {
    /// A renewal that started at `at`.
    pub fn renewed(&self, at: Instant) {
        let ms = u64::try_from(at.saturating_duration_since(self.origin).as_millis())
            .unwrap_or(u64::MAX);
        self.renewed_ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// How long since the last renewal.
    pub fn silent(&self) -> Duration {
        let at = self.origin + Duration::from_millis(self.renewed_ms.load(Ordering::SeqCst));
        at.elapsed()
    }
}

/// This agent's heartbeat has not been renewed for `fence_after`: stop every task here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fence {
    /// How long since the last renewal.
    pub silent: std::time::Duration,
}

impl Handler<Fence> for TaskSupervisor {
    type Result = ();
    fn handle(&mut self, msg: Fence, ctx: &mut Context<Self>) {
        if self.fenced {
            return;
        }
        self.fenced = true;
        let ids = self.own_tasks();
        warn!(self.log, "this agent renewed no heartbeat in time; stopping its tasks before other agents declare them lost";
              "silent_secs" => msg.silent.as_secs(), "fence_after_secs" => self.settings.fence_after().as_secs(),
              "tasks" => ids.len());
        for id in ids {
            self.end_here(id, EndReason::Fenced, ctx);
        }
    }
}

/// A heartbeat was renewed again after a [`Fence`]: claiming resumes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Renewed;

impl Handler<Renewed> for TaskSupervisor {
    type Result = ();
    fn handle(&mut self, _: Renewed, ctx: &mut Context<Self>) {
        if self.fenced {
            info!(self.log, "heartbeat renewed again; claiming resumes");
            self.fenced = false;
            self.check_ended_elsewhere(ctx);
            self.claim(ctx);
        }
    }
}

impl TaskSupervisor {
    /// Every task of this agent not ended yet: running, then queued.
    fn own_tasks(&self) -> Vec<i64> {
        self.running
            .keys()
            .copied()
            .chain(self.admission.ids())
            .collect()
    }

    /// Ends task `id` here for `reason` (through [`EndTask`], as a stop would).
    fn end_here(&mut self, id: i64, reason: EndReason, ctx: &mut Context<Self>) {
        let ended = ctx.address().send(EndTask {
            id,
            name: None,
            reason,
        });
        let log = self.log.clone();
        ctx.spawn(
            async move {
                if let Err(e) = ended.await {
                    warn!(log, "a task to end here was not ended"; "task_id" => id, "error" => %e);
                }
            }
            .into_actor(self),
        );
    }

    /// Tasks of this agent that another agent has ended meanwhile (it declared this one lost):
    /// what is left of them here is killed at once, and their nodes cleaned.
    pub(super) fn check_ended_elsewhere(&mut self, ctx: &mut Context<Self>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let ids = self.own_tasks();
        if ids.is_empty() {
            return;
        }
        let job = shared.run(move |conn| claim::ended_among(conn, &ids));
        ctx.spawn(job.into_actor(self).map(|found, act, ctx| match found {
            Ok(ended) => {
                for id in ended {
                    warn!(act.log, "another agent has ended this agent's task; killing what is left of it"; "task_id" => id);
                    act.end_here(id, EndReason::EndedElsewhere, ctx);
                }
            }
            Err(e) => warn!(act.log, "cannot ask which tasks other agents have ended"; "error" => %e),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_reads_the_newest_renewal() {
        let clock = HeartbeatClock::default();
        std::thread::sleep(Duration::from_millis(30));
        assert!(clock.silent() >= Duration::from_millis(30));
        clock.renewed(Instant::now());
        assert!(clock.silent() < Duration::from_millis(30));
        // A renewal that started earlier (a slow one finishing late) does not turn it back.
        clock.renewed(clock.origin);
        assert!(clock.silent() < Duration::from_millis(30));
    }
}
