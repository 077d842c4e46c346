"""ZKTeco terminals that push over HTTP ("ADMS", the iclock PUSH protocol; PROTOCOL §5).

A registered terminal (a device with `adms_sn`) shakes hands with ``GET /iclock/cdata``,
uploads attendance records with ``POST /iclock/cdata?table=ATTLOG`` and polls
``/iclock/getrequest`` for commands. Each ATTLOG line becomes a punch with an id derived
from the line, sent down the same path as a WebSocket punch (the batch commit, presence,
the checks), and the upload is answered ``OK:<n>`` only once every punch of it is
committed. Lines that cannot be read, and PINs that match nobody, are raised as alerts on
the terminal's site rather than dropped. A terminal is online on its site's terminal
board while it keeps talking, and offline once it has been silent for a while.

The parsing and the handshake are pure; `AdmsEndpoints` does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final, NamedTuple
from zoneinfo import ZoneInfo

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from hub import store
from hub.events import Alert, AlertsRaised, TerminalConnected, TerminalDisconnected
from hub.protocol import format_time
from workers.checks import store_alerts
from workers.persist import CONNECTION_ERRORS, FUTURE_TOLERANCE, PunchOutcome, PunchRequest

if TYPE_CHECKING:
    from hub.app import Hub

log = logging.getLogger(__name__)

# Punch ids: uuid5 of tenant, device and the record's own fields, so that a re-upload of
# the same record is a duplicate. Alert ids likewise, from the line.
PUNCH_NAMESPACE: Final = uuid.UUID("8f3e2d1c-0b9a-4c8d-9e7f-6a5b4c3d2e1f")
ALERT_NAMESPACE: Final = uuid.UUID("1a2b3c4d-5e6f-4a8b-9c0d-e1f2a3b4c5d6")
# ATTLOG STATUS and VERIFY codes (PROTOCOL §5).
KINDS: Final = {"0": "in", "1": "out", "2": "break_start", "3": "break_end", "4": "in", "5": "out"}
METHODS: Final = {"1": "fingerprint", "3": "pin", "4": "badge", "15": "face"}
# A record's time, with an optional offset of its own (`Z` or `+01:00`).
_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:(Z)|([+-])(\d{2}):?(\d{2}))?"
)
_STAMP = re.compile(r"[0-9A-Za-z]{1,32}")
# Terminals poll every few seconds: their registration is read from the database at most
# this often (a revoked or moved terminal is seen within it), for at most so many.
LOOKUP_TTL_S: Final = 2.0
LOOKUP_MAX: Final = 100_000
PIN_MAX: Final = 64
# A record older than this when it arrives was kept by the terminal while it could not
# reach the hub: marked `offline`, as a WebSocket client marks its queue.
REALTIME_WITHIN: Final = timedelta(minutes=2)
TEXT: Final = "text/plain; charset=utf-8"
_AHEAD: Final = (
    "refused: invalid_time ({at} is more than 5 minutes ahead of the hub's clock: "
    "check the terminal's date, time and time zone)"
)


class Record(NamedTuple):
    """One readable ATTLOG line."""

    line: str
    pin: str
    at: datetime
    kind: str
    method: str | None
    # The line's own fields that make its id: PIN, time as written, STATUS.
    key: str


class BadLine(NamedTuple):
    line: str
    reason: str


def parse_attlog(body: str, zone: ZoneInfo) -> tuple[list[Record], list[BadLine]]:
    """The records of an ATTLOG upload, and the lines that are not records (with why).

    Fields are tab-separated: PIN, time, STATUS, VERIFY, WORKCODE, then fields that vary by
    firmware (ignored). A time without an offset is the terminal's wall clock in ``zone``.
    """
    records: list[Record] = []
    bad: list[BadLine] = []
    for raw in body.split("\n"):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) < 3:
            bad.append(BadLine(line, "fewer than 3 tab-separated fields (PIN, time, status)"))
            continue
        pin, written, status = fields[0], fields[1], fields[2]
        if not pin or len(pin) > PIN_MAX or "\x00" in pin:
            bad.append(BadLine(line, f"the PIN must be 1 to {PIN_MAX} characters"))
            continue
        at = _read_time(written, zone)
        if at is None:
            bad.append(BadLine(line, f"unreadable time {written!r} (YYYY-MM-DD HH:MM:SS)"))
            continue
        kind = KINDS.get(status)
        if kind is None:
            bad.append(BadLine(line, f"unknown status {status!r} (0 to 5)"))
            continue
        method = METHODS.get(fields[3]) if len(fields) > 3 else None
        records.append(Record(line, pin, at, kind, method, f"{pin}\t{written}\t{status}"))
    return records, bad


def _read_time(written: str, zone: ZoneInfo) -> datetime | None:
    match = _TIME.fullmatch(written)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    try:
        if match.group(7):
            return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
        if match.group(8):
            sign = 1 if match.group(8) == "+" else -1
            offset = timedelta(hours=int(match.group(9)), minutes=int(match.group(10)))
            local = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
            return local - sign * offset
        # The wall clock of the site: in the hour a DST change repeats, the first of the two
        # (fold 0); in the hour it skips, the clock was still on the old offset.
        return datetime(year, month, day, hour, minute, second, tzinfo=zone).astimezone(UTC)
    except ValueError:
        return None


def handshake(sn: str, stamps: tuple[str | None, str | None], delay_s: int, zone: ZoneInfo) -> str:
    """The options a terminal asks for with ``GET /iclock/cdata?options=all``."""
    offset = datetime.now(zone).utcoffset() or timedelta()
    hours = offset.total_seconds() / 3600
    attlog, operlog = stamps
    lines = [
        f"GET OPTION FROM: {sn}",
        f"ATTLOGStamp={attlog or 'None'}",
        f"OPERLOGStamp={operlog or 'None'}",
        "ATTPHOTOStamp=None",
        "ErrorDelay=30",
        f"Delay={delay_s}",
        "TransTimes=00:00;14:05",
        "TransInterval=1",
        "TransFlag=TransData AttLog OpLog",
        f"TimeZone={hours:g}",
        "Realtime=1",
        "Encrypt=None",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Terminal:
    """A registered terminal, as a request from it finds it."""

    tenant: str
    device: str
    site: str
    zone: ZoneInfo
    attlog_stamp: str | None
    operlog_stamp: str | None


_TERMINAL_SQL: Final = """
SELECT d.tenant, d.id, d.site, s.timezone, d.adms_attlog_stamp, d.adms_operlog_stamp
  FROM devices d JOIN sites s ON s.tenant = d.tenant AND s.id = d.site
 WHERE d.adms_sn = $1 AND d.revoked_at IS NULL"""
_RESOLVE_SQL: Final = """
SELECT id, badge FROM employees
 WHERE tenant = $1 AND erased_at IS NULL AND (badge = ANY($2::text[]) OR id = ANY($2::text[]))"""
_STAMP_SQL: Final = {
    "ATTLOG": "UPDATE devices SET adms_attlog_stamp = $3 WHERE tenant = $1 AND id = $2",
    "OPERLOG": "UPDATE devices SET adms_operlog_stamp = $3 WHERE tenant = $1 AND id = $2",
}


class Leases:
    """Which terminals this hub process has heard from lately: each is one socket of the
    terminal on this hub, for the terminal boards, until it has been silent too long."""

    def __init__(self, silent_s: float) -> None:
        self.silent_s = silent_s
        self._seen: dict[tuple[str, str], tuple[str, float]] = {}

    def seen(self, terminal: Terminal, now: float) -> bool:
        """Note a request; True when the terminal was not online here before."""
        key = (terminal.tenant, terminal.device)
        new = key not in self._seen
        self._seen[key] = (terminal.site, now)
        return new

    def expired(self, now: float) -> list[tuple[str, str]]:
        """The (tenant, device) silent for longer than ``silent_s``, now forgotten."""
        gone = [key for key, (_, at) in self._seen.items() if now - at > self.silent_s]
        for key in gone:
            del self._seen[key]
        return gone

    def held(self) -> list[tuple[str, str, str]]:
        """(tenant, device, site) of every terminal online here."""
        return [(tenant, device, site) for (tenant, device), (site, _) in self._seen.items()]


class AdmsEndpoints:
    """The /iclock routes of one hub process."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.leases = Leases(hub.settings.adms_offline_after_s)
        self._lookups: dict[str, tuple[Terminal | None, float]] = {}

    async def watch(self) -> None:
        """Takes terminals that went silent off the boards, for as long as the hub runs."""
        while True:
            await asyncio.sleep(min(1.0, self.leases.silent_s / 4))
            now = datetime.now(UTC)
            for tenant, device in self.leases.expired(time.monotonic()):
                self.hub.presence(TerminalDisconnected(tenant, device, self.hub.run_id, now))

    async def cdata_get(self, request: Request) -> Response:
        return await _unless_down(self._cdata_get(request))

    async def cdata_post(self, request: Request) -> Response:
        return await _unless_down(self._cdata_post(request))

    async def poll(self, request: Request) -> Response:
        """``getrequest`` (no commands to give), ``devicecmd`` (results: noted) and ``ping``."""
        return await _unless_down(self._poll(request))

    async def _cdata_get(self, request: Request) -> Response:
        terminal = await self._terminal(request, fresh=True)
        if terminal is None:
            return _unknown()
        stamps = (terminal.attlog_stamp, terminal.operlog_stamp)
        body = handshake(
            request.query_params["SN"], stamps, self.hub.settings.adms_delay_s, terminal.zone
        )
        return PlainTextResponse(body, media_type=TEXT)

    async def _cdata_post(self, request: Request) -> Response:
        terminal = await self._terminal(request, fresh=True)
        if terminal is None:
            return _unknown()
        body = await self._body(request)
        if body is None:
            return PlainTextResponse("ERROR: the upload is too large", 413, media_type=TEXT)
        table = request.query_params.get("table", "").upper()
        stamp = request.query_params.get("Stamp")
        if table == "ATTLOG":
            answered = await self._attlog(terminal, body)
            if answered is None:
                return _again()
        else:
            answered = None
        if table in _STAMP_SQL and stamp is not None and _STAMP.fullmatch(stamp):
            async with self.hub.system_pool.acquire() as conn:
                await conn.execute(_STAMP_SQL[table], terminal.tenant, terminal.device, stamp)
        return PlainTextResponse("OK" if answered is None else f"OK:{answered}", media_type=TEXT)

    async def _poll(self, request: Request) -> Response:
        if await self._terminal(request) is None:
            return _unknown()
        return PlainTextResponse("OK", media_type=TEXT)

    async def _terminal(self, request: Request, *, fresh: bool = False) -> Terminal | None:
        """The registered terminal the request's ``SN`` names, if any. Polls read it from a
        cache of ``LOOKUP_TTL_S``; ``fresh`` (handshakes and uploads) from the database."""
        sn = request.query_params.get("SN", "")
        if not sn or len(sn) > 64:
            return None
        now = time.monotonic()
        cached = self._lookups.get(sn)
        if cached is not None and not fresh and now - cached[1] < LOOKUP_TTL_S:
            terminal = cached[0]
        else:
            async with self.hub.system_pool.acquire() as conn:
                row = await conn.fetchrow(_TERMINAL_SQL, sn)
            terminal = None
            if row is not None:
                terminal = Terminal(
                    row["tenant"],
                    row["id"],
                    row["site"],
                    ZoneInfo(row["timezone"]),
                    row["adms_attlog_stamp"],
                    row["adms_operlog_stamp"],
                )
            if len(self._lookups) >= LOOKUP_MAX:
                self._lookups.clear()
            self._lookups[sn] = (terminal, now)
        if terminal is None:
            return None
        if self.leases.seen(terminal, time.monotonic()):
            self.hub.presence(
                TerminalConnected(
                    terminal.tenant,
                    terminal.device,
                    terminal.site,
                    self.hub.run_id,
                    datetime.now(UTC),
                )
            )
        return terminal

    async def _body(self, request: Request) -> str | None:
        limit = self.hub.settings.max_body_bytes
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace")

    async def _attlog(self, terminal: Terminal, body: str) -> int | None:
        """Stores the upload; how many lines it had, or None if it must come again."""
        records, bad = parse_attlog(body, terminal.zone)
        received = datetime.now(UTC)
        async with store.tenant_transaction(self.hub.pool, terminal.tenant) as conn:
            rows = await conn.fetch(_RESOLVE_SQL, terminal.tenant, [r.pin for r in records])
        by_id = {row["id"]: row["id"] for row in rows}
        # A PIN is a badge first, an employee id second.
        by_pin = {**by_id, **{row["badge"]: row["id"] for row in rows if row["badge"]}}
        # As for any punch: more than 5 minutes ahead of the hub's clock is refused.
        ahead = [r for r in records if r.at - received > FUTURE_TOLERANCE]
        known = [r for r in records if r.pin in by_pin and r not in ahead]
        requests = [
            PunchRequest(
                tenant=terminal.tenant,
                id=uuid.uuid5(PUNCH_NAMESPACE, f"{terminal.tenant}\n{terminal.device}\n{r.key}"),
                kind=r.kind,
                at=r.at,
                received_at=received,
                source="adms",
                employee=by_pin[r.pin],
                site=terminal.site,
                device=terminal.device,
                method=r.method,
                offline=received - r.at > REALTIME_WITHIN,
            )
            for r in known
        ]
        outcomes = await self._commit(requests)
        if outcomes is None:
            return None
        alerts = [_bad_line(terminal, b, received) for b in bad]
        alerts += [
            _unknown_pin(terminal, r, received)
            for r in records
            if r.pin not in by_pin and r not in ahead
        ]
        alerts += [
            _bad_line(terminal, BadLine(r.line, _AHEAD.format(at=format_time(r.at))), received)
            for r in ahead
        ]
        alerts += [
            _bad_line(terminal, BadLine(r.line, f"refused: {outcome.reason}"), received)
            for r, outcome in zip(known, outcomes, strict=True)
            if outcome.status == "rejected"
        ]
        if alerts:
            await self._raise(terminal.tenant, alerts)
        return len(records) + len(bad)

    async def _commit(self, requests: list[PunchRequest]) -> list[PunchOutcome] | None:
        """Every request through the broker; None if any was not stored (resend it all)."""
        if self.hub.draining:
            return None
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[PunchOutcome | Exception]] = []
        for request in requests:
            future: asyncio.Future[PunchOutcome | Exception] = loop.create_future()
            waiting.append(future)
            self.hub.broker.enqueue(request, _resolver(future))
        answers = await asyncio.gather(*waiting)
        outcomes = [a for a in answers if isinstance(a, PunchOutcome)]
        if len(outcomes) < len(answers):
            failed = next(a for a in answers if isinstance(a, Exception))
            log.warning("an ADMS upload was not stored (%r); the terminal will resend it", failed)
            return None
        return outcomes

    async def _raise(self, tenant: str, alerts: list[Alert]) -> None:
        async with store.tenant_transaction(self.hub.pool, tenant) as conn:
            new = await store_alerts(conn, alerts, [None] * len(alerts))
        if new:
            self.hub.presence(AlertsRaised(new))


