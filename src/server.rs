//! Putting the parts together: [`prepare()`] opens and migrates the database, installs the
//! callback plugin and plans the recovery of what an earlier run left behind; [`run`] starts the
//! actors, carries out that plan, serves HTTP on an already-bound listener (so tests bind
//! `127.0.0.1:0`) until asked to shut down, and shuts down in order.

pub mod prepare;
pub mod systemd;
pub mod tls;

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Arbiter};
use actix_web::dev::ServerHandle;
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use slog::{error, info, warn, Logger};

use crate::ansible::rundir;
use crate::api::auth::Access;
use crate::api::middleware::{gate, log_requests};
use crate::api::{self, health, AppState};
use crate::exec::connections::Connections;
use crate::exec::Exec;
use crate::settings::Settings;
use crate::store::db::Pool;
use crate::store::persistence::{DbHealth, Flush, Persistence};
use crate::supervisor::{Close, QueueSlots, TaskSupervisor};

pub use prepare::{migrate_only, prepare, Prepared};

/// How long an idle blocking thread lives. Tokio's 10 s made the thread count follow every burst
/// of blocking jobs (R7 of `benches/agent_cost`: +8.5 % over 100,000 tasks).
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(600);
/// Blocking threads started with the actors' runtime (spawns, signals, run-directory files): more
/// than a burst of task starts and ends at 250 tasks/s needs (12 seen).
pub const ACTOR_BLOCKING_THREADS: usize = 32;

/// A single-thread runtime whose blocking threads are named `name`, with `prestart` of them started
/// at once and kept [`BLOCKING_KEEP_ALIVE`] when idle: a busy server's thread count stays flat
/// instead of following each burst. More start when more are needed.
pub fn runtime(name: &'static str, prestart: usize) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name(name)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()
        .expect("a tokio runtime (it needs an epoll and an eventfd)");
    if prestart > 0 {
        // All of them at once: a barrier holds each until the last has started.
        let all = Arc::new(std::sync::Barrier::new(prestart));
        rt.block_on(async {
            let started: Vec<_> = (0..prestart)
                .map(|_| {
                    let all = all.clone();
                    tokio::task::spawn_blocking(move || {
                        all.wait();
                    })
                })
                .collect();
            for s in started {
                s.await.ok();
            }
        });
    }
    rt
}

