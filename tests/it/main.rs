//! downlink's integration tests: real server, real PostgreSQL and SQLite, real ansible-playbook
//! over SSH to sshd test hosts on 127.0.0.2-4. Run them with `scripts/test`, which starts all of
//! that first.

mod architecture;
mod auth;
mod chaos;
mod cli;
mod cluster;
mod connections;
mod console;
mod contract;
mod disk;
mod events;
mod execution;
mod fencing;
mod fuzz;
pub mod harness;
mod hostile;
mod limits;
mod operate;
pub mod procwatch;
mod recovery;
mod writer;
