-- The overtime scan looks every minute for planned shifts that have not ended
-- (workers/scan.py LATE_SQL): by end, across tenants.
CREATE INDEX schedules_by_end ON schedules (ends_at);
