-- Who asked for a task and for its stop, and through what.
ALTER TABLE tasks ADD COLUMN requested_by TEXT;
ALTER TABLE tasks ADD COLUMN requested_via TEXT;
ALTER TABLE tasks ADD COLUMN stop_requested_by TEXT;
ALTER TABLE tasks ADD COLUMN stop_requested_via TEXT;
COMMENT ON COLUMN tasks.requested_by IS 'The name of the token that ran the task (auth_tokens; a token of auth_token_hashes is named token-<first 8 hex digits of its hash>), or local when the server asks for none. NULL: stored before this column existed.';
COMMENT ON COLUMN tasks.requested_via IS 'Through what the task was run: api, console or cli.';
COMMENT ON COLUMN tasks.stop_requested_by IS 'Who first asked to stop the task (as requested_by), while it was pending or running; NULL: nobody did.';
COMMENT ON COLUMN tasks.stop_requested_via IS 'Through what that stop came: api, console or cli.';
