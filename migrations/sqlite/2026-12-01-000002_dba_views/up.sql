-- Two views for DBAs (see the PostgreSQL migration of the same name).
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

CREATE VIEW task_times AS
SELECT t.id, t.name, t.source, t.agent, t.status, s.name AS status_name,
       t.created_at, t.started_at, t.ended_at,
       (julianday(COALESCE(t.started_at, t.ended_at, strftime('%Y-%m-%d %H:%M:%f', 'now'))) - julianday(t.created_at)) * 86400.0 AS wait_secs,
       (julianday(COALESCE(t.ended_at, strftime('%Y-%m-%d %H:%M:%f', 'now'))) - julianday(t.started_at)) * 86400.0 AS run_secs
FROM tasks t JOIN task_statuses s ON s.code = t.status;
