"""ZKTeco PUSH ("ADMS", iclock) terminals against a real hub: the handshake, attendance uploads
stored as punches (once), bad lines and unknown PINs reported as alerts, unknown serial numbers
refused, and a terminal that talks shown online until it falls silent."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from tests.conftest import TEST_SECRET
from tests.support import (
    Client,
    HubProcess,
    TenantKit,
    free_port,
    provisioned_tenant,
    running_hub,
)
from tests.test_alerts import next_alert
from tests.test_presence_live import subscribe, watcher

pytestmark = pytest.mark.postgres

HANDSHAKE_KEYS = [
    "ATTLOGStamp",
    "OPERLOGStamp",
    "ATTPHOTOStamp",
    "ErrorDelay",
    "Delay",
    "TransTimes",
    "TransInterval",
    "TransFlag",
    "TimeZone",
    "Realtime",
    "Encrypt",
]
# What a real device appends to its handshake; the hub ignores it.
DEVICE_QUERY = {"pushver": "2.4.1", "language": "69", "DeviceType": "att"}


def new_sn() -> str:
    """A serial number of its own: they are unique across every tenant of the database."""
    return "CKJ" + secrets.token_hex(5).upper()


def local(zone: str, minutes_ago: float) -> datetime:
    """A wall-clock time at ``zone`` a while ago, to whole seconds, as the device would log it."""
    moment = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return moment.astimezone(ZoneInfo(zone)).replace(microsecond=0)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def record(pin: str, at: datetime | str, status: int = 0, verify: int = 1) -> str:
    """An ATTLOG line as firmware writes it: PIN, TIME, STATUS, VERIFY, WORKCODE and reserved
    fields."""
    when = at if isinstance(at, str) else stamp(at)
    return "\t".join([pin, when, str(status), str(verify), "0", "0", "0", "0", "0", "0"])


def utc_offset_hours(zone: str) -> str:
    """The zone's offset now, as the handshake writes it: `1`, `-5`, `5.5`."""
    offset = datetime.now(ZoneInfo(zone)).utcoffset()
    assert offset is not None
    hours = offset.total_seconds() / 3600
    return str(int(hours)) if hours.is_integer() else str(hours)


def is_text_plain(response: httpx.Response) -> bool:
    content_type = response.headers.get("content-type", "").replace(" ", "").lower()
    return content_type.startswith("text/plain") and "charset=utf-8" in content_type


class Terminal:
    """A ZKTeco terminal speaking the PUSH protocol to the hub, by serial number."""

    def __init__(self, base_url: str, sn: str | None) -> None:
        self.sn = sn
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30)

    def query(self, **params: str) -> dict[str, str]:
        return params if self.sn is None else {"SN": self.sn, **params}

    async def handshake(self) -> httpx.Response:
        return await self.http.get(
            "/iclock/cdata", params=self.query(options="all", **DEVICE_QUERY)
        )

    async def options(self) -> dict[str, str]:
        """The handshake's options, after checking its first line and the order of its keys."""
        response = await self.handshake()
        assert response.status_code == 200, response.text
        assert is_text_plain(response), response.headers
        lines = [line for line in response.text.split("\n") if line]
        assert lines[0] == f"GET OPTION FROM: {self.sn}", response.text
        pairs = [line.split("=", 1) for line in lines[1:]]
        assert all(len(pair) == 2 for pair in pairs), response.text
        assert [key for key, _ in pairs] == HANDSHAKE_KEYS, response.text
        return {key: value for key, value in pairs}

    async def upload(
        self, lines: list[str], table: str = "ATTLOG", end: str = "\n", **params: str
    ) -> httpx.Response:
        body = "".join(line + end for line in lines)
        return await self.http.post(
            "/iclock/cdata", params=self.query(table=table, **params), content=body.encode()
        )

    async def attlog(self, lines: list[str], stamp: str = "1", end: str = "\n") -> str:
        """Upload attendance records and return the answer, which must be a plain 200."""
        response = await self.upload(lines, Stamp=stamp, end=end)
        assert response.status_code == 200, response.text
        assert is_text_plain(response), response.headers
        return response.text

    async def ping(self) -> httpx.Response:
        return await self.http.get("/iclock/ping", params=self.query())

    async def close(self) -> None:
        await self.http.aclose()


