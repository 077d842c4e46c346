"""REST endpoints (PROTOCOL §3): JSON in and out, errors as ``{"error": {code, message}}``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import io
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from hub import store
from hub.auth import DeviceState
from hub.events import (
    DeviceKnown,
    DeviceRemoved,
    EmployeeErased,
    EmployeeRenamed,
    GraceSet,
    PunchesCommitted,
    ShiftsPlanned,
)
from hub.live import snapshot_frame
from hub.presence import DEFAULT_GRACE, Shift
from hub.protocol import (
    AwareTime,
    Badge,
    EntityId,
    Geo,
    PunchKind,
    PunchMethod,
    format_time,
    is_entity_id,
)
from hub.tokens import ROLES, Claims, Role, TokenError
from hub.types import Conn
from workers.persist import FUTURE_TOLERANCE, PunchRequest, store_punches
from workers.timesheets import Day, timesheet
from workers.timesheets import Punch as TimedPunch
from workers.timesheets import Rules as TimesheetRules

if TYPE_CHECKING:
    from hub.app import Hub

T = TypeVar("T")

DEVICE_TOKEN_TTL_S = 365 * 24 * 3600
MAX_TOKEN_TTL_S = 400 * 24 * 3600
MAX_PAGE = 10_000
DEFAULT_PAGE = 1000
MAX_AUDIT_PAGE = 1000
DEFAULT_AUDIT_PAGE = 100
MAX_AUDIT_FILTER = 200
DEFAULT_ALERTS = 100
MAX_ALERTS = 1000
# The longest period one timesheet request covers.
MAX_TIMESHEET_DAYS = 92

_STATUS_CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    429: "rate_limited",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _STATUS_CODES[status]
        self.message = message


_encoder = msgspec.json.Encoder()


def json_response(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


def error_response(exc: ApiError) -> Response:
    return json_response({"error": {"code": exc.code, "message": exc.message}}, exc.status)


def _valid_timezone(name: str) -> str:
    # A directory of the zone database ("Europe") is IsADirectoryError with some zoneinfo
    # sources (the tzdata package), ZoneInfoNotFoundError with others.
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ApiError(
            400, f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin"
        ) from None
    return name


class Policy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    overtime: Literal["flsa", "california", "none"] | None = None
    workweek_start: (
        Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] | None
    ) = None
    rounding_minutes: Literal[0, 5, 6, 15] | None = None
    geofence: Literal["off", "flag", "enforce"] | None = None
    eu_wtd: bool | None = None
    grace_minutes: Annotated[int, msgspec.Meta(ge=0, le=240)] | None = None


class SiteBody(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    timezone: str
    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)] | None = None
    lon: Annotated[float, msgspec.Meta(ge=-180, le=180)] | None = None
    radius_m: Annotated[float, msgspec.Meta(gt=0, le=100_000)] | None = None
    policy: Policy = msgspec.field(default_factory=Policy)


class EmployeeBody(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    site: EntityId
    badge: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None


class ShiftBody(msgspec.Struct, forbid_unknown_fields=True):
    site: EntityId
    start: AwareTime
    end: AwareTime


# Shifts one PUT may plan for an employee, and how long one shift may be.
MAX_SHIFTS: Final = 1000
MAX_SHIFT: Final = timedelta(hours=24)


class DeviceBody(msgspec.Struct, forbid_unknown_fields=True):
    site: EntityId
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    adms_sn: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None


SiteOrAll = Annotated[str, msgspec.Meta(pattern=r"^(\*|[A-Za-z0-9._-]{1,64})$")]


class CorrectionBody(msgspec.Struct, forbid_unknown_fields=True):
    """A punch as on the socket, plus why it is entered by hand."""

    id: uuid.UUID
    kind: PunchKind
    at: AwareTime
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    type: Literal["punch"] | None = None
    employee: EntityId | None = None
    badge: Badge | None = None
    # Where the punch counts; the employee's home site when not given.
    site: EntityId | None = None
    method: PunchMethod | None = None
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    geo: Geo | None = None
    offline: bool = False


class TokenBody(msgspec.Struct, forbid_unknown_fields=True):
    role: Role
    sub: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    employee: EntityId | None = None
    sites: list[SiteOrAll] | None = None
    ttl_s: Annotated[int, msgspec.Meta(ge=60, le=MAX_TOKEN_TTL_S)] | None = None


class Api:
    """The REST routes, bound to one hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    # -- plumbing ---------------------------------------------------------

    async def claims(self, request: Request, *roles: Role) -> Claims:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "send `Authorization: Bearer <token>`")
        try:
            claims = self.hub.auth.verify(token.strip())
        except TokenError as exc:
            raise ApiError(401, str(exc)) from None
        if not await self.hub.tenant_exists(claims.tenant):
            raise ApiError(401, f"the token's tenant {claims.tenant!r} does not exist")
        if roles and claims.role not in roles:
            raise ApiError(403, f"a {claims.role} token may not do this")
        return claims

    async def body(self, request: Request, kind: type[T]) -> T:
        limit = self.hub.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the body is larger than {limit} bytes")
            chunks.append(chunk)
        try:
            decoded = msgspec.json.decode(b"".join(chunks), type=kind)
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"invalid body: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if _has_nul(msgspec.to_builtins(decoded)):
            # PostgreSQL text cannot hold U+0000.
            raise ApiError(400, "text in the body may not contain the NUL character (\\u0000)")
        return decoded

    def path_id(self, request: Request, name: str) -> str:
        value: str = request.path_params[name]
        try:
            return msgspec.convert(value, EntityId)
        except msgspec.ValidationError:
            raise ApiError(400, f"{name} ids are 1-64 of A-Z a-z 0-9 . _ -") from None

    async def audit(
        self,
        conn: Any,
        request: Request,
        claims: Claims,
        action: str,
        target: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:
        await store.record_audit(
            conn,
            tenant=claims.tenant,
            actor=claims.sub,
            role=claims.role,
            action=action,
            target=target,
            ip=request.client.host if request.client else None,
            user_agent=request.headers.get("user-agent"),
            before=before,
            after=after,
        )

    # -- sites, employees, devices -----------------------------------------

    async def put_site(self, request: Request) -> Response:
        claims = await self.claims(request, "admin")
        site = self.path_id(request, "site")
        body = await self.body(request, SiteBody)
        _valid_timezone(body.timezone)
        values = msgspec.to_builtins(body)
        values.setdefault("policy", {})
        for key in ("lat", "lon", "radius_m"):
            values.setdefault(key, None)
        if (values["lat"] is None) != (values["lon"] is None):
            raise ApiError(400, "give both `lat` and `lon`, or neither")
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            before = await store.get_row(
                conn, "sites", store.SITE_COLUMNS, claims.tenant, site, lock=True
            )
            await store.upsert_site(conn, claims.tenant, site, values)
            after = await store.get_row(conn, "sites", store.SITE_COLUMNS, claims.tenant, site)
            await self.audit(conn, request, claims, "site.put", f"site:{site}", before, after)
        minutes = body.policy.grace_minutes
        grace = DEFAULT_GRACE if minutes is None else timedelta(minutes=minutes)
        self.hub.presence(GraceSet(claims.tenant, site, grace.total_seconds(), _now()))
        return json_response(after, 201 if before is None else 200)

    async def get_site(self, request: Request) -> Response:
        claims = await self.claims(request, "admin", "supervisor")
        site = self.path_id(request, "site")
        if not claims.sees_site(site):
            raise ApiError(403, f"this token does not cover site {site!r}")
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            row = await store.get_row(conn, "sites", store.SITE_COLUMNS, claims.tenant, site)
        if row is None:
            raise ApiError(404, f"no site {site!r}")
        return json_response(row)

    async def list_sites(self, request: Request) -> Response:
        claims = await self.claims(request, "admin", "supervisor")
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            rows = await store.list_rows(conn, "sites", store.SITE_COLUMNS, claims.tenant)
        return json_response({"sites": [r for r in rows if claims.sees_site(r["id"])]})

    async def put_employee(self, request: Request) -> Response:
        claims = await self.claims(request, "admin")
        employee = self.path_id(request, "employee")
        body = await self.body(request, EmployeeBody)
        values = {"name": body.name, "site": body.site, "badge": body.badge}
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            erased = await store.get_row(conn, "employees", "erased_at", claims.tenant, employee)
        if erased is not None and erased["erased_at"] is not None:
            raise ApiError(
                409, f"employee {employee!r} was erased; give the person a new id", "erased"
            )
        after, created = await self._put_audited(
            request,
            claims,
            "employees",
            store.EMPLOYEE_COLUMNS,
            employee,
            body.site,
            store.upsert_employee,
            values,
            f"badge {body.badge!r} belongs to another employee",
        )
        # Committed: a floor showing the employee shows the new name.
        self.hub.presence(EmployeeRenamed(claims.tenant, employee, body.name))
        return json_response(after, 201 if created else 200)

    async def _put_audited(
        self,
        request: Request,
        claims: Claims,
        table: str,
        columns: str,
        entity: str,
        site: str,
        upsert: Callable[[Conn, str, str, dict[str, Any]], Awaitable[None]],
        values: dict[str, Any],
        taken: str,
    ) -> tuple[dict[str, Any] | None, bool]:
        """Create or replace an employee or a device at a site, audited.

        A badge or serial number that another row holds is a 409.
        """
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            if await store.get_row(conn, "sites", "id", claims.tenant, site) is None:
                raise ApiError(400, f"no site {site!r}; create it first", "unknown_site")
            before = await store.get_row(conn, table, columns, claims.tenant, entity, lock=True)
            try:
                # A savepoint, so that a badge or serial number taken by another row is a 409.
                async with conn.transaction():
                    await upsert(conn, claims.tenant, entity, values)
            except asyncpg.UniqueViolationError:
                raise ApiError(409, taken) from None
            after = await store.get_row(conn, table, columns, claims.tenant, entity)
            kind = table.removesuffix("s")
            await self.audit(
                conn, request, claims, f"{kind}.put", f"{kind}:{entity}", before, after
            )
        return after, before is None

    async def get_employee(self, request: Request) -> Response:
        claims = await self.claims(request, "admin", "supervisor")
        employee = self.path_id(request, "employee")
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            row = await store.get_row(
                conn, "employees", store.EMPLOYEE_COLUMNS + ", erased_at", claims.tenant, employee
            )
        if row is None or row.pop("erased_at") is not None or not claims.sees_site(row["site"]):
            raise ApiError(404, f"no employee {employee!r}")
        return json_response(row)

    async def delete_employee(self, request: Request) -> Response:
        """Erase an employee's personal data (GDPR), keeping the punch facts.

        The name and badge go from the employee's row and from every audit row about the
        employee; the id stays, because the punches, which labour law says to keep, hang
        on it. Erasing twice is harmless.
        """
        claims = await self.claims(request, "admin")
        employee = self.path_id(request, "employee")
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            row = await store.get_row(
                conn, "employees", "id, site, erased_at", claims.tenant, employee, lock=True
            )
            if row is None:
                raise ApiError(404, f"no employee {employee!r}")
            if row["erased_at"] is None:
                await store.erase_employee(conn, claims.tenant, employee)
                target = f"employee:{employee}"
                await store.redact_audit(
                    conn, claims.tenant, target=target, fields=store.ERASED_FIELDS
                )
                # The erasure's own audit row names neither.
                await self.audit(
                    conn,
                    request,
                    claims,
                    "employee.erase",
                    target,
                    {"id": employee, "site": row["site"]},
                    {"id": employee, "erased": True},
                )
            punches = await store.count_punches(conn, claims.tenant, employee)
        # Committed: off every floor, and the hub's memory of the name goes too.
        self.hub.presence(EmployeeErased(claims.tenant, employee, store.ERASED_NAME, _now()))
        return json_response({"employee": employee, "erased": True, "punches_kept": punches})

    async def list_employees(self, request: Request) -> Response:
        claims = await self.claims(request, "admin", "supervisor")
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            rows = await store.list_rows(
                conn, "employees", store.EMPLOYEE_COLUMNS, claims.tenant, "AND erased_at IS NULL"
            )
        return json_response({"employees": [r for r in rows if claims.sees_site(r["site"])]})

    async def put_device(self, request: Request) -> Response:
        claims = await self.claims(request, "admin")
        device = self.path_id(request, "device")
        body = await self.body(request, DeviceBody)
        values = {"site": body.site, "name": body.name or device, "adms_sn": body.adms_sn}
        _, created = await self._put_audited(
            request,
            claims,
            "devices",
            store.DEVICE_COLUMNS,
            device,
            body.site,
            store.upsert_device,
            values,
            f"serial number {body.adms_sn!r} is already registered",
        )
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            version = await store.device_token_version(conn, claims.tenant, device)
        assert version is not None
        # Registering a revoked device again re-activates it with its new token version.
        self.hub.devices.apply(claims.tenant, device, DeviceState(version, revoked=False))
        self.hub.presence(
            DeviceKnown(claims.tenant, device, body.site, body.name or device, _now())
        )
        token, _ = self.hub.tokens.issue(
            tenant=claims.tenant,
            role="terminal",
            sub=device,
            site=body.site,
            ttl_s=DEVICE_TOKEN_TTL_S,
            version=version,
        )
        return json_response({"device": device, "token": token}, 201 if created else 200)

    async def delete_device(self, request: Request) -> Response:
        """Revoke a device: its tokens stop working and its sockets are closed (4001)."""
        claims = await self.claims(request, "admin")
        device = self.path_id(request, "device")
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            before = await store.get_row(
                conn, "devices", store.DEVICE_COLUMNS, claims.tenant, device, lock=True
            )
            if before is None:
                raise ApiError(404, f"no device {device!r}")
            version = await store.revoke_device(conn, claims.tenant, device)
            assert version is not None
            await self.audit(
                conn, request, claims, "device.revoke", f"device:{device}", before, None
            )
        self.hub.devices.apply(claims.tenant, device, DeviceState(version, revoked=True))
        self.hub.presence(DeviceRemoved(claims.tenant, device, _now()))
        return json_response({"device": device, "revoked": True})

    async def list_devices(self, request: Request) -> Response:
        claims = await self.claims(request, "admin", "supervisor")
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            rows = await store.list_rows(conn, "devices", store.DEVICE_COLUMNS, claims.tenant)
        return json_response({"devices": [r for r in rows if claims.sees_site(r["site"])]})

    # -- tokens -------------------------------------------------------------

    async def post_token(self, request: Request) -> Response:
        claims = await self.claims(request, "admin")
        body = await self.body(request, TokenBody)
        if body.role not in ROLES:
            raise ApiError(400, f"role must be one of {', '.join(ROLES)}")
        site = None
        version = None
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            if body.role == "terminal":
                device = await store.get_row(
                    conn, "devices", "id, site, token_version, revoked_at", claims.tenant, body.sub
                )
                if device is None:
                    raise ApiError(
                        400, f"no device {body.sub!r}; a terminal's `sub` is its device id"
                    )
                if device["revoked_at"] is not None:
                    raise ApiError(
                        409, f"device {body.sub!r} is revoked; register it again with PUT"
                    )
                site = device["site"]
                version = device["token_version"]
            if body.role == "employee":
                employee = body.employee or body.sub
                row = await store.get_row(
                    conn, "employees", "id, erased_at", claims.tenant, employee
                )
                if row is None or row["erased_at"] is not None:
                    raise ApiError(400, f"no employee {employee!r}", "unknown_employee")
            if body.role == "supervisor":
                for wanted in body.sites or []:
                    if (
                        wanted != "*"
                        and await store.get_row(conn, "sites", "id", claims.tenant, wanted) is None
                    ):
                        raise ApiError(400, f"no site {wanted!r}", "unknown_site")
            await self.audit(
                conn,
                request,
                claims,
                "token.issue",
                f"{body.role}:{body.sub}",
                None,
                {"role": body.role, "sub": body.sub, "ttl_s": body.ttl_s},
            )
        token, exp = self.hub.tokens.issue(
            tenant=claims.tenant,
            role=body.role,
            sub=body.sub,
            ttl_s=body.ttl_s or (DEVICE_TOKEN_TTL_S if body.role == "terminal" else 24 * 3600),
            site=site,
            sites=(body.sites or []) if body.role == "supervisor" else None,
            employee=(body.employee or body.sub) if body.role == "employee" else None,
            version=version,
        )
        expires_at = format_time(datetime.fromtimestamp(exp, UTC))
        return json_response({"token": token, "expires_at": expires_at}, 201)

    # -- punches --------------------------------------------------------------

    async def post_punch(self, request: Request) -> Response:
        """A manual correction: a new punch entered by a supervisor or admin, audited.

        It never changes a stored punch: it is stored beside the original under its own
        id, with `source` manual, its `reason` and the correcting `actor`.
        """
        claims = await self.claims(request, "admin", "supervisor")
        body = await self.body(request, CorrectionBody)
        if (body.employee is None) == (body.badge is None):
            raise ApiError(400, "give exactly one of `employee` or `badge`")
        now = datetime.now(UTC)
        try:
            late_by = body.at.astimezone(UTC) - now
        except OverflowError:
            raise ApiError(400, "`at` has no UTC instant", "invalid_time") from None
        if late_by > FUTURE_TOLERANCE:
            raise ApiError(400, "`at` is more than 5 minutes ahead of the server", "invalid_time")
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            employee = await store.find_employee(conn, claims.tenant, body.employee, body.badge)
            if employee is None:
                raise ApiError(400, "no such employee", "unknown_employee")
            site = body.site or employee["site"]
            if body.site and await store.get_row(conn, "sites", "id", claims.tenant, site) is None:
                raise ApiError(400, f"no site {site!r}", "unknown_site")
            if not claims.sees_site(site):
                raise ApiError(403, f"site {site!r} is not one of this supervisor's")
            geo = body.geo
            punch = PunchRequest(
                tenant=claims.tenant,
                id=body.id,
                kind=body.kind,
                at=body.at,
                received_at=now,
                source="manual",
                employee=employee["id"],
                site=site,
                method=body.method or "manual",
                seq=body.seq,
                lat=geo.lat if geo else None,
                lon=geo.lon if geo else None,
                accuracy_m=geo.accuracy_m if geo else None,
                offline=body.offline,
                reason=body.reason,
                actor=claims.sub,
            )
            [outcome] = await store_punches(conn, [punch])
            answer: dict[str, Any] = {
                "id": str(body.id),
                "status": outcome.status,
                "received_at": format_time(outcome.received_at),
                "employee": employee["id"],
                "site": site,
            }
            if outcome.reason == "id_conflict":
                raise ApiError(409, f"punch {body.id} is stored with other details", "id_conflict")
            if outcome.status == "accepted":
                await self.audit(
                    conn,
                    request,
                    claims,
                    "punch.correct",
                    f"punch:{body.id}",
                    None,
                    {
                        **answer,
                        "kind": body.kind,
                        "at": format_time(body.at),
                        "reason": body.reason,
                    },
                )
        if outcome.status == "accepted":
            # Committed with the audit row: now the floor may change.
            self.hub.presence(PunchesCommitted([(punch, outcome)], _now()))
        return json_response(answer, 201 if outcome.status == "accepted" else 200)

    # -- schedules ------------------------------------------------------------

    async def put_schedule(self, request: Request) -> Response:
        """Replace an employee's planned shifts (they decide who is late); audited."""
        claims = await self.claims(request, "admin")
        employee = self.path_id(request, "employee")
        shifts = await self.body(request, list[ShiftBody])
        if len(shifts) > MAX_SHIFTS:
            raise ApiError(400, f"at most {MAX_SHIFTS} shifts at once")
        planned: list[tuple[str, datetime, datetime]] = []
        for n, shift in enumerate(shifts):
            try:
                start, end = shift.start.astimezone(UTC), shift.end.astimezone(UTC)
            except OverflowError:
                raise ApiError(400, f"shift {n}: a time has no UTC instant") from None
            if not start < end <= start + MAX_SHIFT:
                raise ApiError(400, f"shift {n}: `end` must be after `start`, within 24 hours")
            planned.append((shift.site, start, end))
        planned.sort(key=lambda shift: shift[1])
        for earlier, later in pairwise(planned):
            if later[1] < earlier[2]:
                raise ApiError(400, f"shifts starting {format_time(earlier[1])} and "
                               f"{format_time(later[1])} overlap")  # fmt: skip
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            row = await store.get_row(
                conn, "employees", "name, erased_at", claims.tenant, employee, lock=True
            )
            if row is None:
                raise ApiError(404, f"no employee {employee!r}")
            if row["erased_at"] is not None:
                raise ApiError(409, f"employee {employee!r} was erased", "erased")
            for site in {shift[0] for shift in planned}:
                if await store.get_row(conn, "sites", "id", claims.tenant, site) is None:
                    raise ApiError(400, f"no site {site!r}", "unknown_site")
            before = await store.get_schedule(conn, claims.tenant, employee)
            await store.replace_schedule(conn, claims.tenant, employee, planned)
            after = [
                {"site": s, "start": format_time(a), "end": format_time(b)} for s, a, b in planned
            ]
            await self.audit(
                conn,
                request,
                claims,
                "schedule.put",
                f"employee:{employee}",
                {"shifts": [_shift_json(shift) for shift in before]},
                {"shifts": after},
            )
        # Committed: from now on these shifts decide whether the employee is late.
        planned_shifts = [Shift(site, start, end) for site, start, end in planned]
        self.hub.presence(
            ShiftsPlanned(claims.tenant, employee, row["name"], planned_shifts, _now())
        )
        return json_response({"employee": employee, "shifts": after})

    # -- presence -------------------------------------------------------------

    async def get_presence(self, request: Request) -> Response:
        """The snapshot a `presence:<site>` subscriber gets."""
        claims = await self.claims(request, "admin", "supervisor", "terminal")
        site = self.path_id(request, "site")
        if not claims.sees_site(site):
            raise ApiError(403, f"this token may not read the presence of site {site!r}")
        if not await self.hub.site_exists(claims.tenant, site):
            raise ApiError(404, f"no site {site!r}")
        snapshot = snapshot_frame(self.hub.live.floor(claims.tenant).snapshot(site))
        return Response(msgspec.json.encode(snapshot), media_type="application/json")

    async def list_punches(self, request: Request) -> Response:
        claims = await self.claims(request, "admin", "supervisor", "employee")
        query = request.query_params
        employee, site, sites = _scope(claims, query, "punches")
        limit = _int_param(query.get("limit"), "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        start = _time_param(query.get("from"), "from")
        end = _time_param(query.get("to"), "to")
        after = _decode_cursor(query["after"]) if "after" in query else None
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            rows = await store.list_punches(
                conn,
                claims.tenant,
                employee=employee,
                site=site,
                sites=sites,
                start=start,
                end=end,
                after=after,
                limit=limit + 1,
            )
        page = rows[:limit]
        punches = [_punch_json(r) for r in page]
        body: dict[str, Any] = {"punches": punches}
        if len(rows) > limit:
            last = page[-1]
            body["next"] = _encode_cursor(last["at"], str(last["id"]))
        return json_response(body)

    # -- timesheets -----------------------------------------------------------

    async def timesheets(self, request: Request) -> Response:
        claims = await self.claims(request, "admin", "supervisor", "employee")
        query = request.query_params
        first, last = _date_param(query.get("from"), "from"), _date_param(query.get("to"), "to")
        if last < first:
            raise ApiError(400, "`to` is before `from`")
        if (last - first).days >= MAX_TIMESHEET_DAYS:
            raise ApiError(400, f"a timesheet covers at most {MAX_TIMESHEET_DAYS} days")
        employee, site, sites = _scope(claims, query, "timesheet")
        # From two days before the first workweek concerned (a night shift into it, and
        # the hours that count towards its weekly overtime), to two days after.
        start = datetime.combine(first - timedelta(days=9), time(0), UTC)
        end = datetime.combine(last + timedelta(days=2), time(0), UTC)
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            employees = await store.timesheet_employees(
                conn, claims.tenant, employee=employee, site=site, sites=sites
            )
            rows = await store.punches_between(
                conn, claims.tenant, [e["id"] for e in employees], start, end
            )
        punches: dict[str, list[TimedPunch]] = {}
        for row in rows:
            punches.setdefault(row["employee"], []).append(
                TimedPunch(row["at"], row["kind"], tuple(row["flags"]))
            )
        now = _now()

        def work_out() -> list[tuple[str, Day]]:
            return [
                (found["id"], day)
                for found in employees
                for day in timesheet(
                    punches.get(found["id"], []),
                    TimesheetRules.from_policy(found["timezone"], found["policy"]),
                    now,
                )
                if first <= day.date <= last
            ]

        # A quarter of a large tenant is seconds of work: not on the event loop, where
        # every socket of this hub waits on it.
        sheet = await asyncio.to_thread(work_out)
        if "text/csv" in request.headers.get("accept", ""):
            return _timesheet_csv(sheet)
        return json_response({"rows": [_timesheet_json(employee, day) for employee, day in sheet]})

    # -- alerts ----------------------------------------------------------------

    async def list_alerts(self, request: Request) -> Response:
        claims = await self.claims(request, "admin", "supervisor", "employee")
        query = request.query_params
        employee, site, sites = _scope(claims, query, "alerts")
        limit = _int_param(query.get("limit"), "limit", DEFAULT_ALERTS, 1, MAX_ALERTS)
        since = _time_param(query.get("since"), "since")
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            rows = await store.list_alerts(
                conn,
                claims.tenant,
                site=site,
                sites=sites,
                employee=employee,
                since=since,
                limit=limit,
            )
        return json_response({"alerts": [_alert_json(row) for row in rows]})

    # -- audit log ------------------------------------------------------------

    async def list_audit(self, request: Request) -> Response:
        claims = await self.claims(request, "admin")
        query = request.query_params
        for name in ("action", "target"):
            value = query.get(name)
            if value is not None and not 1 <= len(value) <= MAX_AUDIT_FILTER:
                raise ApiError(400, f"`{name}` must be 1 to {MAX_AUDIT_FILTER} characters")
            if value is not None and _has_nul(value):
                raise ApiError(400, f"`{name}` may not contain the NUL character")
        limit = _int_param(query.get("limit"), "limit", DEFAULT_AUDIT_PAGE, 1, MAX_AUDIT_PAGE)
        after = _int_param(query.get("after"), "after", 0, 0, 2**63 - 1)
        async with store.tenant_transaction(self.hub.pool, claims.tenant) as conn:
            rows = await store.list_audit(
                conn,
                claims.tenant,
                since=_time_param(query.get("since"), "since"),
                action=query.get("action"),
                target=query.get("target"),
                after=after,
                limit=limit + 1,
            )
        page = rows[:limit]
        body: dict[str, Any] = {"entries": [_audit_json(r) for r in page]}
        if len(rows) > limit:
            body["next"] = page[-1]["seq"]
        return json_response(body)

    # -- health -------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        problems = await self.hub.readiness_problems()
        if problems:
            return json_response(
                {
                    "status": "unavailable",
                    "error": {"code": "not_ready", "message": "; ".join(problems)},
                },
                503,
            )
        return json_response({"status": "ready"})


def _scope(
    claims: Claims, query: Any, what: str
) -> tuple[str | None, str | None, list[str] | None]:
    """The ``employee`` and ``site`` a read asks for, and the sites a supervisor is held to.

    An employee token reads only its own; a supervisor only its sites (asking for another
    is 403).
    """
    employee, site = query.get("employee"), query.get("site")
    for name, value in (("employee", employee), ("site", site)):
        if value is not None and not is_entity_id(value):
            raise ApiError(400, f"`{name}` is not a valid id")
    if claims.role == "employee":
        if employee not in (None, claims.employee):
            raise ApiError(403, f"an employee token reads only its own {what}")
        employee = claims.employee
    sites: list[str] | None = None
    if claims.role == "supervisor" and "*" not in claims.sites:
        if site is not None and site not in claims.sites:
            raise ApiError(403, f"this token does not cover site {site!r}")
        sites = list(claims.sites)
    return employee, site, sites


def _int_param(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ApiError(400, f"`{name}` must be an integer from {low} to {high}")
    return int(raw)


def _time_param(raw: str | None, name: str) -> datetime | None:
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ApiError(400, f"`{name}` must be an RFC 3339 time with an offset")
    return _with_utc_instant(moment, name)


def _with_utc_instant(moment: datetime, name: str) -> datetime:
    """``moment`` if it has a UTC instant (0001-01-01T00:00+05:00 has none), else a 400."""
    try:
        moment.astimezone(UTC)
    except OverflowError:
        raise ApiError(400, f"`{name}` is outside the range of UTC times") from None
    return moment


def _alert_json(row: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(row["id"]),
        "kind": row["kind"],
        "severity": row["severity"],
        "at": format_time(row["at"]),
        "message": row["message"],
        "detail": row["detail"],
        "raised_at": format_time(row["raised_at"]),
    }
    for key in ("employee", "site"):
        if row[key] is not None:
            body[key] = row[key]
    return body


def _date_param(raw: str | None, name: str) -> date:
    if raw is None:
        raise ApiError(400, f"`{name}` is required: a date such as 2026-11-30")
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, f"`{name}` must be a date such as 2026-11-30") from None


TIMESHEET_COLUMNS: Final = (
    "employee",
    "date",
    "worked_minutes",
    "regular_minutes",
    "overtime_minutes",
    "double_time_minutes",
    "break_minutes",
    "flags",
)


def _timesheet_json(employee: str, day: Day) -> dict[str, Any]:
    return {
        "employee": employee,
        "date": day.date.isoformat(),
        "worked_minutes": day.worked_minutes,
        "regular_minutes": day.regular_minutes,
        "overtime_minutes": day.overtime_minutes,
        "double_time_minutes": day.double_time_minutes,
        "break_minutes": day.break_minutes,
        "flags": day.flags,
    }


def _timesheet_csv(sheet: list[tuple[str, Day]]) -> Response:
    """The rows as CSV (RFC 4180, a header first); a day's flags joined by ``;``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(TIMESHEET_COLUMNS)
    for employee, day in sheet:
        row = _timesheet_json(employee, day)
        writer.writerow([*(row[c] for c in TIMESHEET_COLUMNS[:-1]), ";".join(day.flags)])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8")


def _encode_cursor(at: datetime, punch_id: str) -> str:
    raw = f"{at.astimezone(UTC).isoformat()}|{punch_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at_text, punch_id = raw.split("|", 1)
        at = _with_utc_instant(datetime.fromisoformat(at_text), "after")
        return at, str(uuid.UUID(punch_id))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "`after` is not a cursor this API returned") from None


def _shift_json(row: Any) -> dict[str, Any]:
    return {
        "site": row["site"],
        "start": format_time(row["starts_at"]),
        "end": format_time(row["ends_at"]),
    }


def _punch_json(row: Any) -> dict[str, Any]:
    punch = {
        "id": str(row["id"]),
        "employee": row["employee"],
        "kind": row["kind"],
        "at": format_time(row["at"]),
        "received_at": format_time(row["received_at"]),
        "site": row["site"],
        "source": row["source"],
        "flags": list(row["flags"]),
    }
    if row["device"] is not None:
        punch["device"] = row["device"]
    if row["method"] is not None:
        punch["method"] = row["method"]
    return punch


def _audit_json(row: Any) -> dict[str, Any]:
    entry = {
        "seq": row["seq"],
        "at": format_time(row["at"]),
        "actor": row["actor"],
        "role": row["role"],
        "action": row["action"],
        "target": row["target"],
        "ip": row["ip"],
        "user_agent": row["user_agent"],
        "before": row["before"],
        "after": row["after"],
        "hash": row["hash"],
    }
    if row["redacted_at"] is not None:
        entry["redacted_at"] = format_time(row["redacted_at"])
    return entry


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def _now() -> datetime:
    return datetime.now(UTC)
