//! Persistence: the only writer to the database.
//!
//! Task writes (running, progress, end, repairs) go through one ordered queue and are applied one
//! at a time on the blocking pool, so they land in the order they were sent. Every write is
//! cleaned first ([`crate::store::clean`]): nothing a playbook prints can make a row unstorable.
//!
//! A failed write is classified, and only unavailability is retried:
//!
//! - **The database is away** (pool timeout, closed connection, a connection that no longer
//!   answers, SQLite busy or I/O errors, a read-only PostgreSQL during failover): the write stays at
//!   the head of the queue and is retried with backoff until it lands or `db_retry_secs` have
//!   passed; the writes behind it wait, so nothing is reordered.
//! - **The database refused the data** (constraint and data errors, a trigger's refusal, anything
//!   else while the same connection still answers `SELECT 1`): never retried. The write is
//!   repaired at once, part by part: an event that is refused is replaced by an `event_dropped`
//!   marker, a host row without its message, an end without its details (see `apply.rs`). Each
//!   dropped part is logged and counted ([`DbHealth::repaired`], shown by `/readyz`), and the writes
//!   behind it go on at once.
//!
//! New tasks are inserted outside the queue and never retried: `/api/run` must answer at once,
//! `database unavailable, retry later`, rather than queue a task the caller was told failed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use slog::{error, info, warn, Logger};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::store::clean::Clean;
use crate::store::db::Pool;
use crate::store::{Finish, StoreError};
use apply::{apply, apply_batch, Applied};
use backoff::Backoff;

mod apply;
mod backoff;
pub mod classify;
mod messages;

pub use messages::{
    FinishTask, Flush, InsertTask, MarkRunning, RecordStopRequest, Repair, SaveProgress, Truth,
};

/// Most writes applied in one transaction, and most events among them: queued writes are
/// committed together (one round of BEGIN/COMMIT and one trip to the blocking pool for all).
const MAX_BATCH_WRITES: usize = 64;
const MAX_BATCH_EVENTS: usize = 20_000;
/// Longest database message quoted in a repair marker or log line.
const MAX_REASON: usize = 300;

/// What the writer knows of the database, shared with `/readyz`.
#[derive(Debug, Default)]
pub struct DbHealth {
    up: AtomicBool,
    repaired: AtomicU64,
}

impl DbHealth {
    /// A health record that starts "up" with nothing repaired.
    pub fn new() -> Arc<DbHealth> {
        Arc::new(DbHealth {
            up: AtomicBool::new(true),
            repaired: AtomicU64::new(0),
        })
    }
    /// Parts of writes the database refused and that were dropped or replaced by a marker.
    pub fn repaired(&self) -> u64 {
        self.repaired.load(Ordering::Relaxed)
    }
    fn set(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::Relaxed)
    }
}

/// One ordered write.
#[derive(Debug, Clone)]
enum Write {
    Running(MarkRunning),
    Progress(SaveProgress),
    Finish(Finish),
    Repair(Vec<Truth>),
    /// Nothing to write: answers once every write before it has landed.
    Barrier,
}

impl Write {
    fn clean(&mut self) {
        match self {
            Write::Running(_) | Write::Barrier => {}
            Write::Progress(p) => {
                p.events.clean();
                p.hosts.clean();
            }
            Write::Finish(f) => f.clean(),
            Write::Repair(truths) => {
                for truth in truths {
                    if let Truth::Ended(f) = truth {
                        f.clean();
                    }
                }
            }
        }
    }
}

struct Queued {
    write: Write,
    reply: oneshot::Sender<Result<bool, StoreError>>,
    since: Instant,
}

/// The writer actor.
pub struct Persistence {
    pool: Pool,
    log: Logger,
    health: Arc<DbHealth>,
    metrics: Arc<Metrics>,
    /// Bumped after each commit of events or an end: event streams read again.
    committed: tokio::sync::watch::Sender<u64>,
    /// Shared queue: every end and every unclaimed insert sends `NOTIFY downlink_queue`.
    notify: bool,
    retry_for: Duration,
    queue: VecDeque<Queued>,
    busy: bool,
    backoff: Backoff,
    /// Writes to apply one at a time (with retries and repairs) after a batch of them failed.
    singles: usize,
}

impl Persistence {
    /// A writer over `pool`; a queued write is given up after `retry_for` of failures.
    pub fn new(
        pool: Pool,
        log: Logger,
        health: Arc<DbHealth>,
        metrics: Arc<Metrics>,
        committed: tokio::sync::watch::Sender<u64>,
        retry_for: Duration,
    ) -> Self {
        Persistence {
            pool,
            log,
            health,
            metrics,
            committed,
            notify: false,
            retry_for,
            queue: VecDeque::new(),
            busy: false,
            backoff: Backoff::default(),
            singles: 0,
        }
    }

