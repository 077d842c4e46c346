-- Planned shifts: they decide who is late. PUT /v1/schedules/{employee} replaces an
-- employee's shifts as a whole.
CREATE TABLE schedules (
    tenant     text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    employee   text NOT NULL,
    starts_at  timestamptz NOT NULL,
    ends_at    timestamptz NOT NULL,
    site       text NOT NULL,
    PRIMARY KEY (tenant, employee, starts_at),
    CHECK (ends_at > starts_at),
    FOREIGN KEY (tenant, employee) REFERENCES employees (tenant, id),
    FOREIGN KEY (tenant, site) REFERENCES sites (tenant, id)
);
CREATE INDEX schedules_by_site ON schedules (tenant, site, starts_at);

GRANT SELECT, INSERT, UPDATE, DELETE ON schedules TO attendance_app;
ALTER TABLE schedules ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON schedules TO attendance_app
    USING (attendance_may(tenant)) WITH CHECK (attendance_may(tenant));
