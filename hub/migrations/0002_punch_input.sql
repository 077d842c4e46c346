-- The row type the punch batcher sends: one array of these per batch. A composite array
-- is encoded by the driver field by field in C, where a dozen parallel arrays cost a
-- Python-level type check per element; the field order matches workers/persist.py.
CREATE TYPE punch_input AS (
    tenant        text,
    id            uuid,
    kind          text,
    at            timestamptz,
    received_at   timestamptz,
    source        text,
    employee      text,
    badge         text,
    site          text,
    device        text,
    method        text,
    seq           bigint,
    lat           double precision,
    lon           double precision,
    accuracy_m    double precision,
    offline       boolean,
    only_employee text,
    reason        text,
    actor         text
);

-- Punches carry no foreign keys. Each one would run a check per inserted row that takes a
-- share lock on the tenant's and the employee's row; with several batches committing at
-- once, every punch of a tenant locks the same tenant row, which PostgreSQL resolves with a
-- multixact per row. The batch statement resolves the employee from `employees` in the
-- same statement that inserts the punch, and employees are never deleted (erasure
-- pseudonymises them), so the references hold without the checks.
ALTER TABLE punches DROP CONSTRAINT punches_tenant_fkey;
ALTER TABLE punches DROP CONSTRAINT punches_tenant_employee_fkey;
