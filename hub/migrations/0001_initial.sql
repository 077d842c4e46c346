-- The spine: tenants, their sites, employees and devices, the punches, and an audit log.
-- Every tenant-owned row carries `tenant` first in its key, so each lookup is tenant-scoped
-- by construction.

CREATE TABLE tenants (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9._-]{1,64}$'),
    name        text NOT NULL,
    timezone    text NOT NULL DEFAULT 'UTC',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sites (
    tenant      text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          text NOT NULL CHECK (id ~ '^[A-Za-z0-9._-]{1,64}$'),
    name        text NOT NULL,
    timezone    text NOT NULL,
    lat         double precision CHECK (lat BETWEEN -90 AND 90),
    lon         double precision CHECK (lon BETWEEN -180 AND 180),
    radius_m    double precision CHECK (radius_m > 0),
    policy      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id)
);

CREATE TABLE employees (
    tenant      text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          text NOT NULL CHECK (id ~ '^[A-Za-z0-9._-]{1,64}$'),
    name        text NOT NULL,
    site        text NOT NULL,
    badge       text,
    erased_at   timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id),
    FOREIGN KEY (tenant, site) REFERENCES sites (tenant, id)
);
CREATE UNIQUE INDEX employees_badge ON employees (tenant, badge) WHERE badge IS NOT NULL;

CREATE TABLE devices (
    tenant      text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          text NOT NULL CHECK (id ~ '^[A-Za-z0-9._-]{1,64}$'),
    site        text NOT NULL,
    name        text NOT NULL,
    adms_sn     text UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id),
    FOREIGN KEY (tenant, site) REFERENCES sites (tenant, id)
);

-- Punches are not partitioned. The idempotency key is (tenant, id) across all time, and
-- PostgreSQL only enforces a unique key on a partitioned table when the key contains the
-- partition column; partitioning by month of `at` would let a resent id with another `at`
-- land twice, which is exactly the id_conflict we must detect. At 10,000 employees punching
-- four times a day, seven years of retention is about 100 million narrow rows: one table
-- with a B-tree per access path handles that, and retention deletes in batches by `at`.
CREATE TABLE punches (
    tenant       text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id           uuid NOT NULL,
    employee     text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('in', 'out', 'break_start', 'break_end')),
    at           timestamptz NOT NULL,
    received_at  timestamptz NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    site         text NOT NULL,
    device       text,
    method       text CHECK (method IN ('badge', 'pin', 'face', 'fingerprint', 'mobile', 'manual')),
    lat          double precision,
    lon          double precision,
    accuracy_m   double precision,
    offline      boolean NOT NULL DEFAULT false,
    seq          bigint,
    source       text NOT NULL CHECK (source IN ('terminal', 'mobile', 'api', 'adms', 'manual')),
    flags        text[] NOT NULL DEFAULT '{}',
    reason       text,
    actor        text,
    PRIMARY KEY (tenant, id),
    FOREIGN KEY (tenant, employee) REFERENCES employees (tenant, id)
);
CREATE INDEX punches_by_at ON punches (tenant, at, id);
CREATE INDEX punches_by_employee ON punches (tenant, employee, at);
CREATE INDEX punches_by_site ON punches (tenant, site, at);

CREATE TABLE audit_log (
    tenant      text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    role        text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL,
    ip          text,
    user_agent  text,
    before      jsonb,
    after       jsonb,
    PRIMARY KEY (tenant, seq)
);
