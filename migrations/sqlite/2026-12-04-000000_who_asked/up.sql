-- Who asked for a task and for its stop, and through what (see the PostgreSQL migration's comments).
ALTER TABLE tasks ADD COLUMN requested_by TEXT;
ALTER TABLE tasks ADD COLUMN requested_via TEXT;
ALTER TABLE tasks ADD COLUMN stop_requested_by TEXT;
ALTER TABLE tasks ADD COLUMN stop_requested_via TEXT;
