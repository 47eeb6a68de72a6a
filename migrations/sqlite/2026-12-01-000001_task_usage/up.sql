-- What a task's cgroup measured: CPU microseconds and peak memory bytes (NULL when not measured).
ALTER TABLE tasks ADD COLUMN cpu_usec BIGINT;
ALTER TABLE tasks ADD COLUMN memory_peak_bytes BIGINT;
