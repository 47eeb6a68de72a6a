-- downlink's task tables. Times are UTC (TIMESTAMP without time zone, always written in UTC).

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
    id             BIGSERIAL PRIMARY KEY,
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
-- Unfinished tasks are found by status at start (pending queue, running tasks to re-check).
CREATE INDEX tasks_status_idx ON tasks (status) WHERE status IN (1, 2);

CREATE TABLE task_hosts (
    id             BIGSERIAL PRIMARY KEY,
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
-- /api/getlog: the newest records of one host for one source.
CREATE INDEX task_hosts_getlog_idx ON task_hosts (host, source, created_at);

CREATE TABLE task_events (
    id         BIGSERIAL PRIMARY KEY,
    task_id    BIGINT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    host       TEXT,
    kind       TEXT NOT NULL,
    task_name  TEXT,
    payload    TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    UNIQUE (task_id, seq)
);

-- Status only moves forward: 1 -> 2 -> {3,4,5,6,7}, and 1 -> {3,5,6,7}. Enforced here as well as in
-- downlink's UPDATE ... WHERE status IN (...), so a manual UPDATE cannot move a task backwards.
CREATE FUNCTION tasks_status_forward() RETURNS trigger AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status
       AND NOT (OLD.status = 1 AND NEW.status IN (2, 3, 5, 6, 7)
             OR OLD.status = 2 AND NEW.status IN (3, 4, 5, 6, 7)) THEN
        RAISE EXCEPTION 'task % status may not move from % to %', OLD.id, OLD.status, NEW.status;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER tasks_status_forward BEFORE UPDATE OF status ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_status_forward();

COMMENT ON TABLE task_statuses IS 'The task status codes of the API (status in /api/check); join tasks.status to read names.';
COMMENT ON COLUMN task_statuses.code IS 'Status code as the API reports it (1..7).';
COMMENT ON COLUMN task_statuses.name IS 'Short name: pending, running, failed, success, stopped, timeout, interrupted.';
COMMENT ON COLUMN task_statuses.description IS 'What the status means.';

COMMENT ON TABLE tasks IS 'One row per task accepted by /api/run or /api/parallel_run. Status only moves forward (trigger tasks_status_forward).';
COMMENT ON COLUMN tasks.id IS 'Task id returned to the caller.';
COMMENT ON COLUMN tasks.name IS 'Caller-chosen task name, unique among all tasks ever stored.';
COMMENT ON COLUMN tasks.nodes IS 'JSON array of the node addresses (IP or host name), duplicates dropped, request order kept.';
COMMENT ON COLUMN tasks.remote_user IS 'Remote SSH user (request field user).';
COMMENT ON COLUMN tasks.content IS 'Playbook or task list YAML exactly as sent (request field tasks or content).';
COMMENT ON COLUMN tasks.params IS 'Ansible extra vars as a JSON object (request field params, normalised).';
COMMENT ON COLUMN tasks.fork_num IS 'fork_num as requested.';
COMMENT ON COLUMN tasks.forks IS 'Forks actually used and charged to the global budget: min(fork_num, nodes, max_forks).';
COMMENT ON COLUMN tasks.status IS 'Current status, references task_statuses.code.';
COMMENT ON COLUMN tasks.err IS 'Why the task failed, timed out, was stopped or interrupted; NULL otherwise.';
COMMENT ON COLUMN tasks.correlation_id IS 'X-CORRELATION-ID of the request that created the task (global_id in getlog lines).';
COMMENT ON COLUMN tasks.source IS 'X-RESOURCE of the request that created the task (the calling system).';
COMMENT ON COLUMN tasks.created_at IS 'When the task row was committed (UTC).';
COMMENT ON COLUMN tasks.started_at IS 'When ansible-playbook was started (UTC); NULL while pending.';
COMMENT ON COLUMN tasks.ended_at IS 'When the task reached its final status (UTC).';
COMMENT ON COLUMN tasks.updated_at IS 'Last change of this row (UTC); update_time in /api/check.';
COMMENT ON COLUMN tasks.exit_code IS 'Exit code of ansible-playbook; NULL if it has not ended or was killed by a signal.';
COMMENT ON COLUMN tasks.pid IS 'Process id (= process group and session id) of ansible-playbook while it runs.';
COMMENT ON COLUMN tasks.pid_start_time IS 'Start time of that process in clock ticks since boot (/proc/PID/stat field 22), so a reused pid is not mistaken for it.';
COMMENT ON COLUMN tasks.events_offset IS 'Bytes of the run directory''s events.jsonl already recorded in task_events.';
COMMENT ON COLUMN tasks.instance IS 'Run directory root of the downlink instance that ran the task.';

COMMENT ON TABLE task_hosts IS 'One row per (task, node): the per-host result. /api/check log and /api/getlog lines come from here.';
COMMENT ON COLUMN task_hosts.id IS 'Row id.';
COMMENT ON COLUMN task_hosts.task_id IS 'The task, references tasks.id.';
COMMENT ON COLUMN task_hosts.host IS 'Node address exactly as in the request.';
COMMENT ON COLUMN task_hosts.result IS 'ok, failed, unreachable, skipped (no task ran on it), stopped, timeout or interrupted; NULL while the task runs.';
COMMENT ON COLUMN task_hosts.ok IS 'Ansible counter ok (includes changed), as in PLAY RECAP.';
COMMENT ON COLUMN task_hosts.changed IS 'Ansible counter changed.';
COMMENT ON COLUMN task_hosts.failed IS 'Ansible counter failed.';
COMMENT ON COLUMN task_hosts.unreachable IS 'Ansible counter unreachable.';
COMMENT ON COLUMN task_hosts.skipped IS 'Ansible counter skipped.';
COMMENT ON COLUMN task_hosts.rescued IS 'Ansible counter rescued.';
COMMENT ON COLUMN task_hosts.ignored IS 'Ansible counter ignored.';
COMMENT ON COLUMN task_hosts.msg IS 'First failure or unreachable message for this host; NULL if none.';
COMMENT ON COLUMN task_hosts.correlation_id IS 'Copy of tasks.correlation_id, so /api/getlog needs no join.';
COMMENT ON COLUMN task_hosts.source IS 'Copy of tasks.source, so /api/getlog is one indexed lookup on (host, source, created_at).';
COMMENT ON COLUMN task_hosts.created_at IS 'When the first event of this host arrived, else the task start (UTC).';
COMMENT ON COLUMN task_hosts.ended_at IS 'When the last event of this host arrived, else the task end (UTC); NULL while running.';

COMMENT ON TABLE task_events IS 'The event stream of each task as ansible reported it (callback plugin): the detail behind task_hosts.';
COMMENT ON COLUMN task_events.id IS 'Row id.';
COMMENT ON COLUMN task_events.task_id IS 'The task, references tasks.id.';
COMMENT ON COLUMN task_events.seq IS 'Order of the event within its task, from 1.';
COMMENT ON COLUMN task_events.host IS 'Host the event is about; NULL for playbook, play, task and stats events.';
COMMENT ON COLUMN task_events.kind IS 'playbook_start, play_start, task_start, runner_ok, runner_failed, runner_unreachable, runner_skipped, stats, ...';
COMMENT ON COLUMN task_events.task_name IS 'Name of the ansible task the event belongs to.';
COMMENT ON COLUMN task_events.payload IS 'The event as JSON, cut to a bounded size (a cut payload ends with a truncation marker).';
COMMENT ON COLUMN task_events.created_at IS 'When ansible emitted the event (UTC).';
