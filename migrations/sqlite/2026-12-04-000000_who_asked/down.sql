ALTER TABLE tasks DROP COLUMN stop_requested_via;
ALTER TABLE tasks DROP COLUMN stop_requested_by;
ALTER TABLE tasks DROP COLUMN requested_via;
ALTER TABLE tasks DROP COLUMN requested_by;
