-- Every agent that serves this database (see the PostgreSQL migration of the same name).
CREATE TABLE agents (
    name         TEXT PRIMARY KEY NOT NULL,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    boot_id      TEXT NOT NULL,
    version      TEXT NOT NULL,
    started_at   TIMESTAMP NOT NULL,
    heartbeat_at TIMESTAMP NOT NULL,
    max_forks    INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('active', 'draining', 'lost'))
);