@asynccontextmanager
async def adms_terminal(
    kit: TenantKit, device: str = "face", site: str = "hq"
) -> AsyncIterator[Terminal]:
    sn = new_sn()
    response = await kit.http.put(
        f"/v1/devices/{device}", json={"site": site, "name": "Face reader", "adms_sn": sn}
    )
    assert response.status_code == 201, response.text
    terminal = Terminal(kit.base_url, sn)
    try:
        yield terminal
    finally:
        await terminal.close()


async def put_site(kit: TenantKit, site: str, zone: str) -> None:
    response = await kit.http.put(f"/v1/sites/{site}", json={"name": site, "timezone": zone})
    assert response.status_code in (200, 201), response.text


async def punches(kit: TenantKit) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(kit.dsn)
    try:
        return list(
            await conn.fetch("SELECT * FROM punches WHERE tenant = $1 ORDER BY at, id", kit.slug)
        )
    finally:
        await conn.close()


async def alerts_of(kit: TenantKit, kind: str) -> list[dict[str, Any]]:
    response = await kit.http.get("/v1/alerts", params={"limit": "1000"})
    assert response.status_code == 200, response.text
    return [a for a in response.json()["alerts"] if a["kind"] == kind]


async def wait_for_alerts(
    kit: TenantKit, kind: str, count: int, timeout: float = 10
) -> list[dict[str, Any]]:
    """The tenant's alerts of ``kind`` once there are ``count`` of them (or what there is)."""
    deadline = time.monotonic() + timeout
    found = await alerts_of(kit, kind)
    while len(found) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        found = await alerts_of(kit, kind)
    return found


def utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


# -- the handshake ----------------------------------------------------------------------------


async def test_the_handshake_gives_the_options_in_order_with_each_sites_time_zone(
    tenant: TenantKit,
) -> None:
    zones = {"berlin": "Europe/Berlin", "nyc": "America/New_York", "kolkata": "Asia/Kolkata"}
    for site, zone in zones.items():
        await put_site(tenant, site, zone)
    for site, zone in zones.items():
        async with adms_terminal(tenant, device=f"reader-{site}", site=site) as terminal:
            options = await terminal.options()
            assert options == {
                "ATTLOGStamp": "None",
                "OPERLOGStamp": "None",
                "ATTPHOTOStamp": "None",
                "ErrorDelay": "30",
                "Delay": "10",
                "TransTimes": "00:00;14:05",
                "TransInterval": "1",
                "TransFlag": "TransData AttLog OpLog",
                "TimeZone": utc_offset_hours(zone),
                "Realtime": "1",
                "Encrypt": "None",
            }, site
    # The fixed points the spec names, whatever the season today.
    assert utc_offset_hours("Asia/Kolkata") == "5.5"


