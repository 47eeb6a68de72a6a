DROP TABLE task_events;
DROP TABLE task_hosts;
DROP TABLE tasks;
DROP FUNCTION tasks_status_forward();
DROP TABLE task_statuses;
