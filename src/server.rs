//! Putting the parts together: open and migrate the database, install the callback plugin, start
//! the actors and serve HTTP on an already-bound listener (so tests bind `127.0.0.1:0`).

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use actix_web::dev::{ServerHandle, Service};
use actix_web::{web, App, HttpServer};
use anyhow::Context as _;
use slog::{info, Logger};

use crate::ansible::rundir;
use crate::api::{self, AppState, ErrorMessage};
use crate::db::{self, Pool, Target};
use crate::persistence::Persistence;
use crate::settings::Settings;
use crate::supervisor::TaskSupervisor;

/// The database and run directory, ready for the server.
pub struct Prepared {
    pub settings: Arc<Settings>,
    pub pool: Pool,
    pub run_root: PathBuf,
}

/// Opens the database, applies pending migrations and installs the callback plugin.
pub fn prepare(settings: Settings, log: &Logger) -> anyhow::Result<Prepared> {
    let target = Target::parse(&settings.effective_database_url())?;
    let pool = db::pool(&target, settings.pool_size, Duration::from_secs(10))
        .with_context(|| format!("opening {}", target.describe()))?;
    let applied = {
        let mut conn = pool
            .get()
            .with_context(|| format!("connecting to {}", target.describe()))?;
        db::migrate(&mut conn)?
    };
    info!(log, "database ready"; "database" => target.describe(), "migrations_applied" => applied.len());
    if !crate::procs::become_subreaper() {
        slog::warn!(
            log,
            "cannot become a child subreaper: killed task processes are left to init to reap"
        );
    }
    let run_root = rundir::install(&settings.run_dir)
        .with_context(|| format!("preparing run directory {}", settings.run_dir.display()))?;
    Ok(Prepared {
        settings: Arc::new(settings),
        pool,
        run_root,
    })
}

/// Serves until the server is stopped (SIGINT/SIGTERM when `signals`, or through its handle).
pub async fn run(
    prepared: Prepared,
    listener: TcpListener,
    log: Logger,
    signals: bool,
    on_start: impl FnOnce(ServerHandle),
) -> std::io::Result<()> {
    let Prepared {
        settings,
        pool,
        run_root,
    } = prepared;
    let persistence = Persistence::start(pool.clone(), log.new(slog::o!("part" => "persistence")));
    let supervisor =
        TaskSupervisor::new(settings.clone(), run_root, persistence.clone(), log.clone()).start();
    let state = web::Data::new(AppState {
        settings: settings.clone(),
        pool,
        persistence,
        supervisor,
        log: log.clone(),
    });
    let request_log = log.clone();
    let mut server = HttpServer::new(move || {
        let log = request_log.clone();
        App::new()
            .app_data(state.clone())
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
                let fut = srv.call(req);
                async move {
                    let res = fut.await?;
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
            .default_service(web::to(api::no_route))
    })
    .listen(listener)?;
    if settings.workers > 0 {
        server = server.workers(settings.workers);
    }
    if !signals {
        server = server.disable_signals();
    }
    let server = server.run();
    on_start(server.handle());
    server.await
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
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spawned {
    /// Stops accepting requests and waits for the server thread to end.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            let handle = self.handle.clone();
            let _ = std::thread::spawn(move || {
                actix_web::rt::System::new().block_on(handle.stop(false))
            })
            .join();
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
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let system = actix_web::rt::System::new();
        let result = system.block_on(run(prepared, listener, log, false, move |h| {
            let _ = tx.send(h);
        }));
        if let Err(e) = result {
            eprintln!("server thread ended with an error: {e}");
        }
    });
    let handle = rx
        .recv_timeout(Duration::from_secs(30))
        .context("server did not start")?;
    Ok(Spawned {
        addr,
        handle,
        thread: Some(thread),
    })
}
