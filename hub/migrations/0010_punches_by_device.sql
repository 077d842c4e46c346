-- The buddy-punch check looks, for each committed punch, at the punches on its device a
-- few seconds either side (workers/checks.py, NEIGHBOURS_SQL). Without this index that read
-- every punch of the tenant in the window and kept the device's (benchmarks/RESULTS.md,
-- "Capacity under an independent load tool").
-- Built inside the migration's transaction, so punches wait while it builds: seconds for a
-- few million rows. On a larger table build it beforehand, without blocking, and this then
-- finds it (docs/operations.md, Migrations):
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS punches_by_device
--       ON punches (tenant, device, at) WHERE device IS NOT NULL;
CREATE INDEX IF NOT EXISTS punches_by_device ON punches (tenant, device, at)
    WHERE device IS NOT NULL;
