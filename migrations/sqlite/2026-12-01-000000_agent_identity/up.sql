-- The agent identity (setting agent_name): which downlink agent accepted and runs each task.
-- Rows from before this change have NULL and belong to whichever agent starts on their database.
ALTER TABLE tasks ADD COLUMN agent TEXT;
