//! The shared queue (`shared_queue = true`, PostgreSQL): every agent inserts its tasks unclaimed
//! (`tasks.agent` NULL, status 1) and any agent with free forks claims the head.
//!
//! A claim is one short transaction under an advisory lock that every agent's claim takes, so the
//! queue stays strictly FIFO across agents and the budgets exact: the oldest unclaimed pending task
//! (`FOR UPDATE SKIP LOCKED`, so a row a stop is ending is passed over) is taken only if it fits in
//! this agent's free forks and, with `cluster_max_forks`, in what the cluster has left; otherwise
//! nobody behind it is taken either. The claimer writes its `agent_name` into the row and runs it.
//!
//! Agents are woken by `NOTIFY downlink_queue`, sent right after an unclaimed insert has committed
//! and with every end (inside the writer's batch transaction, so at its commit, or right after
//! the end's own); each agent also claims every second, in case a notification is lost.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable};

use crate::status::Status;
use crate::store::db::DbConnection;
use crate::store::notify::STOP_CHANNEL;
use crate::store::schema::tasks;
use crate::store::{StoreError, Task};

/// The advisory lock every claim takes (`"dlqu"`).
const CLAIM_LOCK: i64 = 0x646c_7175;

/// What a supervisor claims with.
#[derive(Clone)]
pub struct Shared {
    pub pool: crate::store::db::Pool,
    pub cluster_max_forks: u32,
}

impl Shared {
    /// Runs `f` on a pooled connection on the blocking pool (claims, stop requests, lost agents).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, StoreError>> {
        let pool = self.pool.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut conn = pool.get()?;
                f(&mut conn)
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Unavailable(e.to_string())))
        }
    }
}

/// What a claim may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// This agent's free forks.
    pub free: u32,
    /// This agent's `max_forks` (a task asking for more runs with this many).
    pub max_forks: u32,
    /// `cluster_max_forks`; 0 = no cap over all agents.
    pub cluster_max_forks: u32,
}

#[derive(QueryableByName)]
struct Sum {
    #[diesel(sql_type = Nullable<BigInt>)]
    forks: Option<i64>,
}

/// Claims the head of the shared queue for `agent` if it fits in `room`; the task's row, now
/// carrying `agent`.
pub fn claim_head(
    conn: &mut DbConnection,
    agent: &str,
    room: Room,
) -> Result<Option<Task>, StoreError> {
    if room.free == 0 {
        return Ok(None);
    }
    conn.transaction(|c| {
        diesel::sql_query(format!("SELECT pg_advisory_xact_lock({CLAIM_LOCK})")).execute(c)?;
        let DbConnection::Pg(pg) = c else {
            return Ok(None);
        };
        let head: Option<Task> = tasks::table
            .filter(tasks::status.eq(Status::Pending.code()))
            .filter(tasks::agent.is_null())
            .order(tasks::id.asc())
            .limit(1)
            .for_update()
            .skip_locked()
            .select(Task::as_select())
            .first(pg)
            .optional()?;
        let Some(mut head) = head else {
            return Ok(None);
        };
        let needs = u32::try_from(head.forks)
            .unwrap_or(1)
            .clamp(1, room.max_forks.max(1));
        if needs > room.free {
            return Ok(None);
        }
        if room.cluster_max_forks > 0 {
            // Running tasks hold what they run with; claimed ones not started yet what they ask.
            let used: Vec<Sum> = diesel::sql_query(
                "SELECT SUM(forks)::bigint AS forks FROM tasks \
                 WHERE status = 2 OR (status = 1 AND agent IS NOT NULL)",
            )
            .load(pg)?;
            let used = used.first().and_then(|s| s.forks).unwrap_or(0);
            if used + i64::from(needs) > i64::from(room.cluster_max_forks) {
                return Ok(None);
            }
        }
        diesel::update(tasks::table.find(head.id))
            .set(tasks::agent.eq(agent))
            .execute(pg)?;
        head.agent = Some(agent.to_owned());
        Ok(Some(head))
    })
}

/// Where a pending task stands in the shared queue: unclaimed tasks before it.
pub fn ahead_of(conn: &mut DbConnection, id: i64) -> Result<i64, StoreError> {
    Ok(tasks::table
        .filter(tasks::status.eq(Status::Pending.code()))
        .filter(tasks::agent.is_null())
        .filter(tasks::id.lt(id))
        .count()
        .get_result(conn)?)
}

/// Takes an unclaimed pending task out of the shared queue for ending it here (a stop): under the
/// claim lock, so nobody claims it meanwhile. False if it was claimed (or ended) first.
pub fn take_for_stop(conn: &mut DbConnection, id: i64, agent: &str) -> Result<bool, StoreError> {
    conn.transaction(|c| {
        diesel::sql_query(format!("SELECT pg_advisory_xact_lock({CLAIM_LOCK})")).execute(c)?;
        let taken = diesel::update(
            tasks::table
                .find(id)
                .filter(tasks::status.eq(Status::Pending.code()))
                .filter(tasks::agent.is_null()),
        )
        .set(tasks::agent.eq(agent))
        .execute(c)?;
        Ok(taken == 1)
    })
}

