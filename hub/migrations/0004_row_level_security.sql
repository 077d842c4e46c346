-- Row-level security: the hub's pool runs as `attendance_app`, which is not a superuser,
-- owns no table and so cannot bypass the policies below. Each transaction names the
-- tenants it works for in the setting `attendance.tenants` (comma-separated; tenant slugs
-- cannot contain commas); without it the application role sees and writes no tenant rows.
-- A REST request names its one tenant; a punch batch names the tenants in that batch.
-- Migrations, `tenant create` and `audit verify` run as the connecting (owner) role.

DO $$
BEGIN
    CREATE ROLE attendance_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
EXCEPTION
    -- Roles belong to the whole cluster: another database's migration may have made it,
    -- perhaps at this very moment.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

DO $$
BEGIN
    -- A superuser may SET ROLE to any role; anyone else needs membership.
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT attendance_app TO %I', current_user);
    END IF;
END
$$;

-- attendance_may() tests membership with array_position() rather than `tenant = ANY (...)`. An
-- `= ANY` over an array that is not a constant is costed as ten index probes, which made
-- the planner pick a sequential scan of `employees` per punch in the batch statement
-- whenever the table was small; array_position() is a plain filter, and the index serves
-- the query's own `tenant = ...` condition.
CREATE FUNCTION attendance_tenants() RETURNS text[]
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT string_to_array(nullif(current_setting('attendance.tenants', true), ''), ',') $$;

-- Whether this transaction may see and write the tenant's rows. Inlined by the planner.
CREATE FUNCTION attendance_may(tenant text) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT array_position(attendance_tenants(), tenant) IS NOT NULL $$;

GRANT USAGE ON SCHEMA public TO attendance_app;
GRANT USAGE ON TYPE punch_input TO attendance_app;
GRANT EXECUTE ON FUNCTION attendance_tenants(), attendance_may(text) TO attendance_app;
GRANT SELECT ON tenants TO attendance_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON sites, employees, devices, punches TO attendance_app;
GRANT SELECT, INSERT ON audit_log TO attendance_app;
-- Erasure redacts personal data in the audit trail; nothing else of a row may change.
GRANT UPDATE (before, after, redacted_at, content_salt) ON audit_log TO attendance_app;
GRANT SELECT, INSERT, UPDATE ON audit_heads TO attendance_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO attendance_app;

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants TO attendance_app
    USING (attendance_may(id));

ALTER TABLE sites ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON sites TO attendance_app
    USING (attendance_may(tenant)) WITH CHECK (attendance_may(tenant));

ALTER TABLE employees ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON employees TO attendance_app
    USING (attendance_may(tenant)) WITH CHECK (attendance_may(tenant));

ALTER TABLE devices ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON devices TO attendance_app
    USING (attendance_may(tenant)) WITH CHECK (attendance_may(tenant));

ALTER TABLE punches ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON punches TO attendance_app
    USING (attendance_may(tenant)) WITH CHECK (attendance_may(tenant));

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_log TO attendance_app
    USING (attendance_may(tenant)) WITH CHECK (attendance_may(tenant));

ALTER TABLE audit_heads ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_heads TO attendance_app
    USING (attendance_may(tenant)) WITH CHECK (attendance_may(tenant));
