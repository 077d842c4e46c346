"""Data access for the REST API and the CLI (asyncpg).

The punch path has its own batched SQL in workers/persist.py.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final

import asyncpg

from hub import audit
from hub.types import Conn

# The role the hub's pool acts as (migration 0004): no superuser, owns nothing, so the
# row-level security policies apply to everything it reads and writes.
APP_ROLE: Final = "attendance_app"

SITE_COLUMNS: Final = "id, name, timezone, lat, lon, radius_m, policy"
EMPLOYEE_COLUMNS: Final = "id, name, site, badge"
DEVICE_COLUMNS: Final = "id, site, name, adms_sn"


async def init_connection(conn: Conn) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 8) -> asyncpg.Pool:
    """The hub's pool. Its connections act as ``APP_ROLE``, under row-level security.

    The role is set in the startup packet, so it is also the value ``RESET ALL``
    restores when the pool recycles a connection. Run migrations first (as the
    connecting role): they create ``APP_ROLE``.
    """
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        command_timeout=30,
        server_settings={"role": APP_ROLE},
    )
    assert pool is not None
    return pool


async def create_system_pool(dsn: str, *, min_size: int = 1, max_size: int = 2) -> asyncpg.Pool:
    """A pool acting as the DSN's own user, outside row-level security.

    For jobs that work across tenants on nobody's request (device revocations,
    retention); request handling never uses it.
    """
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=init_connection, command_timeout=30
    )
    assert pool is not None
    return pool


@asynccontextmanager
async def tenant_transaction(pool: asyncpg.Pool, tenant: str) -> AsyncIterator[Conn]:
    """A pooled connection in a transaction that can see and write only ``tenant``'s rows."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('attendance.tenants', $1, true)", tenant)
        yield conn


async def act_for_tenants(conn: Conn, tenants: Iterable[str]) -> None:
    """Let this session, until the pool resets it, see and write only these tenants' rows."""
    await conn.execute(
        "SELECT set_config('attendance.tenants', $1, false)", ",".join(sorted(set(tenants)))
    )


async def ensure_tenant(conn: Conn, slug: str, name: str, timezone: str) -> bool:
    """Create the tenant if it is new; return whether it was created."""
    row = await conn.fetchrow(
        """INSERT INTO tenants (id, name, timezone) VALUES ($1, $2, $3)
           ON CONFLICT (id) DO NOTHING RETURNING id""",
        slug,
        name,
        timezone,
    )
    return row is not None


async def tenant_exists(conn: Conn, slug: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tenants WHERE id = $1)", slug))


async def get_row(
    conn: Conn,
    table: str,
    columns: str,
    tenant: str,
    entity: str,
    *,
    lock: bool = False,
) -> dict[str, Any] | None:
    # `table` and `columns` are module constants, never user input.
    row = await conn.fetchrow(
        f"SELECT {columns} FROM {table} WHERE tenant = $1 AND id = $2"
        + (" FOR UPDATE" if lock else ""),
        tenant,
        entity,
    )
    return dict(row) if row is not None else None


async def list_rows(
    conn: Conn, table: str, columns: str, tenant: str, extra: str = ""
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {columns} FROM {table} WHERE tenant = $1 {extra} ORDER BY id", tenant
    )
    return [dict(r) for r in rows]


async def upsert_site(conn: Conn, tenant: str, site: str, body: dict[str, Any]) -> None:
    await conn.execute(
        """INSERT INTO sites (tenant, id, name, timezone, lat, lon, radius_m, policy)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (tenant, id) DO UPDATE SET
             name = EXCLUDED.name, timezone = EXCLUDED.timezone, lat = EXCLUDED.lat,
             lon = EXCLUDED.lon, radius_m = EXCLUDED.radius_m, policy = EXCLUDED.policy,
             updated_at = now()""",
        tenant,
        site,
        body["name"],
        body["timezone"],
        body["lat"],
        body["lon"],
        body["radius_m"],
        body["policy"],
    )


async def upsert_employee(conn: Conn, tenant: str, employee: str, body: dict[str, Any]) -> None:
    await conn.execute(
        """INSERT INTO employees (tenant, id, name, site, badge) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (tenant, id) DO UPDATE SET
             name = EXCLUDED.name, site = EXCLUDED.site, badge = EXCLUDED.badge,
             updated_at = now()""",
        tenant,
        employee,
        body["name"],
        body["site"],
        body["badge"],
    )


