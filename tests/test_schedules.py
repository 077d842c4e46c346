"""`PUT /v1/schedules/{employee}`: planned shifts, replaced as a whole, validated and audited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.support import TenantKit

pytestmark = pytest.mark.postgres

MONDAY = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


def shift(hours_from_monday: float, length_h: float = 8, site: str = "hq") -> dict[str, Any]:
    start = MONDAY + timedelta(hours=hours_from_monday)
    return {
        "site": site,
        "start": start.isoformat(),
        "end": (start + timedelta(hours=length_h)).isoformat(),
    }


async def stored(tenant: TenantKit, employee: str) -> list[tuple[str, datetime, datetime]]:
    conn = await asyncpg.connect(tenant.dsn)
    try:
        rows = await conn.fetch(
            "SELECT site, starts_at, ends_at FROM schedules WHERE tenant = $1 AND employee = $2 "
            "ORDER BY starts_at",
            tenant.slug,
            employee,
        )
    finally:
        await conn.close()
    return [(r["site"], r["starts_at"], r["ends_at"]) for r in rows]


async def test_a_schedule_is_replaced_as_a_whole_and_audited(tenant: TenantKit) -> None:
    berlin = {
        "site": "hq",
        "start": "2026-12-02T07:00:00+01:00",
        "end": "2026-12-02T15:00:00+01:00",
    }
    response = await tenant.http.put("/v1/schedules/e1", json=[shift(24), berlin, shift(0)])
    assert response.status_code == 200, response.text
    assert response.json() == {
        "employee": "e1",
        "shifts": [
            {"site": "hq", "start": "2026-11-30T08:00:00.000Z", "end": "2026-11-30T16:00:00.000Z"},
            {"site": "hq", "start": "2026-12-01T08:00:00.000Z", "end": "2026-12-01T16:00:00.000Z"},
            {"site": "hq", "start": "2026-12-02T06:00:00.000Z", "end": "2026-12-02T14:00:00.000Z"},
        ],
    }
    assert len(await stored(tenant, "e1")) == 3
    response = await tenant.http.put("/v1/schedules/e1", json=[shift(48)])
    assert response.status_code == 200
    assert [(s, a) for s, a, _ in await stored(tenant, "e1")] == [
        ("hq", MONDAY + timedelta(hours=48))
    ]
    entries = (await tenant.http.get("/v1/audit", params={"action": "schedule.put"})).json()
    [first, second] = entries["entries"]
    assert (first["target"], first["before"], len(first["after"]["shifts"])) == (
        "employee:e1",
        {"shifts": []},
        3,
    )
    assert len(second["before"]["shifts"]) == 3 and len(second["after"]["shifts"]) == 1
    # An empty list clears the schedule.
    assert (await tenant.http.put("/v1/schedules/e1", json=[])).status_code == 200
    assert await stored(tenant, "e1") == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ([shift(0, length_h=-1)], 400, "invalid"),
        ([shift(0, length_h=0)], 400, "invalid"),
        ([shift(0, length_h=25)], 400, "invalid"),
        ([shift(0), shift(7)], 400, "invalid"),
        ([shift(0, site="nowhere")], 400, "unknown_site"),
        (
            [{"site": "hq", "start": "2026-11-30T08:00:00", "end": "2026-11-30T16:00:00Z"}],
            400,
            "invalid",
        ),
        ([{"site": "hq", "start": "2026-11-30T08:00:00Z"}], 400, "invalid"),
        ({"site": "hq"}, 400, "invalid"),
        ([shift(24 * n) for n in range(1001)], 400, "invalid"),
    ],
)
async def test_bad_schedules_are_refused_and_change_nothing(
    tenant: TenantKit, body: Any, status: int, code: str
) -> None:
    assert (await tenant.http.put("/v1/schedules/e2", json=[shift(100)])).status_code == 200
    response = await tenant.http.put("/v1/schedules/e2", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert len(await stored(tenant, "e2")) == 1


async def test_only_admins_plan_and_only_their_own_employees(tenant: TenantKit) -> None:
    supervisor = tenant.token("supervisor", "lead", sites=["*"])
    response = await tenant.http.put(
        "/v1/schedules/e1", json=[shift(0)], headers={"authorization": f"Bearer {supervisor}"}
    )
    assert response.status_code == 403
    assert (await tenant.http.put("/v1/schedules/nobody", json=[shift(0)])).status_code == 404
    assert (await tenant.http.delete("/v1/employees/e3")).status_code == 200
    response = await tenant.http.put("/v1/schedules/e3", json=[shift(0)])
    assert (response.status_code, response.json()["error"]["code"]) == (409, "erased")
    assert await stored(tenant, "e1") == [] and await stored(tenant, "e3") == []
