ALTER TABLE tasks DROP COLUMN remote_mark;
