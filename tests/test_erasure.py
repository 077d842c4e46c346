"""Erasure (`DELETE /v1/employees/{employee}`) against a real hub and PostgreSQL."""

from __future__ import annotations

import asyncpg
import pytest

from hub import store
from tests.support import TenantKit, punch_frame

pytestmark = pytest.mark.postgres

NAME = "Ada Lovelace-Byron"
BADGE = "B-77810042"


async def mentions(conn: asyncpg.Connection, tenant: str, needle: str) -> list[str]:
    """Every table in which some row of the tenant contains ``needle`` anywhere."""
    tables = await conn.fetch(
        """SELECT table_name FROM information_schema.columns
            WHERE table_schema = 'public' AND column_name = 'tenant'"""
    )
    found = []
    for row in tables:
        table = row["table_name"]
        hits = await conn.fetchval(
            f"SELECT count(*) FROM {table} t WHERE t.tenant = $1 AND t::text LIKE $2",
            tenant,
            f"%{needle}%",
        )
        if hits:
            found.append(table)
    return found


async def test_erasure_removes_name_and_badge_everywhere_and_keeps_the_punches(
    tenant: TenantKit,
) -> None:
    response = await tenant.http.put(
        "/v1/employees/e1", json={"name": NAME, "site": "hq", "badge": BADGE}
    )
    assert response.status_code == 200, response.text
    client = await tenant.connect()
    for frame in (punch_frame("e1"), punch_frame(badge=BADGE, kind="out")):
        assert (await client.punch(frame))["status"] == "accepted"
    conn = await asyncpg.connect(tenant.dsn)
    await store.init_connection(conn)
    try:
        assert set(await mentions(conn, tenant.slug, NAME)) == {"employees", "audit_log"}
        assert set(await mentions(conn, tenant.slug, BADGE)) == {"employees", "audit_log"}

        response = await tenant.http.delete("/v1/employees/e1")
        assert response.status_code == 200, response.text
        assert response.json() == {"employee": "e1", "erased": True, "punches_kept": 2}

        assert await mentions(conn, tenant.slug, NAME) == []
        assert await mentions(conn, tenant.slug, BADGE) == []
        # The punch facts stay, under the same id.
        count = await conn.fetchval(
            "SELECT count(*) FROM punches WHERE tenant = $1 AND employee = 'e1'", tenant.slug
        )
        assert count == 2
        # Redaction keeps the audit chain verifiable, and the erasure itself is audited.
        report = await store.verify_audit(conn, tenant.slug)
        assert report.ok, report
        actions = await conn.fetch(
            "SELECT action FROM audit_log WHERE tenant = $1 AND target = 'employee:e1'",
            tenant.slug,
        )
        assert [r["action"] for r in actions][-1] == "employee.erase"
    finally:
        await conn.close()

    # Gone as a person: not listed, not found, cannot punch, cannot be re-registered.
    assert (await tenant.http.get("/v1/employees/e1")).status_code == 404
    listed = (await tenant.http.get("/v1/employees")).json()["employees"]
    assert "e1" not in [e["id"] for e in listed]
    for frame in (punch_frame("e1"), punch_frame(badge=BADGE)):
        ack = await client.punch(frame)
        assert (ack["status"], ack.get("reason")) == ("rejected", "unknown_employee")
    await client.close()
    again = await tenant.http.put("/v1/employees/e1", json={"name": NAME, "site": "hq"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "erased"
    # Erasing twice is harmless.
    twice = await tenant.http.delete("/v1/employees/e1")
    assert twice.status_code == 200 and twice.json()["punches_kept"] == 2


async def test_only_admins_erase_and_only_existing_employees(tenant: TenantKit) -> None:
    supervisor = tenant.token("supervisor", "lead", sites=["*"])
    refused = await tenant.http.delete(
        "/v1/employees/e2", headers={"authorization": f"Bearer {supervisor}"}
    )
    assert refused.status_code == 403
    assert (await tenant.http.get("/v1/employees/e2")).status_code == 200
    assert (await tenant.http.delete("/v1/employees/nobody")).status_code == 404
