//! Agents are rows: each server keeps one row of `agents` up to date (who it is, its budget, a
//! heartbeat on the database's clock), and `downlink agents` lists them.
//!
//! An agent whose heartbeat is older than [`LEASE_HEARTBEATS`] heartbeats is shown as lost.

use std::time::Duration;

use diesel::dsl::sql;
use diesel::expression::SqlLiteral;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text, Timestamp};

use crate::store::db::DbConnection;
use crate::store::schema::agents;
use crate::store::StoreError;

pub use crate::settings::LEASE_HEARTBEATS;

/// What an agent says of itself.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub host: String,
    pub pid: i32,
    pub boot_id: String,
    pub version: String,
    pub max_forks: i32,
}

impl Identity {
    /// This process, under `name` with budget `max_forks`.
    pub fn of_this_process(name: &str, max_forks: u32) -> Identity {
        Identity {
            name: name.to_owned(),
            host: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pid: std::process::id() as i32,
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|b| b.trim().to_owned())
                .unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            max_forks: i32::try_from(max_forks).unwrap_or(i32::MAX),
        }
    }
}

/// The database's own "now", in UTC, as each backend writes it: every agent's times are on the
/// one clock of the database, never the agents' own.
fn db_now(conn: &DbConnection) -> SqlLiteral<Timestamp> {
    sql::<Timestamp>(match conn {
        DbConnection::Pg(_) => "(now() AT TIME ZONE 'UTC')",
        DbConnection::Sqlite(_) => "strftime('%Y-%m-%d %H:%M:%f', 'now')",
    })
}

/// Records a starting agent: its row is written afresh, `active`, started and beating now.
pub fn register(conn: &mut DbConnection, me: &Identity) -> Result<(), StoreError> {
    let now = db_now(conn);
    let row = (
        agents::host.eq(&me.host),
        agents::pid.eq(me.pid),
        agents::boot_id.eq(&me.boot_id),
        agents::version.eq(&me.version),
        agents::started_at.eq(now.clone()),
        agents::heartbeat_at.eq(now),
        agents::max_forks.eq(me.max_forks),
        agents::state.eq("active"),
    );
    // Written afresh either way: an update of the row, or a new one.
    let updated = diesel::update(agents::table.find(&me.name))
        .set(row.clone())
        .execute(conn)?;
    if updated == 0 {
        let inserted = diesel::insert_into(agents::table)
            .values((agents::name.eq(&me.name), row.clone()))
            .execute(conn);
        match inserted {
            Ok(_) => {}
            // Another process under this name inserted it between the two statements.
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            )) => {
                diesel::update(agents::table.find(&me.name))
                    .set(row)
                    .execute(conn)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// This agent's own row: its name, written by this process.
macro_rules! mine {
    ($me:expr) => {
        agents::table
            .filter(agents::name.eq(&$me.name))
            .filter(agents::pid.eq($me.pid))
    };
}

/// A heartbeat of this agent. If its row is gone, or another process under the same name wrote
/// it, the row is written again and the answer is false.
pub fn heartbeat(conn: &mut DbConnection, me: &Identity) -> Result<bool, StoreError> {
    let now = db_now(conn);
    let updated = diesel::update(mine!(me))
        .set(agents::heartbeat_at.eq(now))
        .execute(conn)?;
    if updated == 0 {
        register(conn, me)?;
    }
    Ok(updated > 0)
}

/// Marks this agent as draining (it is shutting down).
pub fn draining(conn: &mut DbConnection, me: &Identity) -> Result<(), StoreError> {
    diesel::update(mine!(me))
        .set(agents::state.eq("draining"))
        .execute(conn)?;
    Ok(())
}

/// One row of `downlink agents`.
#[derive(Debug, QueryableByName)]
pub struct AgentRow {
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Text)]
    pub host: String,
    #[diesel(sql_type = Integer)]
    pub pid: i32,
    #[diesel(sql_type = Text)]
    pub version: String,
    #[diesel(sql_type = Timestamp)]
    pub started_at: chrono::NaiveDateTime,
    #[diesel(sql_type = Integer)]
    pub max_forks: i32,
    #[diesel(sql_type = Text)]
    pub state: String,
    /// Milliseconds since its last heartbeat, on the database's clock.
    #[diesel(sql_type = BigInt)]
    pub silent_ms: i64,
}

/// Every agent, by name, with how long each has been silent.
pub fn list(conn: &mut DbConnection) -> Result<Vec<AgentRow>, StoreError> {
    let silent = match conn {
        DbConnection::Pg(_) => {
            "CAST(EXTRACT(EPOCH FROM ((now() AT TIME ZONE 'UTC') - heartbeat_at)) * 1000 AS BIGINT)"
        }
        DbConnection::Sqlite(_) => {
            "CAST((julianday('now') - julianday(heartbeat_at)) * 86400000 AS INTEGER)"
        }
    };
    Ok(diesel::sql_query(format!(
        "SELECT name, host, pid, version, started_at, max_forks, state, {silent} AS silent_ms \
         FROM agents ORDER BY name"
    ))
    .load(conn)?)
}

/// The state `downlink agents` shows: the stored one, or `lost` past the lease.
pub fn shown_state(row: &AgentRow, heartbeat: Duration) -> &str {
    let lease = heartbeat * LEASE_HEARTBEATS;
    if row.silent_ms > i64::try_from(lease.as_millis()).unwrap_or(i64::MAX) {
        "lost"
    } else {
        &row.state
    }
}
