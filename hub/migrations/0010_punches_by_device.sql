-- The buddy-punch check looks, for each committed punch, at the punches on its device a
-- few seconds either side. Without this index that was a range scan of every punch of the
-- tenant in the window, filtered by device: at 500 punches a second, most of a core of
-- PostgreSQL (benchmarks/RESULTS.md, "Capacity under an independent load tool").
CREATE INDEX punches_by_device ON punches (tenant, device, at) WHERE device IS NOT NULL;
