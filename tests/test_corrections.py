"""Manual punch corrections over REST (`POST /v1/punches`), against a real hub and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.support import TenantKit, punch_frame

pytestmark = pytest.mark.postgres


def correction(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "employee": "e1",
        "kind": "in",
        "at": (datetime.now(UTC) - timedelta(hours=3)).isoformat(),
        "reason": "forgot to badge in; confirmed by the shift lead",
    }
    body.update(fields)
    return body


async def rows(tenant: TenantKit, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(tenant.dsn)
    try:
        return await conn.fetch(sql, tenant.slug, *args)
    finally:
        await conn.close()


async def test_a_correction_is_stored_beside_the_original_and_audited(tenant: TenantKit) -> None:
    client = await tenant.connect()
    original = punch_frame("e1", kind="out")
    assert (await client.punch(original))["status"] == "accepted"
    await client.close()
    supervisor = tenant.token("supervisor", "lead", sites=["hq"])
    body = correction(kind="in")
    response = await tenant.http.post(
        "/v1/punches", json=body, headers={"authorization": f"Bearer {supervisor}"}
    )
    assert response.status_code == 201, response.text
    answer = response.json()
    assert (answer["id"], answer["status"], answer["employee"], answer["site"]) == (
        body["id"],
        "accepted",
        "e1",
        "hq",
    )
    stored = await rows(
        tenant,
        "SELECT id::text, kind, source, method, reason, actor FROM punches "
        "WHERE tenant = $1 ORDER BY received_at",
    )
    assert [tuple(r) for r in stored] == [
        (original["id"], "out", "terminal", None, None, None),
        (body["id"], "in", "manual", "manual", body["reason"], "lead"),
    ]
    audit = await rows(
        tenant,
        "SELECT actor, role, action, target, after FROM audit_log WHERE tenant = $1 "
        "AND action = 'punch.correct'",
    )
    assert len(audit) == 1
    assert (audit[0]["actor"], audit[0]["role"], audit[0]["target"]) == (
        "lead",
        "supervisor",
        f"punch:{body['id']}",
    )
    # Resending the same correction changes nothing; the same id with other details is a 409.
    again = await tenant.http.post("/v1/punches", json=body)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    clash = await tenant.http.post("/v1/punches", json={**body, "kind": "out"})
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "id_conflict"
    assert len(await rows(tenant, "SELECT 1 FROM punches WHERE tenant = $1")) == 2


@pytest.mark.parametrize("role", ["terminal", "employee"])
async def test_only_supervisors_and_admins_correct(tenant: TenantKit, role: str) -> None:
    token = tenant.token(role, "someone", site="hq", employee="e1")
    response = await tenant.http.post(
        "/v1/punches", json=correction(), headers={"authorization": f"Bearer {token}"}
    )
    assert response.status_code == 403
    assert await rows(tenant, "SELECT 1 FROM punches WHERE tenant = $1") == []


async def test_a_supervisor_corrects_only_at_its_own_sites(tenant: TenantKit) -> None:
    response = await tenant.http.put("/v1/sites/annex", json={"name": "Annex", "timezone": "UTC"})
    assert response.status_code == 201
    lead = tenant.token("supervisor", "lead", sites=["annex"])
    refused = await tenant.http.post(
        "/v1/punches", json=correction(), headers={"authorization": f"Bearer {lead}"}
    )
    assert refused.status_code == 403
    allowed = await tenant.http.post(
        "/v1/punches", json=correction(site="annex"), headers={"authorization": f"Bearer {lead}"}
    )
    assert allowed.status_code == 201, allowed.text
    assert allowed.json()["site"] == "annex"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"employee": "ghost"}, "unknown_employee"),
        ({"employee": None, "badge": "nope"}, "unknown_employee"),
        ({"badge": "b1"}, "invalid"),
        ({"reason": ""}, "invalid"),
        ({"reason": None}, "invalid"),
        ({"at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}, "invalid_time"),
        ({"at": "2026-01-01T08:00:00"}, "invalid"),
        ({"site": "nowhere"}, "unknown_site"),
        ({"kind": "lunch"}, "invalid"),
        ({"surprise": 1}, "invalid"),
    ],
)
async def test_invalid_corrections_are_refused_and_store_nothing(
    tenant: TenantKit, fields: dict[str, Any], code: str
) -> None:
    body = {k: v for k, v in correction(**fields).items() if v is not None}
    response = await tenant.http.post("/v1/punches", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert await rows(tenant, "SELECT 1 FROM punches WHERE tenant = $1") == []
    assert (
        await rows(tenant, "SELECT 1 FROM audit_log WHERE tenant = $1 AND action = 'punch.correct'")
        == []
    )