async def test_the_handshake_remembers_the_stamps_of_committed_uploads(tenant: TenantKit) -> None:
    async with (
        adms_terminal(tenant) as terminal,
        adms_terminal(tenant, device="other") as other,
    ):
        before = await terminal.options()
        assert (before["ATTLOGStamp"], before["OPERLOGStamp"], before["ATTPHOTOStamp"]) == (
            "None",
            "None",
            "None",
        )
        assert await terminal.attlog([record("b1", local("UTC", 30))], stamp="9999") == "OK:1"
        assert (await terminal.options())["ATTLOGStamp"] == "9999"
        response = await terminal.upload(
            ["OPLOG 4\t0\t2026-11-20 08:00:00\t0\t0\t0\t0"], table="OPERLOG", Stamp="555"
        )
        assert (response.status_code, response.text) == (200, "OK")
        photo = await terminal.upload(["PIN=1\tSN=x\tsize=3"], table="ATTPHOTO", Stamp="777")
        assert (photo.status_code, photo.text) == (200, "OK")
        after = await terminal.options()
        assert (after["ATTLOGStamp"], after["OPERLOGStamp"], after["ATTPHOTOStamp"]) == (
            "9999",
            "555",
            "None",
        )
        assert await terminal.attlog([record("b2", local("UTC", 20))], stamp="10050") == "OK:1"
        assert (await terminal.options())["ATTLOGStamp"] == "10050"
        # Each device has its own stamps.
        mine = await other.options()
        assert (mine["ATTLOGStamp"], mine["OPERLOGStamp"]) == ("None", "None")


async def test_a_quiet_device_gets_ok_on_every_other_endpoint(tenant: TenantKit) -> None:
    async with adms_terminal(tenant) as terminal:
        sn = {"SN": terminal.sn}
        answers = [
            await terminal.http.get("/iclock/getrequest", params={**sn, "INFO": "Ver 6.60,0,0"}),
            await terminal.http.post(
                "/iclock/devicecmd", params=sn, content=b"ID=1&Return=0&CMD=INFO"
            ),
            await terminal.ping(),
            await terminal.upload(["anything at all"], table="OPERLOG"),
            await terminal.upload(["PIN=1\tSN=x"], table="ATTPHOTO"),
            await terminal.upload(["USER PIN=1\tName=A"], table="USERINFO"),
        ]
        for response in answers:
            assert (response.status_code, response.text) == (200, "OK"), response.request.url
            assert is_text_plain(response), response.headers
        # None of that is attendance.
        assert await tenant.count_punches() == 0


# -- attendance uploads -----------------------------------------------------------------------


async def test_an_upload_stores_each_record_as_a_terminal_punch(tenant: TenantKit) -> None:
    # The reader stands at another site than the employees' home: the punch is the reader's.
    await put_site(tenant, "plant", "Europe/Berlin")
    async with adms_terminal(tenant, site="plant") as terminal:
        times = [local("Europe/Berlin", minutes) for minutes in (60, 50, 40, 30, 20, 10, 5, 3)]
        lines = [
            record("b1", times[0], status=0, verify=1),
            record("b1", times[1], status=2, verify=15),
            record("b1", times[2], status=3, verify=4),
            record("b1", times[3], status=1, verify=3),
            record("b2", times[4], status=4, verify=0),
            record("b2", times[5], status=5, verify=2),
            # Only the three fields the hub needs.
            "\t".join(["b3", stamp(times[6]), "0"]),
            record("b3", times[7], status=1, verify=200),
        ]
        assert await terminal.attlog(lines) == f"OK:{len(lines)}"
        # Answered only after the commit: the rows are there at once.
        rows = await punches(tenant)
        got = [
            (r["employee"], r["kind"], r["at"], r["method"], r["device"], r["site"], r["source"])
            for r in rows
        ]
        expected = [
            ("e1", "in", utc(times[0]), "fingerprint"),
            ("e1", "break_start", utc(times[1]), "face"),
            ("e1", "break_end", utc(times[2]), "badge"),
            ("e1", "out", utc(times[3]), "pin"),
            ("e2", "in", utc(times[4]), None),
            ("e2", "out", utc(times[5]), None),
            ("e3", "in", utc(times[6]), None),
            ("e3", "out", utc(times[7]), None),
        ]
        assert got == [(*e, "face", "plant", "adms") for e in expected]
        listed = (await tenant.http.get("/v1/punches", params={"site": "plant"})).json()
        assert [(p["employee"], p["device"], p["source"]) for p in listed["punches"]] == [
            (e[0], "face", "adms") for e in expected
        ]