async def get_schedule(conn: Conn, tenant: str, employee: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT site, starts_at, ends_at FROM schedules
            WHERE tenant = $1 AND employee = $2 ORDER BY starts_at""",
        tenant,
        employee,
    )
    return [dict(r) for r in rows]


async def replace_schedule(
    conn: Conn, tenant: str, employee: str, shifts: list[tuple[str, datetime, datetime]]
) -> None:
    """The employee's planned shifts become exactly ``shifts`` (site, start, end)."""
    await conn.execute(
        "DELETE FROM schedules WHERE tenant = $1 AND employee = $2", tenant, employee
    )
    await conn.execute(
        """INSERT INTO schedules (tenant, employee, site, starts_at, ends_at)
           SELECT $1, $2, s.site, s.starts_at, s.ends_at
             FROM unnest($3::text[], $4::timestamptz[], $5::timestamptz[])
                  AS s(site, starts_at, ends_at)""",
        tenant,
        employee,
        [shift[0] for shift in shifts],
        [shift[1] for shift in shifts],
        [shift[2] for shift in shifts],
    )


async def upsert_device(conn: Conn, tenant: str, device: str, body: dict[str, Any]) -> None:
    await conn.execute(
        """INSERT INTO devices (tenant, id, site, name, adms_sn) VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (tenant, id) DO UPDATE SET
             site = EXCLUDED.site, name = EXCLUDED.name, adms_sn = EXCLUDED.adms_sn,
             revoked_at = NULL, updated_at = now()""",
        tenant,
        device,
        body["site"],
        body["name"],
        body["adms_sn"],
    )


async def find_employee(
    conn: Conn, tenant: str, employee: str | None, badge: str | None
) -> dict[str, Any] | None:
    """The employee (not erased) with this id, or else with this badge."""
    row = await conn.fetchrow(
        """SELECT id, site FROM employees
            WHERE tenant = $1 AND erased_at IS NULL
              AND ((($2::text IS NOT NULL) AND id = $2) OR ($2::text IS NULL AND badge = $3))""",
        tenant,
        employee,
        badge,
    )
    return dict(row) if row is not None else None


# What erasure removes from an employee's row and from the audit rows about the employee.
ERASED_FIELDS: Final = ("name", "badge")
# What an erased employee's name becomes.
ERASED_NAME: Final = "[erased]"


async def erase_employee(conn: Conn, tenant: str, employee: str) -> None:
    await conn.execute(
        """UPDATE employees SET name = $3, badge = NULL, erased_at = now(),
                  updated_at = now()
            WHERE tenant = $1 AND id = $2 AND erased_at IS NULL""",
        tenant,
        employee,
        ERASED_NAME,
    )
    # Planned shifts are about the person and decide nothing once they are gone.
    await conn.execute(
        "DELETE FROM schedules WHERE tenant = $1 AND employee = $2", tenant, employee
    )


async def count_punches(conn: Conn, tenant: str, employee: str) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM punches WHERE tenant = $1 AND employee = $2", tenant, employee
    )
    return count


async def device_token_version(conn: Conn, tenant: str, device: str) -> int | None:
    version: int | None = await conn.fetchval(
        "SELECT token_version FROM devices WHERE tenant = $1 AND id = $2", tenant, device
    )
    return version


async def revoke_device(conn: Conn, tenant: str, device: str) -> int | None:
    """Retire every token of the device; return its new token version (None: no device)."""
    version: int | None = await conn.fetchval(
        """UPDATE devices SET token_version = token_version + 1, revoked_at = now(),
                  updated_at = now()
            WHERE tenant = $1 AND id = $2
        RETURNING token_version""",
        tenant,
        device,
    )
    return version


