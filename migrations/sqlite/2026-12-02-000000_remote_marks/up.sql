-- The task's mark on its nodes (DOWNLINK_TASK=<mark>), so that any agent can clean them.
ALTER TABLE tasks ADD COLUMN remote_mark TEXT;
