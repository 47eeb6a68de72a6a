ALTER TABLE tasks DROP COLUMN stop_requested_at;
