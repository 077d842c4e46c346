"""`GET /v1/timesheets` on a real hub: the rules of workers/timesheets.py over stored punches,
as JSON and CSV, for the roles that may read them, with bad input refused."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.support import TenantKit

pytestmark = pytest.mark.postgres

LOS_ANGELES = ZoneInfo("America/Los_Angeles")
MONDAY = date(2026, 11, 2)


async def set_policy(tenant: TenantKit, policy: dict[str, Any]) -> None:
    body = {"name": "HQ", "timezone": "America/Los_Angeles", "policy": policy}
    response = await tenant.http.put("/v1/sites/hq", json=body)
    assert response.status_code == 200, response.text


async def work(tenant: TenantKit, employee: str, day: date, start: float, hours: float) -> None:
    """Clock ``employee`` in and out by hand, in Los Angeles wall time."""
    begin = datetime(day.year, day.month, day.day, tzinfo=LOS_ANGELES) + timedelta(hours=start)
    for kind, at in (("in", begin), ("out", begin + timedelta(hours=hours))):
        body = {
            "id": str(uuid.uuid4()),
            "employee": employee,
            "kind": kind,
            "at": at.isoformat(),
            "reason": "timesheet test",
        }
        response = await tenant.http.post("/v1/punches", json=body)
        assert response.status_code == 201, response.text


async def sheet(tenant: TenantKit, token: str | None = None, **params: str) -> Any:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return await tenant.http.get("/v1/timesheets", params=params, headers=headers)


async def test_a_46_hour_week_under_flsa_as_json_and_csv(tenant: TenantKit) -> None:
    await set_policy(tenant, {"overtime": "flsa"})
    for n, hours in enumerate([9, 9, 9, 9, 10]):
        await work(tenant, "e1", MONDAY + timedelta(days=n), 8, hours)
    response = await sheet(tenant, **{"from": "2026-11-02", "to": "2026-11-08"})
    assert response.status_code == 200, response.text
    rows = response.json()["rows"]
    assert [(r["employee"], r["date"], r["worked_minutes"]) for r in rows] == [
        ("e1", f"2026-11-0{2 + n}", minutes) for n, minutes in enumerate([540] * 4 + [600])
    ]
    assert sum(r["regular_minutes"] for r in rows) == 40 * 60
    assert sum(r["overtime_minutes"] for r in rows) == 6 * 60
    assert rows[0] == {
        "employee": "e1",
        "date": "2026-11-02",
        "worked_minutes": 540,
        "regular_minutes": 540,
        "overtime_minutes": 0,
        "double_time_minutes": 0,
        "break_minutes": 0,
        "flags": [],
    }
    # The period cuts the rows, not the week: Friday alone still carries the week's overtime.
    friday = await sheet(tenant, **{"from": "2026-11-06", "to": "2026-11-06"})
    [row] = friday.json()["rows"]
    assert (row["regular_minutes"], row["overtime_minutes"]) == (240, 360)
    # The same rows as CSV.
    as_csv = await tenant.http.get(
        "/v1/timesheets",
        params={"from": "2026-11-02", "to": "2026-11-08"},
        headers={"accept": "text/csv"},
    )
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [{key: value for key, value in line.items() if key != "flags"} for line in table] == [
        {key: str(value) for key, value in row.items() if key != "flags"} for row in rows
    ]
    assert {line["flags"] for line in table} == {""}


async def test_california_daily_overtime_and_a_forgotten_clock_out(tenant: TenantKit) -> None:
    await set_policy(tenant, {"overtime": "california", "rounding_minutes": 15})
    await work(tenant, "e2", MONDAY, 6, 13)
    # Clocked in on Tuesday and never out.
    response = await tenant.http.post(
        "/v1/punches",
        json={
            "id": str(uuid.uuid4()),
            "employee": "e2",
            "kind": "in",
            "at": datetime(2026, 11, 3, 8, 7, tzinfo=LOS_ANGELES).isoformat(),
            "reason": "timesheet test",
        },
    )
    assert response.status_code == 201, response.text
    rows = (await sheet(tenant, employee="e2", **{"from": "2026-11-02", "to": "2026-11-03"})).json()
    assert [
        (r["date"], r["regular_minutes"], r["overtime_minutes"], r["double_time_minutes"])
        for r in rows["rows"]
    ] == [("2026-11-02", 480, 240, 60), ("2026-11-03", 0, 0, 0)]
    assert rows["rows"][1]["flags"] == ["missing_clock_out"]


async def test_who_may_read_which_timesheet(tenant: TenantKit) -> None:
    await work(tenant, "e1", MONDAY, 8, 8)
    await work(tenant, "e2", MONDAY, 8, 8)
    period = {"from": "2026-11-02", "to": "2026-11-02"}
    mine = tenant.token("employee", "phone-e1", employee="e1")
    response = await sheet(tenant, mine, **period)
    assert [r["employee"] for r in response.json()["rows"]] == ["e1"]
    response = await sheet(tenant, mine, employee="e2", **period)
    assert response.status_code == 403, response.text
    elsewhere = tenant.token("supervisor", "lead", sites=["plant"])
    assert (await sheet(tenant, elsewhere, **period)).json()["rows"] == []
    assert (await sheet(tenant, elsewhere, site="hq", **period)).status_code == 403
    here = tenant.token("supervisor", "lead", sites=["hq"])
    rows = (await sheet(tenant, here, **period)).json()["rows"]
    assert [r["employee"] for r in rows] == ["e1", "e2"]
    terminal = tenant.terminal_token
    assert (await sheet(tenant, terminal, **period)).status_code == 403


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"to": "2026-11-02"}, "`from` is required"),
        ({"from": "2026-11-02"}, "`to` is required"),
        ({"from": "2026-11-02", "to": "2026-11-01"}, "before"),
        ({"from": "2026-01-01", "to": "2026-12-31"}, "at most"),
        ({"from": "yesterday", "to": "2026-11-02"}, "must be a date"),
        ({"from": "2026-11-02", "to": "2026-11-02", "employee": "no such!"}, "not a valid id"),
    ],
)
async def test_bad_parameters_are_refused(
    tenant: TenantKit, params: dict[str, str], fragment: str
) -> None:
    response = await sheet(tenant, **params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid" and fragment in error["message"], error
