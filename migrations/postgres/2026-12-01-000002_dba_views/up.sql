-- Two views for DBAs: the last recorded result of every host for each source, and every task with
-- how long it waited in the queue and how long it ran.
CREATE VIEW host_last_results AS
SELECT host, source, task_id, result, ok, changed, failed, unreachable, skipped, rescued, ignored,
       msg, created_at, ended_at
FROM (
    SELECT h.*, ROW_NUMBER() OVER (PARTITION BY h.host, h.source
                                   ORDER BY h.created_at DESC, h.id DESC) AS newest
    FROM task_hosts h
    WHERE h.result IS NOT NULL
) ranked
WHERE newest = 1;
COMMENT ON VIEW host_last_results IS 'The newest ended result of each (host, source): one row per pair, from task_hosts.';

CREATE VIEW task_times AS
SELECT t.id, t.name, t.source, t.agent, t.status, s.name AS status_name,
       t.created_at, t.started_at, t.ended_at,
       EXTRACT(EPOCH FROM (COALESCE(t.started_at, t.ended_at, now() AT TIME ZONE 'UTC') - t.created_at))::double precision AS wait_secs,
       EXTRACT(EPOCH FROM (COALESCE(t.ended_at, now() AT TIME ZONE 'UTC') - t.started_at))::double precision AS run_secs
FROM tasks t JOIN task_statuses s ON s.code = t.status;
COMMENT ON VIEW task_times IS 'Every task with wait_secs (created to started; to its end if it never started; to now while pending) and run_secs (started to ended, to now while running; NULL if it never started). Times are UTC.';
