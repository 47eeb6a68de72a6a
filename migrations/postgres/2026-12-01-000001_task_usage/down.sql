ALTER TABLE tasks DROP COLUMN memory_peak_bytes;
ALTER TABLE tasks DROP COLUMN cpu_usec;
