-- The task's mark on its nodes (DOWNLINK_TASK=<mark>), so that any agent can clean them.
ALTER TABLE tasks ADD COLUMN remote_mark TEXT;
COMMENT ON COLUMN tasks.remote_mark IS 'The mark every process the task started on its nodes carries (environment DOWNLINK_TASK=<mark>): an agent that ends the task of a lost agent ends those processes first. NULL: the task never started.';
