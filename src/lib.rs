//! downlink: the agent end of an orchestrator's dispatch channel. A central node POSTs tasks; each
//! runs as an `ansible-playbook` process against the task's nodes, supervised (stop, a global forks
//! budget, time limits), with every status change and every host's result recorded in PostgreSQL
//! or the embedded SQLite file.
//!
//! The parts of `DESIGN.md` and where they live:
//!
//! - HTTP handlers, one file per endpoint: [`api`] (`api/run.rs`, `api/stop.rs`, …); the shared
//!   envelope, headers and error strings are in `api.rs`, request fields in `api/fields.rs`.
//! - [`supervisor::TaskSupervisor`]: queue, forks budget, stop routing, `parallel_run` waiters.
//! - [`task::TaskActor`]: one per running task; owns its process group and run directory.
//! - [`persistence::Persistence`]: the only database writer, on a `SyncArbiter` thread.
//! - [`store`]: diesel queries shared by both backends; [`db`]: connections, pool, migrations.
//! - [`ansible`]: playbook and params shapes, the run directory, the callback plugin's events.
//! - [`procs`]: finding and killing a task's processes through `/proc`.
//! - [`auth`]: bearer tokens and the client allow-list; [`health`]: `/healthz` and `/readyz`.
//! - [`settings`], [`logging`], [`server`] (wiring, restart recovery, graceful shutdown),
//!   [`status`], [`time`].

pub mod ansible;
pub mod api;
pub mod auth;
pub mod db;
pub mod health;
pub mod logging;
pub mod persistence;
pub mod procs;
pub mod schema;
pub mod server;
pub mod settings;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod task;
pub mod time;
