//! Before serving: open and migrate the database, record this agent, install the run directory
//! and the callback plugin, detect process tracking, and plan the recovery of what an earlier
//! server left behind. Nothing here starts an actor.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use slog::{info, warn, Logger};

use crate::ansible::rundir;
use crate::exec::cgroup::Cgroups;
use crate::exec::procs;
use crate::exec::Tracking;
use crate::settings::Settings;
use crate::store::db::{self, Pool, Target};
use crate::supervisor::recovery;
use crate::supervisor::Recover;

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

/// Opens the database, applies pending migrations, records this agent, installs the run
/// directory and the callback plugin, and plans the recovery of the tasks an earlier server left
/// unfinished.
pub fn prepare(settings: Settings, log: &Logger) -> anyhow::Result<Prepared> {
    let target = Target::parse(&settings.effective_database_url())?;
    check_shared_queue(&settings, &target)?;
    let pool = db::pool(
        &target,
        settings.pool_size,
        DB_WAIT,
        Duration::from_secs(settings.db_statement_timeout_secs),
    )
    .with_context(|| format!("opening {}", target.describe()))?;
    let mut conn = first_connection(&pool, &target, log)?;
    let applied = db::migrate(&mut conn)?;
    info!(log, "database ready"; "database" => target.describe(), "migrations_applied" => applied.len());
    let identity = register(&mut conn, &settings, log)?;
    if procs::become_subreaper() {
        // Orphans of tasks become this process's children: reaped within a second of ending.
        // One reaper per process (tests start many servers in one).
        static REAPER: std::sync::Once = std::sync::Once::new();
        let mut started = Ok(());
        REAPER.call_once(|| {
            started = std::thread::Builder::new()
                .name("orphans".into())
                .spawn(|| loop {
                    std::thread::sleep(Duration::from_secs(1));
                    procs::reap_orphans();
                })
                .map(drop);
        });
        started.context("starting the orphan reaper")?;
    } else {
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
    let tracking = tracking(&settings, log);
    let readers = http_readers(&settings, &target, log);
    Ok(Prepared {
        settings: Arc::new(settings),
        pool,
        readers,
        identity,
        run_root,
        recover: Recover(plan),
        tracking,
        run_as,
    })
}

/// The shared queue's needs: PostgreSQL, and params stored in the rows other agents claim.
fn check_shared_queue(settings: &Settings, target: &Target) -> anyhow::Result<()> {
    if !settings.shared_queue {
        return Ok(());
    }
    if !matches!(target, Target::Postgres(_)) {
        anyhow::bail!("shared_queue needs PostgreSQL: agents share their queue through its tasks table (database_url is {})", target.describe());
    }
    if !settings.store_params {
        anyhow::bail!("shared_queue needs store_params = true: the agent that claims a task reads its params from its row");
    }
    Ok(())
}

/// The first connection, waited for up to [`DB_START_WAIT`] (the database may be starting too).
fn first_connection(pool: &Pool, target: &Target, log: &Logger) -> anyhow::Result<db::PooledConn> {
    let deadline = Instant::now() + DB_START_WAIT;
    loop {
        match pool.get() {
            Ok(conn) => return Ok(conn),
            Err(e) if Instant::now() < deadline => {
                warn!(log, "database not reachable yet, retrying"; "error" => %e);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("connecting to {}", target.describe()))
            }
        }
    }
}

/// Records this agent in `agents`; with the shared queue, takes back the notes of its loss.
fn register(
    conn: &mut db::DbConnection,
    settings: &Settings,
    log: &Logger,
) -> anyhow::Result<crate::cluster::agents::Identity> {
    let identity =
        crate::cluster::agents::Identity::of_this_process(&settings.agent_name, settings.max_forks);
    crate::cluster::agents::register(conn, &identity).context("recording this agent in agents")?;
    if settings.shared_queue {
        let taken_back = crate::cluster::claim::back(conn, &settings.agent_name)
            .context("taking back the notes of this agent's loss")?;
        if taken_back > 0 {
            info!(log, "back after being lost: its running tasks' notes taken back"; "tasks" => taken_back);
        }
    }
    Ok(identity)
}

/// How task processes are tracked: cgroup v2 when it can be used, else the fallback and why.
fn tracking(settings: &Settings, log: &Logger) -> Tracking {
    let tracking = match Cgroups::detect(
        &settings.cgroup_parent,
        &settings.agent_name,
        settings.task_cpu_weight,
    ) {
        Ok(cgroups) => Tracking::Cgroup(cgroups),
        Err(why) => Tracking::Fallback(why),
    };
    match &tracking {
        Tracking::Cgroup(_) => info!(log, "process tracking"; "mode" => tracking.describe()),
        Tracking::Fallback(_) => warn!(log, "process tracking"; "mode" => tracking.describe()),
    }
    tracking
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