/// Serves until `shutdown` completes, then shuts down gracefully: `parallel_run` callers are
/// answered, in-flight requests finish (up to `shutdown_timeout_secs`), running tasks are left to
/// the next start (or stopped, with `stop_tasks_on_shutdown`), and every queued write is flushed.
pub async fn run(
    prepared: Prepared,
    listener: TcpListener,
    log: Logger,
    shutdown: impl Future<Output = ()>,
    on_start: impl FnOnce(ServerHandle),
) -> std::io::Result<()> {
    log_panics(&log);
    let Prepared {
        settings,
        pool,
        readers,
        identity,
        run_root,
        recover,
        tracking,
        run_as,
    } = prepared;
    let db_health = DbHealth::new();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let (committed_tx, committed) = tokio::sync::watch::channel(0u64);
    let persistence = start_writer(&settings, &pool, &db_health, &metrics, committed_tx, &log);
    let slots = QueueSlots::new(settings.max_queued);
    let control_dir = rundir::control_dir(&run_root);
    // On a thread of its own: starting masters and asking them (`ssh -O`) never holds up the
    // task actors.
    let connections = {
        let (settings, dir) = (settings.clone(), control_dir.clone());
        let clog = log.new(slog::o!("part" => "connections"));
        Connections::start_in_arbiter(
            &Arbiter::with_tokio_rt(|| runtime("dl-connections", 0)).handle(),
            move |_| Connections::new(settings, dir, run_as, clog),
        )
    };
    let process_tracking = tracking.describe();
    let exec = Exec {
        tracking,
        connections,
        control_dir,
        metrics: metrics.clone(),
    };
    let shared = settings
        .shared_queue
        .then(|| crate::cluster::claim::Shared {
            pool: pool.clone(),
            cluster_max_forks: settings.cluster_max_forks,
        });
    let supervisor = TaskSupervisor::new(
        settings.clone(),
        run_root.clone(),
        persistence.clone(),
        slots.clone(),
        exec,
        log.clone(),
    )
    .with_shared(shared);
    let clock = supervisor.heartbeat_clock();
    let supervisor = supervisor.start();
    let listening = listen_for_wakeups(&settings, readers.as_ref(), &supervisor, &log);
    // Handled before the listener starts, so READY=1 means the earlier tasks are adopted or
    // queued; a supervisor that cannot take the plan is a server that must not say it is ready.
    supervisor.send(recover).await.map_err(|e| {
        std::io::Error::other(format!(
            "the recovery of earlier tasks was not carried out: {e}"
        ))
    })?;
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let disk = Arc::new(crate::disk::Watch::new(
        &run_root,
        settings.run_dir_min_free_bytes,
    ));
    let watching = watch_disk(disk.clone(), &run_root, &log).await;
    let state = web::Data::new(AppState {
        access: Access::from_settings(&settings).map_err(std::io::Error::other)?,
        settings: settings.clone(),
        pool: pool.clone(),
        readers,
        persistence: persistence.clone(),
        supervisor: supervisor.clone(),
        log: log.clone(),
        closing,
        health: health::Checks::new(settings.ansible_playbook.clone()),
        db_health,
        process_tracking,
        slots,
        metrics,
        committed,
        disk,
    });
    let (handle, serving) = serve(&settings, state, listener)?;
    on_start(handle.clone());
    systemd::ready(&log, &format!("serving on {}", settings.bind));
    systemd::watchdog(supervisor.clone(), log.clone());
    let beat = Beat {
        supervisor: supervisor.clone(),
        run_root: run_root.clone(),
        clock,
    };
    // The agent was registered just now: a heartbeat, so the lease is fresh for adopted tasks.
    beat.renew_lease(&log).await;
    let beating = heartbeats(&settings, pool.clone(), identity.clone(), beat, log.clone());
    let policy = crate::store::retention::Policy {
        retention_days: settings.retention_days,
        keep_tasks: settings.retention_keep_tasks,
        agent: settings.agent_name.clone(),
        run_root,
    };
    let budget = (settings.run_dir_max_bytes > 0).then(|| {
        crate::store::retention::spawn_budget(
            pool.clone(),
            policy.clone(),
            settings.run_dir_max_bytes,
            Duration::from_secs(settings.run_dir_check_secs.max(1)),
            log.new(slog::o!("part" => "space budget")),
        )
    });
    let retention = crate::store::retention::spawn(
        pool.clone(),
        policy,
        Duration::from_secs(settings.retention_check_secs.max(1)),
        log.new(slog::o!("part" => "retention")),
    );
    shutdown.await;

    info!(log, "shutting down"; "stop_tasks" => settings.stop_tasks_on_shutdown);
    systemd::stopping(&log);
    beating.abort();
    retention.abort();
    watching.abort();
    if let Some(b) = budget {
        b.abort();
    }
    if let Some(l) = listening {
        l.abort();
    }
    mark_draining(&pool, &identity, &log).await;
    // Event streams and parallel_run waiters end now; a receiver gone already needs no word.
    closing_tx.send(true).ok();
    let stop_tasks = settings.stop_tasks_on_shutdown;
    if let Err(e) = supervisor.send(Close { stop_tasks }).await {
        warn!(log, "the supervisor did not take the shutdown"; "error" => %e);
    }
    handle.stop(true).await;
    if let Err(e) = serving.await {
        warn!(log, "the HTTP server ended badly"; "error" => %e);
    }
    let flushed = tokio::time::timeout(
        Duration::from_secs(settings.db_retry_secs),
        persistence.send(Flush),
    )
    .await;
    match flushed {
        Ok(Ok(Ok(_))) => info!(log, "every write flushed"),
        _ => error!(log, "writes could not be flushed before exit; the next start recovers them from the run directories"),
    }
    Ok(())
}

