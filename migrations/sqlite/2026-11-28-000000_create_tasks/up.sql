-- downlink's task tables (SQLite). Same shape as migrations/postgres; comments live there
-- (SQLite has no COMMENT ON). Times are UTC.

CREATE TABLE task_statuses (
    code        INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL
);
INSERT INTO task_statuses (code, name, description) VALUES
    (1, 'pending',     'accepted and stored; waiting for forks budget'),
    (2, 'running',     'ansible-playbook process started'),
    (3, 'failed',      'finished; at least one host failed or was unreachable, or ansible itself failed (err says why)'),
    (4, 'success',     'finished; every host ok'),
    (5, 'stopped',     'stopped through /api/stop'),
    (6, 'timeout',     'ran past its time limit and was killed'),
    (7, 'interrupted', 'the server stopped or crashed while the task ran');

CREATE TABLE tasks (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    name           TEXT NOT NULL UNIQUE,
    nodes          TEXT NOT NULL,
    remote_user    TEXT NOT NULL,
    content        TEXT NOT NULL,
    params         TEXT NOT NULL,
    fork_num       INTEGER NOT NULL,
    forks          INTEGER NOT NULL,
    status         INTEGER NOT NULL DEFAULT 1 REFERENCES task_statuses (code),
    err            TEXT,
    correlation_id TEXT NOT NULL,
    source         TEXT NOT NULL,
    created_at     TIMESTAMP NOT NULL,
    started_at     TIMESTAMP,
    ended_at       TIMESTAMP,
    updated_at     TIMESTAMP NOT NULL,
    exit_code      INTEGER,
    pid            INTEGER,
    pid_start_time BIGINT,
    events_offset  BIGINT NOT NULL DEFAULT 0,
    instance       TEXT
);
CREATE INDEX tasks_status_idx ON tasks (status) WHERE status IN (1, 2);

CREATE TABLE task_hosts (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id        BIGINT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    host           TEXT NOT NULL,
    result         TEXT CHECK (result IN ('ok', 'failed', 'unreachable', 'skipped', 'stopped', 'timeout', 'interrupted')),
    ok             INTEGER NOT NULL DEFAULT 0,
    changed        INTEGER NOT NULL DEFAULT 0,
    failed         INTEGER NOT NULL DEFAULT 0,
    unreachable    INTEGER NOT NULL DEFAULT 0,
    skipped        INTEGER NOT NULL DEFAULT 0,
    rescued        INTEGER NOT NULL DEFAULT 0,
    ignored        INTEGER NOT NULL DEFAULT 0,
    msg            TEXT,
    correlation_id TEXT NOT NULL,
    source         TEXT NOT NULL,
    created_at     TIMESTAMP NOT NULL,
    ended_at       TIMESTAMP,
    UNIQUE (task_id, host)
);
CREATE INDEX task_hosts_getlog_idx ON task_hosts (host, source, created_at);

CREATE TABLE task_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    BIGINT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    host       TEXT,
    kind       TEXT NOT NULL,
    task_name  TEXT,
    payload    TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    UNIQUE (task_id, seq)
);

-- Status only moves forward: 1 -> 2 -> {3,4,5,6,7}, and 1 -> {3,5,6,7}.
CREATE TRIGGER tasks_status_forward BEFORE UPDATE OF status ON tasks
    FOR EACH ROW
    WHEN NEW.status <> OLD.status
     AND NOT ((OLD.status = 1 AND NEW.status IN (2, 3, 5, 6, 7))
           OR (OLD.status = 2 AND NEW.status IN (3, 4, 5, 6, 7)))
BEGIN
    SELECT RAISE(ABORT, 'task status may not move backwards');
END;
