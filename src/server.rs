//! Putting the parts together: open and migrate the database, install the callback plugin, plan
//! the recovery of what an earlier run left behind (`recovery`), start the actors and serve HTTP
//! on an already-bound listener (so tests bind `127.0.0.1:0`) until asked to shut down.

pub mod systemd;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Arbiter};
use actix_web::dev::{ServerHandle, Service};
use actix_web::{web, App, HttpServer};
use anyhow::Context as _;
use slog::{error, info, warn, Logger};

use crate::ansible::rundir;
use crate::api::auth::{Access, OPEN_PATHS};
use crate::api::health;
use crate::api::{self, ApiError, AppState, ErrorMessage};
use crate::exec::cgroup::Cgroups;
use crate::exec::connections::Connections;
use crate::exec::procs;
use crate::exec::{Exec, Tracking};
use crate::settings::Settings;
use crate::store::db::{self, Pool, Target};
use crate::store::persistence::{DbHealth, Flush, Persistence};
use crate::supervisor::recovery;
use crate::supervisor::{Close, QueueSlots, Recover, TaskSupervisor};
use actix_web::http::header::AUTHORIZATION;
use actix_web::ResponseError;
use futures_util::future::Either;

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
                let _ = s.await;
            }
        });
    }
    rt
}

/// How long a pool waits for a connection before the caller is told the database is unavailable.
const DB_WAIT: Duration = Duration::from_secs(5);
/// How long the first connection at start may take (the database may be starting too).
const DB_START_WAIT: Duration = Duration::from_secs(30);

/// The database and run directory, ready for the server, and what an earlier server left.
pub struct Prepared {
    pub settings: Arc<Settings>,
    pub pool: Pool,
    pub readers: Option<crate::store::readers::Readers>,
    pub identity: crate::cluster::agents::Identity,
    pub run_root: PathBuf,
    pub recover: Recover,
    pub tracking: Tracking,
    pub run_as: Option<crate::exec::command::RunAs>,
}

/// `downlink migrate`: applies pending migrations over one connection and nothing else.
pub fn migrate_only(settings: &Settings, log: &Logger) -> anyhow::Result<()> {
    let target = Target::parse(&settings.effective_database_url())?;
    if let Target::Sqlite(path) = &target {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let mut conn = db::connect(&target)?;
    let applied = db::migrate(&mut conn)?;
    info!(log, "migrations applied"; "database" => target.describe(), "applied" => applied.len());
    Ok(())
}

/// Opens the database, applies pending migrations, installs the callback plugin and finds the
/// tasks an earlier server left unfinished.
pub fn prepare(settings: Settings, log: &Logger) -> anyhow::Result<Prepared> {
    let target = Target::parse(&settings.effective_database_url())?;
    if settings.shared_queue {
        if !matches!(target, Target::Postgres(_)) {
            anyhow::bail!("shared_queue needs PostgreSQL: agents share their queue through its tasks table (database_url is {})", target.describe());
        }
        if !settings.store_params {
            anyhow::bail!("shared_queue needs store_params = true: the agent that claims a task reads its params from its row");
        }
    }
    let pool = db::pool(
        &target,
        settings.pool_size,
        DB_WAIT,
        Duration::from_secs(settings.db_statement_timeout_secs),
    )
    .with_context(|| format!("opening {}", target.describe()))?;
    let deadline = Instant::now() + DB_START_WAIT;
    let mut conn = loop {
        match pool.get() {
            Ok(conn) => break conn,
            Err(e) if Instant::now() < deadline => {
                warn!(log, "database not reachable yet, retrying"; "error" => %e);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("connecting to {}", target.describe()))
            }
        }
    };
    let applied = db::migrate(&mut conn)?;
    info!(log, "database ready"; "database" => target.describe(), "migrations_applied" => applied.len());
    let identity =
        crate::cluster::agents::Identity::of_this_process(&settings.agent_name, settings.max_forks);
    crate::cluster::agents::register(&mut conn, &identity)
        .context("recording this agent in agents")?;
    if settings.shared_queue {
        let taken_back = crate::cluster::claim::back(&mut conn, &settings.agent_name)
            .context("taking back the notes of this agent's loss")?;
        if taken_back > 0 {
            info!(log, "back after being lost: its running tasks' notes taken back"; "tasks" => taken_back);
        }
    }
    if !procs::become_subreaper() {
        warn!(
            log,
            "cannot become a child subreaper: killed task processes are left to init to reap"
        );
    }
    let run_as = crate::exec::command::run_as(&settings).context("run_as_user")?;
    if let Some(r) = &run_as {
        if !nix::unistd::geteuid().is_root() {
            warn!(log, "run_as_user is set but downlink is not root: starting tasks will fail unless it has CAP_SETUID and CAP_SETGID"; "run_as_user" => &r.name);
        }
    }
    let agent_dir = settings.run_dir.join(&settings.agent_name);
    let run_root = rundir::install(
        &agent_dir,
        run_as.as_ref().map(crate::exec::command::RunAs::owner),
    )
    .with_context(|| format!("preparing run directory {}", agent_dir.display()))?;
    let plan = recovery::plan(
        &mut conn,
        &settings.agent_name,
        &run_root,
        settings.shared_queue,
    )?;
    drop(conn);
    if !plan.is_empty() {
        info!(log, "unfinished tasks found"; "agent" => &settings.agent_name,
              "adopt" => plan.adopt.len(), "requeue" => plan.requeue.len(), "end" => plan.end.len());
    }
    let recover = Recover(plan);
    let tracking = match Cgroups::detect(&settings.cgroup_parent, &settings.agent_name) {
        Ok(cgroups) => Tracking::Cgroup(cgroups),
        Err(why) => Tracking::Fallback(why),
    };
    match &tracking {
        Tracking::Cgroup(_) => info!(log, "process tracking"; "mode" => tracking.describe()),
        Tracking::Fallback(_) => warn!(log, "process tracking"; "mode" => tracking.describe()),
    }
    let readers = http_readers(&settings, &target, log);
    Ok(Prepared {
        settings: Arc::new(settings),
        pool,
        readers,
        identity,
        run_root,
        recover,
        tracking,
        run_as,
    })
}