async def test_a_re_upload_is_a_duplicate_and_adds_no_row(tenant: TenantKit) -> None:
    async with adms_terminal(tenant) as terminal:
        lines = [
            record("b1", local("UTC", 30), status=0),
            record("b2", local("UTC", 29), status=0),
            record("b1", local("UTC", 10), status=1),
        ]
        assert await terminal.attlog(lines, stamp="100") == "OK:3"
        first = {str(r["id"]): r["committed_at"] for r in await punches(tenant)}
        assert len(first) == 3
        # The device did not see the answer and sends the same body again.
        assert await terminal.attlog(lines, stamp="100") == "OK:3"
        again = {str(r["id"]): r["committed_at"] for r in await punches(tenant)}
        assert again == first
        # A later batch repeats them in another order, with one new record and CRLF line ends.
        new = record("b3", local("UTC", 5), status=0)
        assert await terminal.attlog([lines[2], new, lines[0], lines[1]], end="\r\n") == "OK:4"
        rows = await punches(tenant)
        assert len(rows) == 4
        assert set(first) < {str(r["id"]) for r in rows}
        assert [r["employee"] for r in rows if str(r["id"]) not in first] == ["e3"]


async def test_bad_lines_are_reported_and_the_good_ones_stored(tenant: TenantKit) -> None:
    async with adms_terminal(tenant) as terminal:
        good = [record("b1", local("UTC", 40)), record("b2", local("UTC", 35), status=1)]
        when = stamp(local("UTC", 30))
        bad = [
            f"b3\t{when}",  # two fields
            "b3\tyesterday at nine\t0\t1\t0",  # no time
            "b3\t2026-13-45 08:00:00\t0\t1\t0",  # no such date
            f"b3\t{when}\t9\t1\t0",  # no such status
            f"b3\t{when}\tout\t1\t0",  # no such status either
            f"\t{when}\t0\t1\t0",  # no PIN
            f"{'7' * 65}\t{when}\t0\t1\t0",  # a PIN over 64 characters
        ]
        lines = [good[0], bad[0], bad[1], bad[2], "", bad[3], bad[4], good[1], bad[5], bad[6]]
        # The empty line is no record: it is not counted.
        assert await terminal.attlog(lines) == f"OK:{len(good) + len(bad)}"
        rows = await punches(tenant)
        assert [(r["employee"], r["kind"]) for r in rows] == [("e1", "in"), ("e2", "out")]
        reported = await wait_for_alerts(tenant, "bad_record", len(bad))
        assert sorted(a["detail"]["line"] for a in reported) == sorted(bad)
        for alert in reported:
            assert (alert["severity"], alert["site"], alert.get("employee")) == (
                "warning",
                "hq",
                None,
            ), alert
            assert alert["detail"]["device"] == "face", alert
            assert isinstance(alert["detail"]["reason"], str) and alert["detail"]["reason"]
            assert alert["message"]
        # Nothing more comes later.
        await asyncio.sleep(1)
        assert len(await alerts_of(tenant, "bad_record")) == len(bad)


async def test_the_record_time_is_the_sites_local_time_unless_it_carries_an_offset(
    tenant: TenantKit,
) -> None:
    # November: Los Angeles is on PST (UTC-8). The date is in the past of the test machines'
    # clocks, so that no rule about punches from the future can refuse it.
    await put_site(tenant, "hq", "America/Los_Angeles")
    async with adms_terminal(tenant) as terminal:
        lines = [
            record("b1", "2026-11-20 08:00:00", status=0),
            record("b2", "2026-11-20 08:00:00+01:00", status=0),
            record("b3", "2026-11-20 08:00:00Z", status=0),
        ]
        assert await terminal.attlog(lines) == "OK:3"
        at = {r["employee"]: r["at"] for r in await punches(tenant)}
        assert at == {
            "e1": datetime(2026, 11, 20, 16, 0, tzinfo=UTC),
            "e2": datetime(2026, 11, 20, 7, 0, tzinfo=UTC),
            "e3": datetime(2026, 11, 20, 8, 0, tzinfo=UTC),
        }


