//! Agents are rows: each server keeps one row of `agents` up to date (who it is, its budget, a
//! heartbeat on the database's clock), and `downlink agents` lists them.
//!
//! An agent whose heartbeat is older than [`LEASE_HEARTBEATS`] heartbeats is shown as lost.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text, Timestamp};

use crate::store::db::DbConnection;
use crate::store::StoreError;

/// How many heartbeat intervals an agent may miss before it counts as lost.
pub const LEASE_HEARTBEATS: u32 = 3;

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

/// The database's own "now", in UTC, as each backend writes it.
fn now_sql(conn: &DbConnection) -> &'static str {
    match conn {
        DbConnection::Pg(_) => "(now() AT TIME ZONE 'UTC')",
        DbConnection::Sqlite(_) => "strftime('%Y-%m-%d %H:%M:%f', 'now')",
    }
}

/// `$n` on PostgreSQL, `?` on SQLite.
fn placeholders(conn: &DbConnection, sql: &str) -> String {
    match conn {
        DbConnection::Pg(_) => {
            let mut n = 0;
            sql.chars()
                .map(|c| {
                    if c == '?' {
                        n += 1;
                        format!("${n}")
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        }
        DbConnection::Sqlite(_) => sql.to_owned(),
    }
}

/// Records a starting agent: its row is written afresh, `active`, started and beating now.
pub fn register(conn: &mut DbConnection, me: &Identity) -> Result<(), StoreError> {
    let now = now_sql(conn);
    let sql = placeholders(
        conn,
        &format!(
            "INSERT INTO agents (name, host, pid, boot_id, version, started_at, heartbeat_at, \
             max_forks, state) VALUES (?, ?, ?, ?, ?, {now}, {now}, ?, 'active') \
             ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid, \
             boot_id = excluded.boot_id, version = excluded.version, \
             started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, \
             max_forks = excluded.max_forks, state = 'active'"
        ),
    );
    diesel::sql_query(sql)
        .bind::<Text, _>(&me.name)
        .bind::<Text, _>(&me.host)
        .bind::<Integer, _>(me.pid)
        .bind::<Text, _>(&me.boot_id)
        .bind::<Text, _>(&me.version)
        .bind::<Integer, _>(me.max_forks)
        .execute(conn)?;
    Ok(())
}

/// A heartbeat of this agent. If its row is gone, or another process under the same name wrote
/// it, the row is written again and the answer is false.
pub fn heartbeat(conn: &mut DbConnection, me: &Identity) -> Result<bool, StoreError> {
    let sql = placeholders(
        conn,
        &format!(
            "UPDATE agents SET heartbeat_at = {} WHERE name = ? AND pid = ?",
            now_sql(conn)
        ),
    );
    let updated = diesel::sql_query(sql)
        .bind::<Text, _>(&me.name)
        .bind::<Integer, _>(me.pid)
        .execute(conn)?;
    if updated == 0 {
        register(conn, me)?;
    }
    Ok(updated > 0)
}

/// Marks this agent as draining (it is shutting down).
pub fn draining(conn: &mut DbConnection, me: &Identity) -> Result<(), StoreError> {
    let sql = placeholders(
        conn,
        "UPDATE agents SET state = 'draining' WHERE name = ? AND pid = ?",
    );
    diesel::sql_query(sql)
        .bind::<Text, _>(&me.name)
        .bind::<Integer, _>(me.pid)
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
