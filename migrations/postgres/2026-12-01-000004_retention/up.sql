-- Retention (retention_days): when an ended task lost its events and run directory.
ALTER TABLE tasks ADD COLUMN purged_at TIMESTAMP;
COMMENT ON COLUMN tasks.purged_at IS 'When retention removed this ended task''s events and run directory (UTC); NULL while they are kept.';
-- What a retention pass looks for: ended tasks not purged yet, oldest end first.
CREATE INDEX tasks_unpurged_idx ON tasks (ended_at) WHERE purged_at IS NULL;

-- task_events, partitioned by month of created_at (task_events_YYYY_MM, and task_events_default
-- for anything outside them), so that retention drops a whole month at once instead of deleting
-- its rows. A partitioned table's unique keys must hold the partition key: the primary key becomes
-- (id, created_at) and (task_id, seq) an ordinary index (downlink's writer is what keeps seq
-- unique per task). Existing events are copied over, once.
ALTER TABLE task_events RENAME TO task_events_unpartitioned;
ALTER TABLE task_events_unpartitioned RENAME CONSTRAINT task_events_pkey TO task_events_unpartitioned_pkey;
ALTER TABLE task_events_unpartitioned RENAME CONSTRAINT task_events_task_id_seq_key TO task_events_unpartitioned_task_id_seq_key;
ALTER TABLE task_events_unpartitioned RENAME CONSTRAINT task_events_task_id_fkey TO task_events_unpartitioned_task_id_fkey;
ALTER SEQUENCE task_events_id_seq OWNED BY NONE;
CREATE TABLE task_events (
    id         BIGINT NOT NULL DEFAULT nextval('task_events_id_seq'),
    task_id    BIGINT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    host       TEXT,
    kind       TEXT NOT NULL,
    task_name  TEXT,
    payload    TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
ALTER SEQUENCE task_events_id_seq OWNED BY task_events.id;
CREATE INDEX task_events_task_seq_idx ON task_events (task_id, seq);
CREATE TABLE task_events_default PARTITION OF task_events DEFAULT;
-- A partition for every month the existing events fall in, this month and the next (downlink
-- creates the coming ones as months pass).
DO $$
DECLARE
    m date;
BEGIN
    FOR m IN
        SELECT DISTINCT date_trunc('month', created_at)::date FROM task_events_unpartitioned
        UNION SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date
        UNION SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month')::date
    LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF task_events FOR VALUES FROM (%L) TO (%L)',
                       'task_events_' || to_char(m, 'YYYY_MM'), m, (m + interval '1 month')::date);
    END LOOP;
END
$$;
INSERT INTO task_events SELECT * FROM task_events_unpartitioned;
DROP TABLE task_events_unpartitioned;

COMMENT ON TABLE task_events IS 'The event stream of each task as ansible reported it (callback plugin): the detail behind task_hosts. Partitioned by month of created_at (task_events_YYYY_MM; task_events_default holds anything outside them); retention drops a month''s partition once every task with events in it has ended before the retention cutoff.';
COMMENT ON COLUMN task_events.id IS 'Row id.';
COMMENT ON COLUMN task_events.task_id IS 'The task, references tasks.id.';
COMMENT ON COLUMN task_events.seq IS 'Order of the event within its task, from 1.';
COMMENT ON COLUMN task_events.host IS 'Host the event is about; NULL for playbook, play, task and stats events.';
COMMENT ON COLUMN task_events.kind IS 'playbook_start, play_start, task_start, runner_ok, runner_failed, runner_unreachable, runner_skipped, stats, ...';
COMMENT ON COLUMN task_events.task_name IS 'Name of the ansible task the event belongs to.';
COMMENT ON COLUMN task_events.payload IS 'The event as JSON, cut to a bounded size (a cut payload ends with a truncation marker).';
COMMENT ON COLUMN task_events.created_at IS 'When ansible emitted the event (UTC); the partition key.';
