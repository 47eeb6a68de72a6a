ALTER TABLE task_events RENAME TO task_events_partitioned;
ALTER TABLE task_events_partitioned RENAME CONSTRAINT task_events_pkey TO task_events_partitioned_pkey;
ALTER TABLE task_events_partitioned RENAME CONSTRAINT task_events_task_id_fkey TO task_events_partitioned_task_id_fkey;
ALTER INDEX task_events_task_seq_idx RENAME TO task_events_partitioned_task_seq_idx;
ALTER SEQUENCE task_events_id_seq OWNED BY NONE;
-- Constraint names given: the partitions still hold constraints of the default names.
CREATE TABLE task_events (
    id         BIGINT NOT NULL DEFAULT nextval('task_events_id_seq'),
    task_id    BIGINT NOT NULL,
    seq        INTEGER NOT NULL,
    host       TEXT,
    kind       TEXT NOT NULL,
    task_name  TEXT,
    payload    TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    CONSTRAINT task_events_pkey PRIMARY KEY (id),
    CONSTRAINT task_events_task_id_seq_key UNIQUE (task_id, seq),
    CONSTRAINT task_events_task_id_fkey FOREIGN KEY (task_id) REFERENCES tasks (id) ON DELETE CASCADE
);
ALTER SEQUENCE task_events_id_seq OWNED BY task_events.id;
INSERT INTO task_events SELECT * FROM task_events_partitioned;
DROP TABLE task_events_partitioned;
DROP INDEX tasks_unpurged_idx;
ALTER TABLE tasks DROP COLUMN purged_at;
