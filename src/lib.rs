//! downlink: the agent end of an orchestrator's dispatch channel. A central node POSTs tasks; each
//! runs as an `ansible-playbook` process against the task's nodes, supervised (stop, a global forks
//! budget, time limits), with every status change and every host's result recorded in PostgreSQL
//! or the embedded SQLite file.
//!
//! A short tour, from the bottom up (`ARCHITECTURE.md` at the top of the repository has the code
//! map, the layer table a test holds the imports to, and the invariants):
//!
//! - [`status`], [`time`], [`settings`], [`logging`], [`metrics`], [`disk`]: the foundation
//!   everyone uses.
//! - [`store`]: the database: queries for both backends, the HTTP workers' readers, and
//!   [`store::persistence::Persistence`], the only writer, which retries unavailability and
//!   repairs what the database refuses; [`store::clean`] makes text from outside storable.
//! - [`cluster`]: many agents on one PostgreSQL (agents as rows, the shared queue's claims).
//! - [`ansible`]: playbook shapes, the run directory, the callback plugin and its events.
//! - [`exec`]: processes: spawning without copying the server, a task's cgroup, the agent's SSH
//!   masters, the cleanup on the nodes.
//! - [`task::TaskActor`]: one per running task, from spawn (or adoption) to its recorded end.
//! - [`supervisor::TaskSupervisor`]: admission (the FIFO queue and forks budget), end routing,
//!   the shared queue, and the recovery plan after a restart.
//! - [`api`]: the HTTP endpoints, one file each; [`server`] puts the parts together and shuts
//!   them down in order; [`cli`] is `downlink tasks …`, a client of the HTTP API.

pub mod ansible;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod console;
pub mod disk;
pub mod exec;
pub mod logging;
pub mod metrics;
pub mod server;
pub mod settings;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod task;
pub mod time;
