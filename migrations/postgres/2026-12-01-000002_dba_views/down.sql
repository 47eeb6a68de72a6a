DROP VIEW task_times;
DROP VIEW host_last_results;