/// On PostgreSQL, two read connections for each HTTP worker, of its own, when tokio-postgres reads
/// the URL; otherwise the pool serves every read. Two, not more: reads share a connection at once
/// (pipelined), and on the 2-core bench machine 1, 2 and 4 a worker answered alike; a second one
/// keeps a slow statement from holding every read of its worker.
fn http_readers(
    settings: &Settings,
    target: &Target,
    log: &Logger,
) -> Option<crate::store::readers::Readers> {
    let Target::Postgres(url) = target else {
        return None;
    };
    let per_worker = 2;
    let timeout = Duration::from_secs(settings.db_statement_timeout_secs);
    match crate::store::readers::Readers::new(url, per_worker, timeout) {
        Ok(readers) => {
            info!(log, "HTTP workers read on connections of their own"; "per_worker" => per_worker);
            Some(readers)
        }
        Err(why) => {
            info!(log, "HTTP workers read through the pool"; "why" => why);
            None
        }
    }
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
    log_panics(&log);
    let db_health = DbHealth::new();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let (committed_tx, committed) = tokio::sync::watch::channel(0u64);
    // The writer on a thread of its own: its batching and replies never wait behind the task
    // actors (and use the second core).
    let writer = (
        pool.clone(),
        log.new(slog::o!("part" => "persistence")),
        db_health.clone(),
        metrics.clone(),
        committed_tx,
        Duration::from_secs(settings.db_retry_secs),
        settings.shared_queue,
    );
    // Its blocking jobs: a batch, and new tasks' inserts (as many at once as the pool has).
    let writer_threads = settings.pool_size as usize + 1;
    let persistence = Persistence::start_in_arbiter(
        &Arbiter::with_tokio_rt(move || runtime("dl-writer", writer_threads)).handle(),
        move |_| {
            let (pool, log, health, metrics, committed, retry_for, shared) = writer;
            Persistence::new(pool, log, health, metrics, committed, retry_for).with_notify(shared)
        },
    );
    let slots = QueueSlots::new(settings.max_queued);
    let retention_root = run_root.clone();
    let control_dir = rundir::control_dir(&run_root);
    let connections = Connections::new(
        settings.clone(),
        control_dir.clone(),
        run_as,
        log.new(slog::o!("part" => "connections")),
    )
    .start();
    let process_tracking = tracking.describe();
    let exec = Exec {
        tracking,
        connections,
        control_dir,
        metrics: metrics.clone(),
    };
    let supervisor = TaskSupervisor::new(
        settings.clone(),
        run_root,
        persistence.clone(),
        slots.clone(),
        exec,
        log.clone(),
    )
    .with_shared(
        settings
            .shared_queue
            .then(|| crate::cluster::claim::Shared {
                pool: pool.clone(),
                cluster_max_forks: settings.cluster_max_forks,
            }),
    )
    .start();
    let listening = match (&readers, settings.shared_queue) {
        (Some(readers), true) => {
            let (readers, to) = (readers.clone(), supervisor.clone());
            let llog = log.new(slog::o!("part" => "shared-queue"));
            Some(actix_web::rt::spawn(readers.listen(
                &[
                    crate::store::notify::QUEUE_CHANNEL,
                    crate::store::notify::STOP_CHANNEL,
                ],
                move |channel| {
                    if channel == crate::store::notify::STOP_CHANNEL {
                        to.do_send(crate::supervisor::CheckStops);
                    } else {
                        to.do_send(crate::supervisor::Claim);
                    }
                },
                llog,
            )))
        }
        (None, true) => {
            warn!(log, "the shared queue's wake-ups need a database URL that tokio-postgres reads; agents claim every second instead");
            None
        }
        _ => None,
    };
    // Handled before the listener starts, so READY=1 means the earlier tasks are adopted or queued.
    let _ = supervisor.send(recover).await;
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let state = web::Data::new(AppState {
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
        metrics: metrics.clone(),
        committed,
    });
    let access = Arc::new(Access::from_settings(&settings).map_err(std::io::Error::other)?);
    let request_log = log.clone();
    let metrics_open = settings.metrics_open;
    let tls = tls_config(&settings).map_err(std::io::Error::other)?;
    let mut server = HttpServer::new(move || {
        let log = request_log.clone();
        let auth_log = request_log.clone();
        let access = access.clone();
        let metrics = metrics.clone();
        App::new()
            .app_data(state.clone())
            .wrap_fn(move |req, srv| {
                // Inner: refuses callers that do not belong before any handler runs.
                let open = OPEN_PATHS.contains(&req.path())
                    || (metrics_open && req.path() == "/metrics");
                let refused = if open {
                    None
                } else {
                    let peer = req.peer_addr().map(|a| a.ip());
                    let authz = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
                    access.check(peer, authz).err()
                };
                match refused {
                    None => Either::Left(srv.call(req)),
                    Some(why) => {
                        warn!(auth_log, "refused a caller"; "peer" => req.peer_addr().map(|a| a.to_string()),
                              "path" => req.path().to_owned(), "reason" => format!("{why:?}"));
                        let res = ApiError::Unauthorized(why).error_response();
                        Either::Right(std::future::ready(Ok(req.into_response(res))))
                    }
                }
            })
            .wrap_fn(move |req, srv| {
                let started = Instant::now();
                let method = req.method().to_string();
                let path = req.path().to_owned();
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .map(|v| printable(v.as_bytes()))
                        .unwrap_or_default()
                };
                let correlation_id = header("X-CORRELATION-ID");
                let source = header("X-RESOURCE");
                let peer = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                let log = log.clone();
                let metrics = metrics.clone();
                let fut = srv.call(req);
                async move {
                    let res = fut.await?;
                    let endpoint = res.request().match_pattern();
                    metrics.request(
                        endpoint.as_deref().unwrap_or("unmatched"),
                        res.status().as_u16(),
                        started.elapsed().as_secs_f64(),
                    );
                    let error = res
                        .response()
                        .extensions()
                        .get::<ErrorMessage>()
                        .map(|m| m.0.clone());
                    info!(log, "request";
                        "method" => method, "path" => path,
                        "status" => res.status().as_u16(),
                        "latency_ms" => started.elapsed().as_secs_f64() * 1000.0,
                        "correlation_id" => correlation_id, "source" => source,
                        "peer" => peer, "error" => error);
                    Ok(res)
                }
            })
            .configure(api::routes)
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
    on_start(handle.clone());
    let serving = actix_web::rt::spawn(server);
    crate::server::systemd::ready(&log, &format!("serving on {}", settings.bind));
    crate::server::systemd::watchdog(supervisor.clone(), log.clone());
    let beating = heartbeats(&settings, pool.clone(), identity.clone(), log.clone());
    let retention = crate::store::retention::spawn(
        pool.clone(),
        crate::store::retention::Policy {
            retention_days: settings.retention_days,
            keep_tasks: settings.retention_keep_tasks,
            agent: settings.agent_name.clone(),
            run_root: retention_root,
        },
        Duration::from_secs(settings.retention_check_secs.max(1)),
        log.new(slog::o!("part" => "retention")),
    );
    shutdown.await;

    info!(log, "shutting down"; "stop_tasks" => settings.stop_tasks_on_shutdown);
    crate::server::systemd::stopping(&log);
    beating.abort();
    retention.abort();
    if let Some(l) = listening {
        l.abort();
    }
    let (draining_pool, me) = (pool.clone(), identity.clone());
    let drained = tokio::task::spawn_blocking(move || {
        let mut conn = draining_pool.get()?;
        crate::cluster::agents::draining(&mut conn, &me)
    })
    .await;
    if !matches!(drained, Ok(Ok(()))) {
        warn!(log, "cannot mark this agent as draining in agents");
    }
    let _ = closing_tx.send(true);
    let _ = supervisor
        .send(Close {
            stop_tasks: settings.stop_tasks_on_shutdown,
        })
        .await;
    handle.stop(true).await;
    let _ = serving.await;
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

/// Beats this agent's heart in `agents` every `heartbeat_secs`, on the database's clock.
fn heartbeats(
    settings: &Settings,
    pool: Pool,
    me: crate::cluster::agents::Identity,
    log: Logger,
) -> actix_web::rt::task::JoinHandle<()> {
    let every = Duration::from_secs(settings.heartbeat_secs.max(1));
    let me_name = me.name.clone();
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (pool, me) = (pool.clone(), me.clone());
            let beat = tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                crate::cluster::agents::heartbeat(&mut conn, &me)
            })
            .await;
            match beat {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    warn!(log, "this agent's row in agents was gone or written by another process under the same agent_name; written again (give each agent a name of its own)"; "agent" => &me_name)
                }
                Ok(Err(e)) => warn!(log, "heartbeat not recorded"; "error" => %e),
                Err(e) => warn!(log, "heartbeat not recorded"; "error" => %e),
            }
        }
    })
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

