DROP INDEX tasks_unpurged_idx;
ALTER TABLE tasks DROP COLUMN purged_at;
