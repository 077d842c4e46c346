-- The overtime scan reads, each minute, the punches committed since its last look
-- (workers/scan.py, NEW_SQL) instead of every active employee's week.
-- Built inside the migration's transaction, so punches wait while it builds: seconds for a
-- few million rows. On a larger table build it beforehand, without blocking, and this then
-- finds it (docs/operations.md, Migrations):
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS punches_by_commit ON punches (committed_at);
CREATE INDEX IF NOT EXISTS punches_by_commit ON punches (committed_at);