def _resolver(
    future: asyncio.Future[PunchOutcome | Exception],
) -> Callable[[PunchOutcome | Exception], None]:
    def reply(outcome: PunchOutcome | Exception) -> None:
        if not future.done():
            future.set_result(outcome)

    return reply


def _bad_line(terminal: Terminal, bad: BadLine, now: datetime) -> Alert:
    return Alert(
        tenant=terminal.tenant,
        id=uuid.uuid5(
            ALERT_NAMESPACE, f"{terminal.tenant}/bad_record/{terminal.device}/{bad.line}"
        ),
        kind="bad_record",
        severity="warning",
        employee=None,
        site=terminal.site,
        at=now,
        message=f"terminal {terminal.device} sent a record the hub could not store: {bad.reason}",
        detail={"device": terminal.device, "line": bad.line, "reason": bad.reason},
        raised_at=now,
    )


def _unknown_pin(terminal: Terminal, record: Record, now: datetime) -> Alert:
    key = f"{terminal.tenant}/unknown_pin/{terminal.device}/{record.key}"
    return Alert(
        tenant=terminal.tenant,
        id=uuid.uuid5(ALERT_NAMESPACE, key),
        kind="unknown_pin",
        severity="warning",
        employee=None,
        site=terminal.site,
        at=record.at,
        message=(
            f"terminal {terminal.device} recorded PIN {record.pin} ({record.kind}), "
            "which is no employee's badge or id: not stored"
        ),
        detail={
            "device": terminal.device,
            "pin": record.pin,
            "kind": record.kind,
            "time": format_time(record.at),
            "line": record.line,
        },
        raised_at=now,
    )


async def _unless_down(answer: Awaitable[Response]) -> Response:
    """The answer, or 503 when the database cannot be reached (the terminal tries again)."""
    try:
        return await answer
    except CONNECTION_ERRORS as exc:
        log.warning("an iclock request failed (%r); the terminal will try again", exc)
        return _again()


def _again() -> Response:
    return PlainTextResponse("ERROR: not stored, send it again", 503, media_type=TEXT)


def _unknown() -> Response:
    return PlainTextResponse(
        "Unauthorized: this serial number is not registered (PUT /v1/devices with adms_sn)",
        401,
        media_type=TEXT,
    )
