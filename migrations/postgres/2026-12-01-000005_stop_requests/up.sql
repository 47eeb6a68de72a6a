-- A stop asked through an agent that does not run the task (shared_queue): the owner applies it.
ALTER TABLE tasks ADD COLUMN stop_requested_at TIMESTAMP;
COMMENT ON COLUMN tasks.stop_requested_at IS 'When /api/stop was asked for this task through an agent that does not run it (UTC): the agent that runs it stops it (on NOTIFY downlink_stop, else at its next heartbeat, or when it starts again). NULL: never asked that way.';
