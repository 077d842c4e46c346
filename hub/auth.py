"""Who a token speaks for, and whether it still may: signatures plus revoked devices.

A terminal's token is only as good as its device: revoking the device raises
its token version in the database, which retires every token issued before.
Each hub process keeps the versions in memory (``DeviceRegistry``), applies its
own changes at once and reads everyone else's every ``REFRESH_S`` seconds, so a
revocation reaches every process within seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final, NamedTuple

import asyncpg

from hub.tokens import Claims, TokenError, TokenIssuer
from hub.types import Conn

log = logging.getLogger(__name__)

REFRESH_S: Final = 2.0
# Rows are read back this far behind the newest change seen: `updated_at` is the time its
# transaction began, and a transaction that began earlier may commit later.
_OVERLAP: Final = timedelta(seconds=30)


class DeviceState(NamedTuple):
    version: int
    revoked: bool


class DeviceRegistry:
    """Each device's current token version and whether it is revoked.

    ``on_retired`` is called with (tenant, device, version) whenever a device is
    revoked or its version rises, so that its open sockets can be closed.
    """

    def __init__(self, on_retired: Callable[[str, str, int], None]) -> None:
        self._devices: dict[tuple[str, str], DeviceState] = {}
        self._on_retired = on_retired
        self._seen_up_to: datetime | None = None

    def problem(self, claims: Claims) -> str | None:
        """Why ``claims`` may no longer act, or None.

        A device this process has not heard of yet passes: tokens are only issued
        for registered devices, and the next refresh will bring it.
        """
        if claims.role != "terminal":
            return None
        state = self._devices.get((claims.tenant, claims.sub))
        if state is None:
            return None
        if state.revoked:
            return "the device was revoked; register it again for a new token"
        if claims.version < state.version:
            return "the device's token was replaced; use its current token"
        return None

    def apply(self, tenant: str, device: str, state: DeviceState) -> None:
        previous = self._devices.get((tenant, device))
        self._devices[(tenant, device)] = state
        if state.revoked or (previous is not None and state.version > previous.version):
            self._on_retired(tenant, device, state.version)

    async def refresh(self, conn: Conn) -> None:
        """Read the devices changed since the last refresh (all of them the first time)."""
        since = None if self._seen_up_to is None else self._seen_up_to - _OVERLAP
        rows = await conn.fetch(
            """SELECT tenant, id, token_version, revoked_at IS NOT NULL AS revoked, updated_at
                 FROM devices WHERE $1::timestamptz IS NULL OR updated_at > $1""",
            since,
        )
        for row in rows:
            state = DeviceState(row["token_version"], row["revoked"])
            if self._devices.get((row["tenant"], row["id"])) != state:
                self.apply(row["tenant"], row["id"], state)
            if self._seen_up_to is None or row["updated_at"] > self._seen_up_to:
                self._seen_up_to = row["updated_at"]

    async def follow(self, pool: asyncpg.Pool) -> None:
        """Refresh every ``REFRESH_S`` until cancelled; a failed refresh is retried."""
        while True:
            try:
                async with pool.acquire() as conn:
                    await self.refresh(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("could not refresh device revocations: %s", exc)
            await asyncio.sleep(REFRESH_S)


class Authenticator:
    """Verifies tokens: the signature and expiry, then the device's standing."""

    def __init__(self, issuer: TokenIssuer, devices: DeviceRegistry) -> None:
        self.issuer = issuer
        self.devices = devices

    def verify(self, token: str) -> Claims:
        claims = self.issuer.verify(token)
        self.check(claims)
        return claims

    def check(self, claims: Claims) -> None:
        """Raise ``TokenError`` if claims that once verified may no longer act."""
        problem = self.devices.problem(claims)
        if problem is not None:
            raise TokenError(problem)