async def test_a_pin_is_a_badge_first_and_else_an_employee_id(tenant: TenantKit) -> None:
    # e1's badge is e2's id: the badge wins.
    response = await tenant.http.put(
        "/v1/employees/e1", json={"name": "Employee 1", "site": "hq", "badge": "e2"}
    )
    assert response.status_code == 200, response.text
    async with adms_terminal(tenant) as terminal:
        lines = [
            record("b3", local("UTC", 30)),  # e3 by badge
            record("e3", local("UTC", 20), status=1),  # e3 by id
            record("e2", local("UTC", 10)),  # e1 by badge, not e2 by id
        ]
        assert await terminal.attlog(lines) == "OK:3"
        rows = await punches(tenant)
        assert [(r["employee"], r["kind"]) for r in rows] == [
            ("e3", "in"),
            ("e3", "out"),
            ("e1", "in"),
        ]


async def test_an_unknown_pin_is_reported_once_and_not_stored(tenant: TenantKit) -> None:
    lead = await watcher(tenant)
    await subscribe(lead, "alerts:hq")
    assert (await lead.recv())["type"] == "snapshot"
    async with adms_terminal(tenant) as terminal:
        when = local("UTC", 15)
        stranger = record("4711", when, status=1)
        lines = [record("b1", local("UTC", 20)), stranger]
        assert await terminal.attlog(lines, stamp="1") == "OK:2"
        assert [r["employee"] for r in await punches(tenant)] == ["e1"]
        pushed = await unknown_pin_alert(lead)
        assert (pushed["channel"], pushed["severity"], pushed["site"]) == (
            "alerts:hq",
            "warning",
            "hq",
        )
        assert "employee" not in pushed
        assert (pushed["detail"]["device"], pushed["detail"]["pin"]) == ("face", "4711")
        assert pushed["detail"]["kind"] == "out"
        assert pushed["detail"]["time"]
        # The device sends the same records again, then the stranger alone.
        assert await terminal.attlog(lines, stamp="1") == "OK:2"
        assert await terminal.attlog([stranger], stamp="2") == "OK:1"
        with pytest.raises(TimeoutError):
            await unknown_pin_alert(lead, timeout=1.5)
        listed = await alerts_of(tenant, "unknown_pin")
        assert [a["id"] for a in listed] == [pushed["id"]]
        assert listed[0]["detail"] == pushed["detail"]
        assert [r["employee"] for r in await punches(tenant)] == ["e1"]
    await lead.close()


async def unknown_pin_alert(client: Client, timeout: float = 10) -> dict[str, Any]:
    """The next `unknown_pin` alert (other alerts, such as the fraud checks', are passed over)."""
    deadline = time.monotonic() + timeout
    while True:
        alert = await next_alert(client, timeout=max(0.1, deadline - time.monotonic()))
        if alert["kind"] == "unknown_pin":
            return alert


async def test_serial_numbers_are_global_and_each_belongs_to_its_tenant(
    tenant: TenantKit, hub_process: HubProcess, database: str
) -> None:
    async with (
        provisioned_tenant(hub_process.base_url, database, TEST_SECRET, "other") as other,
        adms_terminal(tenant) as terminal,
    ):
        # The same serial number cannot be registered twice, in any tenant.
        taken = await other.http.put(
            "/v1/devices/face", json={"site": "hq", "adms_sn": terminal.sn}
        )
        assert taken.status_code == 409, taken.text
        async with adms_terminal(other) as theirs:
            assert await terminal.attlog([record("b1", local("UTC", 10))]) == "OK:1"
            assert await theirs.attlog([record("b2", local("UTC", 9))]) == "OK:1"
        assert [r["employee"] for r in await punches(tenant)] == ["e1"]
        assert [r["employee"] for r in await punches(other)] == ["e2"]


