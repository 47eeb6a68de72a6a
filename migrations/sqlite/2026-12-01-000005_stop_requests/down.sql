ALTER TABLE tasks DROP COLUMN stop_reason;
ALTER TABLE tasks DROP COLUMN stop_requested_at;