/// The writer on a thread of its own: its batching and replies never wait behind the task actors
/// (and use the second core). Its blocking jobs: a batch, and new tasks' inserts (as many at once
/// as the pool has).
fn start_writer(
    settings: &Settings,
    pool: &Pool,
    health: &Arc<DbHealth>,
    metrics: &Arc<crate::metrics::Metrics>,
    committed: tokio::sync::watch::Sender<u64>,
    log: &Logger,
) -> Addr<Persistence> {
    let writer = (
        pool.clone(),
        log.new(slog::o!("part" => "persistence")),
        health.clone(),
        metrics.clone(),
        committed,
        Duration::from_secs(settings.db_retry_secs),
        settings.shared_queue,
    );
    let writer_threads = settings.pool_size as usize + 1;
    Persistence::start_in_arbiter(
        &Arbiter::with_tokio_rt(move || runtime("dl-writer", writer_threads)).handle(),
        move |_| {
            let (pool, log, health, metrics, committed, retry_for, shared) = writer;
            Persistence::new(pool, log, health, metrics, committed, retry_for).with_notify(shared)
        },
    )
}

/// With the shared queue on PostgreSQL: `NOTIFY`s wake the supervisor to claim (a task was
/// queued or ended) or to read stop requests.
fn listen_for_wakeups(
    settings: &Settings,
    readers: Option<&crate::store::readers::Readers>,
    supervisor: &Addr<TaskSupervisor>,
    log: &Logger,
) -> Option<actix_web::rt::task::JoinHandle<()>> {
    use crate::store::notify::{QUEUE_CHANNEL, STOP_CHANNEL};
    if !settings.shared_queue {
        return None;
    }
    let Some(readers) = readers else {
        warn!(log, "the shared queue's wake-ups need a database URL that tokio-postgres reads; agents claim every second instead");
        return None;
    };
    let to = supervisor.clone();
    let on_notify = move |channel: &str| {
        if channel == STOP_CHANNEL {
            to.do_send(crate::supervisor::CheckStops);
        } else {
            to.do_send(crate::supervisor::Claim);
        }
    };
    let llog = log.new(slog::o!("part" => "shared-queue"));
    Some(actix_web::rt::spawn(readers.clone().listen(
        &[QUEUE_CHANNEL, STOP_CHANNEL],
        on_notify,
        llog,
    )))
}

type Serving = actix_web::rt::task::JoinHandle<std::io::Result<()>>;

/// Starts the HTTP server on `listener`: the API, health and metrics routes behind the request
/// log and the gate.
fn serve(
    settings: &Settings,
    state: web::Data<AppState>,
    listener: TcpListener,
) -> std::io::Result<(ServerHandle, Serving)> {
    let tls = tls::tls_config(settings).map_err(std::io::Error::other)?;
    let sessions = web::Data::new(crate::console::Sessions::default());
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(sessions.clone())
            // The last wrapped runs first: every answer is logged, refusals included.
            .wrap(from_fn(gate))
            .wrap(from_fn(log_requests))
            .configure(api::routes)
            .configure(crate::console::routes)
            .configure(health::routes)
            .default_service(web::to(api::no_route))
    })
    .disable_signals()
    .client_request_timeout(Duration::from_secs(settings.client_timeout_secs))
    .shutdown_timeout(settings.shutdown_timeout_secs);
    if settings.workers > 0 {
        server = server.workers(settings.workers);
    }
    let server = match tls {
        Some(config) => server.listen_rustls_0_23(listener, config)?,
        None => server.listen(listener)?,
    };
    let server = server.run();
    let handle = server.handle();
    Ok((handle, actix_web::rt::spawn(server)))
}

/// Marks this agent as draining in `agents` (other agents stop counting on it).
async fn mark_draining(pool: &Pool, me: &crate::cluster::agents::Identity, log: &Logger) {
    let (pool, me) = (pool.clone(), me.clone());
    let drained = tokio::task::spawn_blocking(move || {
        let mut conn = pool.get()?;
        crate::cluster::agents::draining(&mut conn, &me)
    })
    .await;
    if let Err(e) = drained
        .map_err(|e| e.to_string())
        .and_then(|d| d.map_err(|e| e.to_string()))
    {
        warn!(log, "cannot mark this agent as draining in agents"; "error" => e);
    }
}

