//! PostgreSQL's `NOTIFY` channels that agents sharing one database listen on. The writer sends a
//! queue wake-up with the writes that change the shared queue (an unclaimed insert, an end);
//! `cluster::claim` sends stop requests. On SQLite there is one agent and nothing to wake.

use diesel::RunQueryDsl;

use crate::store::db::DbConnection;
use crate::store::StoreError;

/// The channel of the queue's wake-ups: a task was queued or ended.
pub const QUEUE_CHANNEL: &str = "downlink_queue";
/// The channel of stops asked through an agent that does not run the task.
pub const STOP_CHANNEL: &str = "downlink_stop";

/// `NOTIFY downlink_queue` in the current transaction (PostgreSQL; nothing on SQLite).
pub fn queue(conn: &mut DbConnection) -> Result<(), StoreError> {
    send(conn, QUEUE_CHANNEL)
}

/// `NOTIFY downlink_stop` in the current transaction (PostgreSQL; nothing on SQLite).
pub fn stop(conn: &mut DbConnection) -> Result<(), StoreError> {
    send(conn, STOP_CHANNEL)
}

fn send(conn: &mut DbConnection, channel: &str) -> Result<(), StoreError> {
    if let DbConnection::Pg(pg) = conn {
        diesel::sql_query(format!("NOTIFY {channel}")).execute(pg)?;
    }
    Ok(())
}
