-- The agent identity (setting agent_name): which downlink agent accepted and runs each task.
-- Rows from before this change have NULL and belong to whichever agent starts on their database.
ALTER TABLE tasks ADD COLUMN agent TEXT;
COMMENT ON COLUMN tasks.agent IS 'Name of the downlink agent (setting agent_name, default the host name) that accepted and runs the task; its run directory is <run_dir>/<agent>/<id>. NULL for tasks stored before agents had names.';
COMMENT ON COLUMN tasks.instance IS 'Absolute run-directory root (<run_dir>/<agent>) the task ran under; a restarted agent looks for the task''s files there first.';
COMMENT ON COLUMN tasks.forks IS 'Forks charged to the budget and passed as --forks: min(fork_num, nodes, max_forks) when stored, lowered to the max_forks in force when it started.';
