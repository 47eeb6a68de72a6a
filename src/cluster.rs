//! Many agents as one: the `agents` table (who is alive, heartbeats) and the queue every agent on
//! one PostgreSQL claims tasks from (`shared_queue`). Plain functions over a connection; the
//! supervisor decides when to call them.

pub mod agents;
pub mod claim;