# -- unknown serial numbers -------------------------------------------------------------------


ENDPOINTS = [
    ("GET", "/iclock/cdata", {"options": "all", **DEVICE_QUERY}, b""),
    (
        "POST",
        "/iclock/cdata",
        {"table": "ATTLOG", "Stamp": "1"},
        b"b1\t2026-11-20 08:00:00\t0\t1\n",
    ),
    ("POST", "/iclock/cdata", {"table": "OPERLOG", "Stamp": "1"}, b"OPLOG 4\t0\t0\t0\n"),
    ("GET", "/iclock/getrequest", {}, b""),
    ("POST", "/iclock/devicecmd", {}, b"ID=1&Return=0&CMD=INFO"),
    ("GET", "/iclock/ping", {}, b""),
]


@pytest.mark.parametrize(
    ("method", "path", "params", "body"), ENDPOINTS, ids=[f"{m} {p}" for m, p, *_ in ENDPOINTS]
)
async def test_an_unknown_or_missing_serial_number_gets_401_and_nothing_is_stored(
    tenant: TenantKit, method: str, path: str, params: dict[str, str], body: bytes
) -> None:
    async with (
        adms_terminal(tenant) as registered,
        httpx.AsyncClient(base_url=tenant.base_url, timeout=30) as http,
    ):
        for sn in (new_sn(), "", None):
            query = params if sn is None else {"SN": sn, **params}
            response = await http.request(method, path, params=query, content=body)
            assert response.status_code == 401, (sn, response.text)
            assert is_text_plain(response), (sn, response.headers)
            assert response.text.strip(), sn
        assert await tenant.count_punches() == 0
        assert (await tenant.http.get("/v1/alerts")).json()["alerts"] == []
        # The registered device's stamps were not touched by the strangers.
        assert (await registered.options())["ATTLOGStamp"] == "None"


# -- presence and the terminals board ---------------------------------------------------------


async def test_a_supervisor_sees_the_punched_employee_on_the_floor(tenant: TenantKit) -> None:
    await put_site(tenant, "hq", "Asia/Kolkata")
    lead = await watcher(tenant)
    subscribed = await subscribe(lead, "presence:hq")
    assert (await lead.recv())["members"] == []
    async with adms_terminal(tenant) as terminal:
        when = local("Asia/Kolkata", 2)
        assert await terminal.attlog([record("b2", when, status=0, verify=15)]) == "OK:1"
        delta = await lead.recv()
        assert (delta["type"], delta["version"]) == ("delta", subscribed["version"] + 1)
        [change] = delta["changes"]
        assert (change["employee"], change["state"], change["site"]) == ("e2", "in", "hq")
        assert datetime.fromisoformat(change["since"]) == utc(when)
    await lead.close()


@pytest.fixture
def adms_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """A hub of its own where a silent ADMS device goes offline after 2 s, and devices are
    told to wait 7 s between polls."""
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_ADMS_OFFLINE_AFTER_S": "2",
        "ATTENDANCE_ADMS_DELAY_S": "7",
    }
    with running_hub(tmp_path_factory.mktemp("adms-hub"), env) as process:
        yield process


def board(frame: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(m["device"], m["online"]) for m in frame.get("changes", frame.get("members", []))]


