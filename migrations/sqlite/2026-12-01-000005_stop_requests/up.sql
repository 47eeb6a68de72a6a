-- A stop asked through an agent that does not run the task (shared_queue): the owner applies it.
ALTER TABLE tasks ADD COLUMN stop_requested_at TIMESTAMP;
ALTER TABLE tasks ADD COLUMN stop_reason TEXT;
