-- What a task's cgroup measured: a DBA's first question about a slow task.
ALTER TABLE tasks ADD COLUMN cpu_usec BIGINT;
ALTER TABLE tasks ADD COLUMN memory_peak_bytes BIGINT;
COMMENT ON COLUMN tasks.cpu_usec IS 'CPU time (user + system) of every local process of the task, in microseconds, from its cgroup (cpu.stat usage_usec); NULL if it ran without a cgroup or has not ended.';
COMMENT ON COLUMN tasks.memory_peak_bytes IS 'Highest memory use of the task''s local processes together, in bytes, from its cgroup (memory.peak, or memory.max_usage_in_bytes of a v1 memory cgroup on a hybrid host); NULL where no memory controller was available.';