async def record_audit(
    conn: Conn,
    *,
    tenant: str,
    actor: str,
    role: str,
    action: str,
    target: str,
    ip: str | None,
    user_agent: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> int:
    """Append one row to the tenant's audit chain and return its seq.

    Locks the tenant's head row until the caller's transaction ends, so that appends of
    one tenant take turns and never fork the chain; without a transaction, it opens one.
    Take the lock last in a transaction, after the rows that the change itself locks.
    """
    async with _transaction(conn):
        head = await conn.fetchrow(
            """INSERT INTO audit_heads AS h (tenant, seq, hash, at, anchor_seq, anchor_hash)
               VALUES ($1, 1, $2, clock_timestamp(), 0, $2)
               ON CONFLICT (tenant) DO UPDATE
                  SET seq = h.seq + 1, at = greatest(h.at, clock_timestamp())
               RETURNING h.seq, h.hash AS prev_hash, h.at""",
            tenant,
            audit.GENESIS,
        )
        assert head is not None
        salt = secrets.token_bytes(16)
        entry = audit.Entry(
            tenant=tenant,
            seq=head["seq"],
            at=head["at"],
            actor=actor,
            role=role,
            action=action,
            target=target,
            ip=ip,
            user_agent=user_agent,
            content_digest=audit.content_digest(salt, before, after),
        )
        entry_hash = entry.hash(head["prev_hash"])
        await conn.execute(
            """WITH appended AS (
                   INSERT INTO audit_log
                          (tenant, seq, at, actor, role, action, target, ip, user_agent,
                           before, after, content_digest, content_salt, prev_hash, hash)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15))
               UPDATE audit_heads SET hash = $15 WHERE tenant = $1""",
            tenant,
            entry.seq,
            entry.at,
            actor,
            role,
            action,
            target,
            ip,
            user_agent,
            before,
            after,
            entry.content_digest,
            salt,
            head["prev_hash"],
            entry_hash,
        )
    return entry.seq


async def redact_audit(conn: Conn, tenant: str, *, target: str, fields: Collection[str]) -> int:
    """Replace ``fields`` in before/after of the tenant's audit rows about ``target``.

    For erasure: ``redact_audit(conn, tenant, target=f"employee:{id}", fields=("name",
    "badge"))``. Each changed row keeps its digest and hash, loses its salt and gets
    ``redacted_at``; `audit verify` then checks everything about it except before/after.
    Returns how many rows changed.
    """
    async with _transaction(conn):
        rows = await conn.fetch(
            """SELECT seq, before, after FROM audit_log
                WHERE tenant = $1 AND target = $2 ORDER BY seq FOR UPDATE""",
            tenant,
            target,
        )
        changes = []
        for row in rows:
            before = audit.redacted(row["before"], fields)
            after = audit.redacted(row["after"], fields)
            if (before, after) != (row["before"], row["after"]):
                changes.append((tenant, row["seq"], before, after))
        await conn.executemany(
            """UPDATE audit_log
                  SET before = $3, after = $4, content_salt = NULL, redacted_at = now()
                WHERE tenant = $1 AND seq = $2""",
            changes,
        )
    return len(changes)


AUDIT_COLUMNS: Final = (
    "seq, at, actor, role, action, target, ip, user_agent, before, after, hash, redacted_at"
)


async def list_audit(
    conn: Conn,
    tenant: str,
    *,
    since: datetime | None,
    action: str | None,
    target: str | None,
    after: int,
    limit: int,
) -> list[asyncpg.Record]:
    """The tenant's audit rows with seq above ``after``, oldest first."""
    return await conn.fetch(
        f"""SELECT {AUDIT_COLUMNS} FROM audit_log
             WHERE tenant = $1
               AND seq > $2
               AND ($3::timestamptz IS NULL OR at >= $3)
               AND ($4::text IS NULL OR action = $4)
               AND ($5::text IS NULL OR target = $5)
             ORDER BY seq
             LIMIT $6""",
        tenant,
        after,
        since,
        action,
        target,
        limit,
    )


async def verify_audit(conn: Conn, tenant: str) -> audit.ChainReport:
    """Recompute the tenant's audit chain from its anchor, in one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        head_row = await conn.fetchrow(
            "SELECT seq, hash, anchor_seq, anchor_hash FROM audit_heads WHERE tenant = $1",
            tenant,
        )
        head = audit.Head(**dict(head_row)) if head_row is not None else None
        verifier = audit.ChainVerifier(tenant, head)
        rows = conn.cursor(
            """SELECT seq, at, actor, role, action, target, ip, user_agent, before, after,
                      content_digest, content_salt, prev_hash, hash, redacted_at
                 FROM audit_log
                WHERE tenant = $1 AND seq > $2
                ORDER BY seq""",
            tenant,
            head.anchor_seq if head else 0,
            prefetch=1000,
        )
        async for row in rows:
            stored = audit.StoredRow(
                entry=audit.Entry(
                    tenant=tenant,
                    seq=row["seq"],
                    at=row["at"],
                    actor=row["actor"],
                    role=row["role"],
                    action=row["action"],
                    target=row["target"],
                    ip=row["ip"],
                    user_agent=row["user_agent"],
                    content_digest=row["content_digest"],
                ),
                before=row["before"],
                after=row["after"],
                content_salt=row["content_salt"],
                prev_hash=row["prev_hash"],
                hash=row["hash"],
                redacted=row["redacted_at"] is not None,
            )
            if not verifier.feed(stored):
                break
        return verifier.finish()


@asynccontextmanager
async def _transaction(conn: Conn) -> AsyncIterator[None]:
    """The caller's transaction if there is one, else a new one."""
    if conn.is_in_transaction():
        yield
        return
    async with conn.transaction():
        yield


async def list_punches(
    conn: Conn,
    tenant: str,
    *,
    employee: str | None,
    site: str | None,
    sites: list[str] | None,
    start: datetime | None,
    end: datetime | None,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Committed punches ordered by (at, id); ``sites`` limits a supervisor to its own."""
    return await conn.fetch(
        """SELECT id, employee, kind, at, received_at, site, device, method, source, flags
             FROM punches
            WHERE tenant = $1
              AND ($2::text IS NULL OR employee = $2)
              AND ($3::text IS NULL OR site = $3)
              AND ($4::text[] IS NULL OR site = ANY($4))
              AND ($5::timestamptz IS NULL OR at >= $5)
              AND ($6::timestamptz IS NULL OR at < $6)
              AND ($7::timestamptz IS NULL OR (at, id) > ($7, $8::uuid))
            ORDER BY at, id
            LIMIT $9""",
        tenant,
        employee,
        site,
        sites,
        start,
        end,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )


async def timesheet_employees(
    conn: Conn, tenant: str, *, employee: str | None, site: str | None, sites: list[str] | None
) -> list[asyncpg.Record]:
    """Employees with their home site's time zone and policy (their timesheet's rules)."""
    return await conn.fetch(
        """SELECT e.id, s.timezone, s.policy
             FROM employees e
             JOIN sites s ON s.tenant = e.tenant AND s.id = e.site
            WHERE e.tenant = $1
              AND ($2::text IS NULL OR e.id = $2)
              AND ($3::text IS NULL OR e.site = $3)
              AND ($4::text[] IS NULL OR e.site = ANY($4))
            ORDER BY e.id""",
        tenant,
        employee,
        site,
        sites,
    )


async def punches_between(
    conn: Conn, tenant: str, employees: list[str], start: datetime, end: datetime
) -> list[asyncpg.Record]:
    """The employees' punches from ``start`` to before ``end``, by employee, then in time."""
    return await conn.fetch(
        """SELECT employee, kind, at, flags
             FROM punches
            WHERE tenant = $1 AND employee = ANY($2::text[]) AND at >= $3 AND at < $4
            ORDER BY employee, at, id""",
        tenant,
        employees,
        start,
        end,
    )


async def list_alerts(
    conn: Conn,
    tenant: str,
    *,
    site: str | None,
    sites: list[str] | None,
    employee: str | None,
    since: datetime | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Stored alerts, newest first; ``sites`` limits a supervisor to its own."""
    return await conn.fetch(
        """SELECT id, kind, severity, employee, site, at, message, detail, raised_at
             FROM alerts
            WHERE tenant = $1
              AND ($2::text IS NULL OR site = $2)
              AND ($3::text[] IS NULL OR site = ANY($3))
              AND ($4::text IS NULL OR employee = $4)
              AND ($5::timestamptz IS NULL OR raised_at >= $5)
            ORDER BY raised_at DESC, id DESC
            LIMIT $6""",
        tenant,
        site,
        sites,
        employee,
        since,
        limit,
    )