/// Looks at the run directory's disk now and then every second (off the request path), logging
/// when it runs low and when it has room again.
async fn watch_disk(
    disk: Arc<crate::disk::Watch>,
    run_root: &std::path::Path,
    log: &Logger,
) -> actix_web::rt::task::JoinHandle<()> {
    let (log, path) = (log.clone(), run_root.display().to_string());
    let look = move |disk: Arc<crate::disk::Watch>| async move {
        tokio::task::spawn_blocking(move || {
            let looked = disk.refresh();
            (looked, disk.low())
        })
        .await
    };
    let (mut was_low, mut failing) = (false, false);
    let mut report = move |looked: Result<
        (std::io::Result<crate::disk::Space>, Option<String>),
        _,
    >| {
        let looked = looked
            .map_err(|e: tokio::task::JoinError| std::io::Error::other(e.to_string()))
            .and_then(|(space, low)| space.map(|_| low));
        match looked {
            Ok(low) => {
                match (&low, was_low) {
                    (Some(why), false) => warn!(log, "refusing new tasks"; "why" => why),
                    (None, true) => {
                        info!(
                            log,
                            "the run directory's disk has room again; accepting tasks"
                        )
                    }
                    _ => {}
                }
                (was_low, failing) = (low.is_some(), false);
            }
            Err(e) => {
                if !failing {
                    warn!(log, "cannot look at the run directory's disk"; "path" => &path, "error" => %e);
                }
                failing = true;
            }
        }
    };
    report(look(disk.clone()).await);
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            report(look(disk.clone()).await);
        }
    })
}

/// Beats this agent's heart in `agents` every `heartbeat_secs`, on the database's clock. Each
/// renewal also renews the lease file the tasks' watchdogs read; with `shared_queue`, a heartbeat
/// not renewed for `fence_after` (the database out of reach, or this process frozen) fences the
/// agent: the supervisor stops every task here before other agents may declare them lost
/// (`supervisor/fence.rs`).
fn heartbeats(
    settings: &Settings,
    pool: Pool,
    me: crate::cluster::agents::Identity,
    beat: Beat,
    log: Logger,
) -> actix_web::rt::task::JoinHandle<()> {
    let every = settings.heartbeat();
    let fence_after = settings.shared_queue.then(|| settings.fence_after());
    let me_name = me.name.clone();
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        // The start of the last call that renewed it: its heartbeat_at is no earlier than this.
        let mut renewed = std::time::Instant::now();
        let mut fenced = false;
        loop {
            tick.tick().await;
            let silent = renewed.elapsed();
            if let Some(after) = fence_after {
                // Before trying again: after a freeze, other agents may be about to end our tasks.
                if silent > after && !fenced {
                    fenced = true;
                    beat.supervisor.do_send(crate::supervisor::Fence { silent });
                }
            }
            let (pool, me) = (pool.clone(), me.clone());
            let started = std::time::Instant::now();
            let done = tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                crate::cluster::agents::heartbeat(&mut conn, &me)
            })
            .await;
            let ok = match done {
                Ok(Ok(true)) => true,
                Ok(Ok(false)) => {
                    warn!(log, "this agent's row in agents was gone or written by another process under the same agent_name; written again (give each agent a name of its own)"; "agent" => &me_name);
                    true
                }
                Ok(Err(e)) => {
                    warn!(log, "heartbeat not recorded"; "error" => %e);
                    false
                }
                Err(e) => {
                    warn!(log, "heartbeat not recorded"; "error" => %e);
                    false
                }
            };
            if ok {
                renewed = started;
                beat.clock.renewed(started);
                beat.renew_lease(&log).await;
                if fenced {
                    fenced = false;
                    beat.supervisor.do_send(crate::supervisor::Renewed);
                }
            }
        }
    })
}

/// What a renewed heartbeat tells: the supervisor (fencing) and the lease file.
#[derive(Clone)]
struct Beat {
    supervisor: Addr<TaskSupervisor>,
    run_root: std::path::PathBuf,
    /// When the heartbeat was last renewed, as the supervisor reads it before a claim.
    clock: Arc<crate::supervisor::HeartbeatClock>,
}

impl Beat {
    async fn renew_lease(&self, log: &Logger) {
        let root = self.run_root.clone();
        let renewed = tokio::task::spawn_blocking(move || rundir::renew_lease(&root))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        if let Err(e) = renewed {
            warn!(log, "cannot renew the lease file the tasks' watchdogs read"; "path" => rundir::lease_file(&self.run_root).display().to_string(), "error" => %e);
        }
    }
}

/// Logs every panic (a bug: an actor that panics is ended and its task recorded as interrupted)
/// through the first server's logger, besides the default report on standard error.
fn log_panics(log: &Logger) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let log = log.clone();
    ONCE.call_once(move || {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            error!(log, "internal error (panic)"; "panic" => info.to_string());
            default(info);
        }));
    });
}