    /// With the shared queue: ends and unclaimed inserts wake every agent.
    pub fn with_notify(mut self, notify: bool) -> Persistence {
        self.notify = notify;
        self
    }

    fn enqueue(
        &mut self,
        mut write: Write,
        ctx: &mut Context<Self>,
    ) -> ResponseFuture<Result<bool, StoreError>> {
        write.clean();
        let (reply, rx) = oneshot::channel();
        self.queue.push_back(Queued {
            write,
            reply,
            since: Instant::now(),
        });
        self.metrics.write_queue(self.queue.len());
        self.pump(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the writer stopped".into())))
        })
    }

    /// Takes the head of the queue off, counts what it committed and answers its sender.
    fn answer(&mut self, result: Result<bool, StoreError>) {
        let Some(done) = self.queue.pop_front() else {
            return;
        };
        self.metrics.write_queue(self.queue.len());
        match (&done.write, &result) {
            (Write::Progress(p), Ok(_)) => self.metrics.events(
                p.events.len(),
                p.events
                    .iter()
                    .filter(|e| e.kind == "events_truncated")
                    .count(),
            ),
            (Write::Finish(f), Ok(true)) => self
                .metrics
                .finished(f.status, f.hosts.iter().filter_map(|h| h.result.as_deref())),
            _ => {}
        }
        if matches!(done.write, Write::Progress(_) | Write::Finish(_)) {
            self.committed.send_modify(|n| *n = n.wrapping_add(1));
        }
        // A sender that went away (its actor stopped) needs no answer.
        done.reply.send(result).ok();
    }

    /// How many writes from the head of the queue go into the next transaction.
    fn batch_len(&self) -> usize {
        if self.singles > 0 {
            return 1;
        }
        let mut events = 0;
        let mut n = 0;
        for q in self.queue.iter().take(MAX_BATCH_WRITES) {
            events += match &q.write {
                Write::Progress(p) => p.events.len(),
                _ => 1,
            };
            if n > 0 && events > MAX_BATCH_EVENTS {
                break;
            }
            n += 1;
        }
        n
    }

    /// Applies the writes at the head of the queue in one transaction. If that fails, each of them
    /// is applied again on its own (where failures are retried or repaired).
    fn pump_batch(&mut self, n: usize, ctx: &mut Context<Self>) {
        self.busy = true;
        let writes: Vec<Write> = self.queue.iter().take(n).map(|q| q.write.clone()).collect();
        let pool = self.pool.clone();
        let notify = self.notify;
        let job = async move {
            tokio::task::spawn_blocking(move || apply_batch(&pool, &writes, notify))
                .await
                .ok()
                .flatten()
        };
        ctx.spawn(job.into_actor(self).map(move |applied, act, ctx| {
            act.busy = false;
            match applied {
                Some(results) => {
                    if !act.health.set(true) {
                        info!(act.log, "database reachable again, writes resumed"; "queued" => act.queue.len());
                    }
                    for result in results {
                        act.answer(Ok(result));
                    }
                }
                None => act.singles = n,
            }
            act.pump(ctx);
        }));
    }

    /// Applies the head of the queue, then the next, until the queue is empty or a write fails
    /// because the database is away.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let n = self.batch_len();
        if n > 1 {
            self.pump_batch(n, ctx);
            return;
        }
        let Some(head) = self.queue.front() else {
            return;
        };
        self.busy = true;
        let write = head.write.clone();
        let pool = self.pool.clone();
        let notify = self.notify;
        let job = async move {
            tokio::task::spawn_blocking(move || apply(&pool, &write, notify))
                .await
                .unwrap_or_else(|e| Applied::away(StoreError::Unavailable(e.to_string())))
        };
        ctx.spawn(job.into_actor(self).map(|applied, act, ctx| {
            act.busy = false;
            for part in &applied.repairs {
                act.health.repaired.fetch_add(1, Ordering::Relaxed);
                error!(act.log, "the database refused part of a write; dropped it and went on"; "part" => part);
            }
            match applied.result {
                Err(e) if applied.away && act.queue.front().is_some_and(|q| q.since.elapsed() < act.retry_for) => {
                    if act.health.set(false) {
                        warn!(act.log, "database write failed, holding writes and retrying"; "error" => %e, "queued" => act.queue.len());
                    }
                    act.metrics.write_retry();
                    let delay = act.backoff.next_delay();
                    ctx.run_later(delay, |act, ctx| act.pump(ctx));
                }
                result => {
                    act.backoff.reset();
                    if let Err(e) = &result {
                        error!(act.log, "database write given up"; "error" => %e, "database_away" => applied.away);
                    } else if !act.health.set(true) {
                        info!(act.log, "database reachable again, writes resumed"; "queued" => act.queue.len());
                    }
                    act.answer(result);
                    act.singles = act.singles.saturating_sub(1);
                    act.pump(ctx);
                }
            }
        }));
    }
}

impl Actor for Persistence {
    type Context = Context<Self>;
}
