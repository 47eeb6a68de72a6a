//! downlink: the agent end of an orchestrator's dispatch channel. A central node POSTs tasks; each
//! runs as an `ansible-playbook` process against the task's nodes, supervised (stop, a global forks
//! budget, time limits), with every status change and every host's result recorded in PostgreSQL
//! or the embedded SQLite file.
//!
//! The parts of `DESIGN.md` and where they live:
//!
//! - HTTP handlers, one file per endpoint: [`api`] (`api/run.rs`, `api/stop.rs`, …); the shared
//!   envelope, headers and error strings are in `api.rs`, request fields in `api/fields.rs`.
//! - [`supervisor::TaskSupervisor`]: queue, forks budget, stop routing, `parallel_run` waiters;
//!   [`claim`]: the queue shared by every agent on one PostgreSQL (`shared_queue`).
//! - [`task::TaskActor`]: one per running task; owns its process group and run directory;
//!   `task/verdict.rs` turns how it ended into status and `err`.
//! - [`persistence::Persistence`]: the only database writer (an ordered queue applied on the
//!   blocking pool); it retries only unavailability and repairs writes the database refuses.
//! - [`clean`]: the one place where text from playbooks and nodes is made storable.
//! - [`recovery`]: what an earlier run left (adopt, end, re-queue), as a plan the supervisor runs;
//!   [`retention`]: old tasks lose their events and run directories.
//! - [`store`]: diesel queries shared by both backends; [`db`]: connections, pool, migrations.
//! - [`ansible`]: playbook and params shapes, the run directory, the callback plugin's events and
//!   the bounded reader of its file (`ansible/tail.rs`).
//! - [`exec`]: the execution layer: a task is a cgroup (`exec/cgroup.rs`), the agent's warm SSH
//!   masters (`exec/connections.rs`), the task's mark on its nodes and its cleanup there
//!   (`exec/remote.rs`).
//! - [`procs`]: `/proc` reads (start times, the environment marker) for adoption and the fallback.
//! - [`auth`]: bearer tokens and the client allow-list; [`health`]: `/healthz` and `/readyz`;
//!   [`metrics`]: what `/metrics` shows.
//! - [`cli`]: `downlink tasks …`, a client of the HTTP API.
//! - [`settings`], [`logging`], [`server`] (wiring, graceful shutdown),
//!   [`status`], [`time`].

pub mod ansible;
pub mod api;
pub mod cli;
pub mod cluster;
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