/// Records a stop for the agent that runs (or claimed) the task and wakes it; that agent's name,
/// or `None` if the task is unclaimed or has ended.
pub fn request_stop(
    conn: &mut DbConnection,
    id: i64,
    reason: &str,
) -> Result<Option<String>, StoreError> {
    conn.transaction(|c| {
        let owner: Option<Option<String>> = diesel::update(
            tasks::table
                .find(id)
                .filter(tasks::status.eq_any(Status::LIVE))
                .filter(tasks::agent.is_not_null()),
        )
        .set((
            tasks::stop_requested_at.eq(crate::time::now()),
            tasks::stop_reason.eq(reason),
        ))
        .returning(tasks::agent)
        .get_result(c)
        .optional()?;
        if owner.is_some() {
            diesel::sql_query(format!("NOTIFY {STOP_CHANNEL}")).execute(c)?;
        }
        Ok(owner.flatten())
    })
}

/// This agent's live tasks that a stop was asked for elsewhere, with the stop's reason.
pub fn stops_for(
    conn: &mut DbConnection,
    agent: &str,
) -> Result<Vec<(i64, Option<String>)>, StoreError> {
    Ok(tasks::table
        .filter(tasks::agent.eq(agent))
        .filter(tasks::status.eq_any(Status::LIVE))
        .filter(tasks::stop_requested_at.is_not_null())
        .select((tasks::id, tasks::stop_reason))
        .load(conn)?)
}

#[derive(QueryableByName)]
struct LostAgent {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::Timestamp)]
    heartbeat_at: chrono::NaiveDateTime,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    past_grace: bool,
}

/// The start of the note a lost agent's live tasks get in `err`.
const LOST_NOTE: &str = "agent ";
const LOST_NOTE_MID: &str = " has not been heard from since ";

/// A live task of a lost agent, to be ended as interrupted here.
#[derive(Debug, Clone)]
pub struct LostTask {
    pub task: Task,
    /// Its mark on the nodes (`tasks.remote_mark`): what to end there first.
    pub remote_mark: Option<String>,
    pub err: String,
}

/// Agents whose lease ran out (no heartbeat for `lease`): their live tasks get a note in `err`
/// (they may still be running there, and an agent restarted on that machine adopts them); past
/// `lease + grace`, the tasks to end as interrupted, each with its `err`.
pub fn lost_agents(
    conn: &mut DbConnection,
    me: &str,
    lease: std::time::Duration,
    grace: std::time::Duration,
) -> Result<Vec<LostTask>, StoreError> {
    let lost: Vec<LostAgent> = diesel::sql_query(
        "SELECT name, heartbeat_at,          heartbeat_at < (now() AT TIME ZONE 'UTC') - make_interval(secs => $3) AS past_grace          FROM agents WHERE name <> $1          AND heartbeat_at < (now() AT TIME ZONE 'UTC') - make_interval(secs => $2)",
    )
    .bind::<diesel::sql_types::Text, _>(me)
    .bind::<diesel::sql_types::Double, _>(lease.as_secs_f64())
    .bind::<diesel::sql_types::Double, _>((lease + grace).as_secs_f64())
    .load(conn)?;
    let mut to_end = Vec::new();
    for agent in lost {
        let since = crate::time::rfc3339(agent.heartbeat_at);
        let live = tasks::table
            .filter(tasks::agent.eq(&agent.name))
            .filter(tasks::status.eq_any(Status::LIVE));
        if agent.past_grace {
            let err = format!(
                "agent {} was lost: no heartbeat since {since}, {} s ago or more; the true end of this task is unknown (it may have gone on running there)",
                agent.name,
                (lease + grace).as_secs()
            );
            let found: Vec<(Task, Option<String>)> = live
                .select((Task::as_select(), tasks::remote_mark))
                .load(conn)?;
            for (task, remote_mark) in found {
                to_end.push(LostTask {
                    task,
                    remote_mark,
                    err: err.clone(),
                });
            }
        } else {
            let note = format!(
                "{LOST_NOTE}{}{LOST_NOTE_MID}{since}; the task may still be running there: it is adopted if that agent starts again within lost_agent_grace_secs ({} s), else it ends interrupted",
                agent.name,
                grace.as_secs()
            );
            diesel::update(live.filter(tasks::err.is_null()))
                .set(tasks::err.eq(note))
                .execute(conn)?;
        }
    }
    Ok(to_end)
}

/// Which of these tasks have ended (a lost agent's tasks, ended by another agent meanwhile).
pub fn ended_among(conn: &mut DbConnection, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
    let mut ended = Vec::new();
    for chunk in ids.chunks(500) {
        ended.extend(
            tasks::table
                .filter(tasks::id.eq_any(chunk))
                .filter(tasks::status.ne_all(Status::LIVE))
                .select(tasks::id)
                .load::<i64>(conn)?,
        );
    }
    Ok(ended)
}

/// At start: the notes a loss left on this agent's live tasks are taken back (it is here again).
pub fn back(conn: &mut DbConnection, me: &str) -> Result<usize, StoreError> {
    let note = format!("{LOST_NOTE}{me}{LOST_NOTE_MID}%");
    Ok(diesel::update(
        tasks::table
            .filter(tasks::agent.eq(me))
            .filter(tasks::status.eq_any(Status::LIVE))
            .filter(tasks::err.like(note)),
    )
    .set(tasks::err.eq(None::<String>))
    .execute(conn)?)
}