/// The rustls configuration of the settings' certificate and key, if HTTPS is on.
fn tls_config(settings: &Settings) -> Result<Option<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    if settings.tls_cert_file.is_empty() {
        return Ok(None);
    }
    let certs = CertificateDer::pem_file_iter(&settings.tls_cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read tls_cert_file {}: {e}", settings.tls_cert_file))?;
    let key = PrivateKeyDer::from_pem_file(&settings.tls_key_file)
        .map_err(|e| format!("cannot read tls_key_file {}: {e}", settings.tls_key_file))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map(Some)
        .map_err(|e| format!("TLS certificate or key refused: {e}"))
}

/// A header value for a log line: at most 256 characters, control characters replaced.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(256)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A server running on its own thread and actix system (tests, embedding).
pub struct Spawned {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spawned {
    /// Shuts the server down gracefully and waits for its thread to end.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Prepares and starts a server on `127.0.0.1:0` in a thread of its own.
pub fn spawn(settings: Settings, log: Logger) -> anyhow::Result<Spawned> {
    let prepared = prepare(settings, &log)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let system = actix_web::rt::System::new();
        let shutdown = async move {
            let _ = shutdown_rx.await;
        };
        let result = system.block_on(run(prepared, listener, log, shutdown, move |h| {
            let _ = started_tx.send(h);
        }));
        if let Err(e) = result {
            eprintln!("server thread ended with an error: {e}");
        }
    });
    started_rx
        .recv_timeout(Duration::from_secs(30))
        .context("server did not start")?;
    Ok(Spawned {
        addr,
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    })
}