@pytest.mark.one_server
async def test_a_device_is_online_while_it_talks_and_offline_after_the_silence(
    adms_hub: HubProcess, database: str
) -> None:
    async with (
        provisioned_tenant(adms_hub.base_url, database, TEST_SECRET, "adms") as kit,
        adms_terminal(kit) as terminal,
    ):
        lead = await watcher(kit)
        subscribed = await subscribe(lead, "terminals:hq")
        snapshot = await lead.recv()
        assert sorted(board(snapshot)) == [("door", False), ("face", False)]
        assert (await terminal.options())["Delay"] == "7"
        online = await lead.recv()
        assert (online["type"], online["version"]) == ("delta", subscribed["version"] + 1)
        assert board(online) == [("face", True)]
        # Polling more often than the silence allowed keeps it online, on any endpoint.
        for _ in range(6):
            await asyncio.sleep(0.5)
            assert (await terminal.ping()).text == "OK"
        last = time.monotonic()
        answer = await terminal.http.get("/iclock/getrequest", params={"SN": terminal.sn})
        assert answer.text == "OK"
        offline = await lead.recv(timeout=15)
        silent_for = time.monotonic() - last
        assert (offline["version"], board(offline)) == (
            subscribed["version"] + 2,
            [("face", False)],
        )
        assert silent_for >= 1.5, silent_for
        # The next request brings it back.
        assert await terminal.attlog([record("b1", local("UTC", 1))]) == "OK:1"
        back = await lead.recv()
        assert board(back) == [("face", True)]
        await lead.close()


# -- the database out of reach ----------------------------------------------------------------


class PgRelay:
    """A TCP relay between a hub and PostgreSQL that the test can cut, as if the database
    server went away (connections reset, new ones refused), and restore."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        self.socket_dir = query.pop("host", None) if not parts.hostname else None
        self.target_port = int(query.pop("port", None) or parts.port or 5432)
        self.target_host = parts.hostname or "127.0.0.1"
        self.port = free_port()
        user, at, _ = parts.netloc.rpartition("@")
        netloc = f"{user}{at}127.0.0.1:{self.port}"
        self.dsn = urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.socket_dir is not None:
                path = f"{self.socket_dir}/.s.PGSQL.{self.target_port}"
                up_reader, up_writer = await asyncio.open_unix_connection(path)
            else:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
        except OSError:
            writer.transport.abort()
            return
        self.links.update((writer, up_writer))
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            self.links.discard(writer)
            writer.transport.abort()


@pytest.fixture
async def relayed_hub(scratch_db: str, tmp_path: Path) -> AsyncIterator[tuple[HubProcess, PgRelay]]:
    """A hub of its own that reaches its database through a relay the test can cut."""
    relay = PgRelay(scratch_db)
    await relay.open()
    env = {"ATTENDANCE_DATABASE_URL": relay.dsn, "ATTENDANCE_SECRET": TEST_SECRET}
    hub = HubProcess(port=free_port(), env=env, log_path=tmp_path / "hub.log")
    try:
        # Started in a thread: the relay runs on this event loop while the hub migrates.
        await asyncio.to_thread(hub.start)
        yield hub, relay
    finally:
        if relay.server is None:
            await relay.open()
        await asyncio.to_thread(hub.stop)
        await relay.cut()


@pytest.mark.one_server
async def test_an_upload_while_the_database_is_down_gets_503_and_is_stored_once_later(
    relayed_hub: tuple[HubProcess, PgRelay], scratch_db: str
) -> None:
    hub, relay = relayed_hub
    async with (
        provisioned_tenant(hub.base_url, scratch_db, TEST_SECRET, "down") as kit,
        adms_terminal(kit) as terminal,
    ):
        assert (await terminal.options())["ATTLOGStamp"] == "None"
        lines = [record("b1", local("UTC", 3)), record("b2", local("UTC", 2))]
        await relay.cut()
        response = await terminal.upload(lines, Stamp="42")
        assert response.status_code == 503, response.text
        assert is_text_plain(response), response.headers
        assert await punches(kit) == []
        await relay.open()
        # The terminal tries again later, as it does after any answer but OK.
        deadline = time.monotonic() + 20
        while (response := await terminal.upload(lines, Stamp="42")).status_code == 503:
            assert time.monotonic() < deadline, "the hub did not recover in 20 s"
            await asyncio.sleep(0.5)
        assert (response.status_code, response.text) == (200, "OK:2")
        assert [r["employee"] for r in await punches(kit)] == ["e1", "e2"]
        assert (await terminal.options())["ATTLOGStamp"] == "42"
