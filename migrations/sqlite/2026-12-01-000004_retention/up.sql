-- Retention (retention_days): when an ended task lost its events and run directory.
ALTER TABLE tasks ADD COLUMN purged_at TIMESTAMP;
-- What a retention pass looks for: ended tasks not purged yet, oldest end first.
CREATE INDEX tasks_unpurged_idx ON tasks (ended_at) WHERE purged_at IS NULL;
