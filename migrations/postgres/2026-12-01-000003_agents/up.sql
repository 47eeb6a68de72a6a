-- Every agent that serves this database: who it is and when it last gave a sign of life, on the
-- database's clock.
CREATE TABLE agents (
    name         TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    boot_id      TEXT NOT NULL,
    version      TEXT NOT NULL,
    started_at   TIMESTAMP NOT NULL,
    heartbeat_at TIMESTAMP NOT NULL,
    max_forks    INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('active', 'draining', 'lost'))
);
COMMENT ON TABLE agents IS 'One row per agent_name that has served this database.';
COMMENT ON COLUMN agents.name IS 'The agent_name setting (tasks.agent).';
COMMENT ON COLUMN agents.host IS 'The host name of the machine it runs on.';
COMMENT ON COLUMN agents.pid IS 'The process id of its server.';
COMMENT ON COLUMN agents.boot_id IS 'The kernel boot id of that machine (/proc/sys/kernel/random/boot_id): with pid, names one process across reboots.';
COMMENT ON COLUMN agents.version IS 'The downlink version it runs.';
COMMENT ON COLUMN agents.started_at IS 'When its server started, UTC, on the database clock.';
COMMENT ON COLUMN agents.heartbeat_at IS 'Its last heartbeat (every heartbeat_secs), UTC, on the database clock.';
COMMENT ON COLUMN agents.max_forks IS 'Its own forks budget.';
COMMENT ON COLUMN agents.state IS 'active while it serves, draining once it shuts down; an agent whose heartbeat is older than 3 heartbeats is shown as lost by downlink agents.';
