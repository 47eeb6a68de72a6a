-- A stop asked through an agent that does not run the task (shared_queue): the owner applies it.
ALTER TABLE tasks ADD COLUMN stop_requested_at TIMESTAMP;
ALTER TABLE tasks ADD COLUMN stop_reason TEXT;
COMMENT ON COLUMN tasks.stop_requested_at IS 'When /api/stop was asked for this task through an agent that does not run it (UTC): the agent that runs it stops it (on NOTIFY downlink_stop, else at its next heartbeat, or when it starts again). NULL: never asked that way.';
COMMENT ON COLUMN tasks.stop_reason IS 'Why that stop was asked: stop (/api/stop, ends 5) or timeout (a parallel_run deadline, ends 6).';
