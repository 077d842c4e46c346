-- Alerts raised by the checks on committed punches (and, later, by the periodic scan):
-- stored, listed by GET /v1/alerts, and pushed on `alerts:<site>` and the employee's `me`.
-- An alert's id is derived from what raised it (kind and punch), so a batch checked twice
-- raises nothing twice.
CREATE TABLE alerts (
    tenant     text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    kind       text NOT NULL,
    severity   text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    employee   text,
    site       text,
    at         timestamptz NOT NULL,
    message    text NOT NULL,
    detail     jsonb NOT NULL DEFAULT '{}',
    punch      uuid,
    raised_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id)
);
CREATE INDEX alerts_by_raised ON alerts (tenant, raised_at, id);
CREATE INDEX alerts_by_site ON alerts (tenant, site, raised_at, id);

GRANT SELECT, INSERT, DELETE ON alerts TO attendance_app;
ALTER TABLE alerts ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON alerts TO attendance_app
    USING (attendance_may(tenant)) WITH CHECK (attendance_may(tenant));

-- The device's clock offset as the hub saw it: received_at - at, for punches made online
-- (not queued offline, not entered by hand). Network time is in it too, a few milliseconds.
ALTER TABLE punches ADD COLUMN clock_offset_ms bigint GENERATED ALWAYS AS (
    CASE WHEN NOT offline AND source <> 'manual'
         THEN (extract(epoch FROM received_at - at) * 1000)::bigint END
) STORED;
