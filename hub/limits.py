"""Abuse limits as plain values: token buckets, flood windows, connection counts, origins.

Nothing here reads a clock or touches a socket. Every method that depends on time
takes ``now`` in seconds (any clock that does not jump: ``time.monotonic()``, or a
timestamp in tests), so the rules are tested by feeding numbers in. The asyncio
layer (``hub/ws.py``, ``hub/app.py``) owns the clock and answers the refusals.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

# How far back refused frames are counted towards a flood.
FLOOD_WINDOW_S: Final = 10.0
# Most client addresses whose connection or request rate is remembered at once.
MAX_ADDRESSES: Final = 100_000

# `now` is often a Unix timestamp, a float with a resolution of about 0.2 us today: a client
# sending exactly at the rate must not be refused for that rounding.
_TOLERANCE_S: Final = 1e-6

_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class TokenBucket:
    """Up to ``burst`` events at once, ``rate_per_s`` sustained.

    A full bucket holds ``burst`` tokens; each event takes one, and tokens come back
    at ``rate_per_s``. A clock that goes backwards refills nothing.
    """

    __slots__ = ("_enough", "burst", "rate_per_s", "stamp", "tokens")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs a rate above 0 and a burst of at least 1")
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self._enough = 1.0 - min(0.01, _TOLERANCE_S * rate_per_s)
        # The first event refills a full bucket whatever the clock reads.
        self.stamp = float("-inf")

    def take(self, now: float) -> bool:
        """Take a token if there is one; False means the event is over the limit."""
        # The refill is written out here rather than calling _refill: this runs for every frame.
        tokens = self.tokens
        elapsed = now - self.stamp
        if elapsed > 0:
            tokens += elapsed * self.rate_per_s
            if tokens > self.burst:
                tokens = self.burst
            self.stamp = now
        if tokens >= self._enough:
            self.tokens = tokens - 1.0 if tokens > 1.0 else 0.0
            return True
        self.tokens = tokens
        return False

    def retry_after(self, now: float) -> float:
        """Seconds from ``now`` until a token is there (0 if there is one now)."""
        self._refill(now)
        return max(0.0, (1.0 - self.tokens) / self.rate_per_s)

    def full_at(self) -> float:
        """When the bucket is full again if nothing takes from it: it is then as good as new."""
        return self.stamp + (self.burst - self.tokens) / self.rate_per_s

    def _refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_s)
            self.stamp = now


class Verdict(enum.Enum):
    PASS = "pass"
    REFUSE = "refuse"
    FLOOD = "flood"


class FrameLimiter:
    """One connection's frame rate: a token bucket, and a count of what it refused.

    ``check`` says what to do with one incoming frame: process it, refuse it, or
    close the connection because more than ``flood`` frames were refused within
    ``FLOOD_WINDOW_S`` (a client that ignores ``rate_limited`` errors).
    """

    __slots__ = ("_bucket", "_refused", "burst", "flood", "rate_per_s")

    def __init__(self, rate_per_s: int, burst: int, flood: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.flood = flood
        self._bucket = TokenBucket(rate_per_s, burst)
        self._refused: list[float] = []

    def check(self, now: float) -> Verdict:
        if self._bucket.take(now):
            return Verdict.PASS
        refused = self._refused
        refused.append(now)
        while now - refused[0] > FLOOD_WINDOW_S:
            refused.pop(0)
        if len(refused) > self.flood:
            return Verdict.FLOOD
        return Verdict.REFUSE

    def retry_after(self, now: float) -> float:
        """Seconds from ``now`` until the next frame would pass (0 if it would now)."""
        return self._bucket.retry_after(now)

    def settled_at(self) -> float:
        """When this limiter is as good as new: its bucket full, its refusals out of the window."""
        refused = self._refused
        quiet = refused[-1] + FLOOD_WINDOW_S if refused else float("-inf")
        return max(self._bucket.full_at(), quiet)


class FloodMemory:
    """The limiters of connections closed for flooding, by identity, until they settle.

    A client closed with 4008 that reconnects at once must not start again from a
    full bucket and a clean record: that would let a runaway client turn every
    reconnection into another burst. Its new connection carries on with the closed
    one's limiter (``recall``), until that limiter is as good as new and is forgotten.
    At most ``max_entries`` identities are remembered; the least recently closed go first.
    """

    def __init__(self, max_entries: int = MAX_ADDRESSES) -> None:
        self.max_entries = max_entries
        self._limiters: OrderedDict[Hashable, FrameLimiter] = OrderedDict()

    def __len__(self) -> int:
        return len(self._limiters)

    def remember(self, identity: Hashable, limiter: FrameLimiter, now: float) -> None:
        limiters = self._limiters
        limiters[identity] = limiter
        limiters.move_to_end(identity)
        while len(limiters) > self.max_entries:
            limiters.popitem(last=False)
        self._forget_settled(now)

    def recall(self, identity: Hashable, now: float) -> FrameLimiter | None:
        """The limiter to carry on with, or None if this identity may start afresh."""
        self._forget_settled(now)
        limiter = self._limiters.get(identity)
        if limiter is not None and limiter.settled_at() <= now:
            del self._limiters[identity]
            return None
        return limiter

    def _forget_settled(self, now: float) -> None:
        limiters = self._limiters
        # A settled limiter may sit behind an unsettled one; this trims from the oldest end
        # only, which keeps the table bounded in time, and recall checks the one it finds.
        while limiters:
            identity, oldest = next(iter(limiters.items()))
            if oldest.settled_at() > now:
                break
            del limiters[identity]


class AddressLimiter:
    """A token bucket per client address, in a table of bounded size.

    Entries are kept in order of last use. One that has been idle long enough to
    have refilled completely is dropped, since a fresh entry would behave the same.
    When more than ``max_addresses`` are busy at once the least recently used is
    dropped anyway, which forgets that address's spending: the table stays bounded
    at the price of letting such an address start again from a full bucket.

    ``rate_per_min`` 0 turns the limit off.
    """

    def __init__(self, rate_per_min: int, burst: int, max_addresses: int = MAX_ADDRESSES) -> None:
        self.rate_per_min = rate_per_min
        self.burst = burst
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, address: str, now: float) -> bool:
        """Count one attempt from ``address``; False means it is over the limit."""
        if self.rate_per_min == 0:
            return True
        buckets = self._buckets
        bucket = buckets.get(address)
        if bucket is None:
            bucket = buckets[address] = TokenBucket(self.rate_per_min / 60, self.burst)
        else:
            buckets.move_to_end(address)
        admitted = bucket.take(now)
        self._evict(now)
        return admitted

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again (0 if it may now)."""
        bucket = self._buckets.get(address)
        return 0.0 if bucket is None else bucket.retry_after(now)

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        while len(buckets) > self.max_addresses:
            buckets.popitem(last=False)
        # Least recently used first: once one is still refilling, so are all after it.
        while buckets:
            oldest = next(iter(buckets.values()))
            if oldest.full_at() > now:
                break
            buckets.popitem(last=False)


class TenantConnections:
    """Authenticated WebSocket sessions per tenant in this process, at most ``cap`` each.

    Every successful ``acquire`` must be matched by one ``release`` when that
    session ends, however it ends.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._counts: dict[str, int] = {}

    def count(self, tenant: str) -> int:
        return self._counts.get(tenant, 0)

    def acquire(self, tenant: str) -> bool:
        held = self._counts.get(tenant, 0)
        if held >= self.cap:
            return False
        self._counts[tenant] = held + 1
        return True

    def release(self, tenant: str) -> None:
        held = self._counts[tenant] - 1
        if held:
            self._counts[tenant] = held
        else:
            del self._counts[tenant]


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, without a default port; ValueError otherwise.

    Browsers leave a default port out of ``Origin``, so ``https://a.example:443`` and
    ``https://a.example`` are the same origin.
    """
    parts = urlsplit(origin.strip().lower())
    host = parts.hostname
    if (
        not parts.scheme
        or not host
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(f"{origin!r} is not an origin; write scheme://host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{origin!r} has no valid port; write scheme://host[:port]") from None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(parts.scheme):
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


class OriginPolicy:
    """Which browser origins may open a WebSocket.

    A page's own host always may: an ``Origin`` whose host and port are the
    ``Host`` the browser connected to (default ports for http and https count as
    the same as none). Other origins must be listed exactly; ``*`` allows all.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        listed = set(allowed)
        self.any = "*" in listed
        self.allowed = frozenset(normalize_origin(o) for o in listed - {"*"})

    def allows(self, origin: str, host: str | None) -> bool:
        if self.any:
            return True
        try:
            normalized = normalize_origin(origin)
        except ValueError:
            # "null" (sandboxed frames, file: pages) and garbage are never the hub's own host.
            return False
        return normalized in self.allowed or _same_host(normalized, host)


def _same_host(origin: str, host: str | None) -> bool:
    if not host:
        return False
    try:
        page = urlsplit(origin)
        server = urlsplit("//" + host.strip().lower())
        page_port = page.port or _DEFAULT_PORTS.get(page.scheme)
        server_port = server.port
    except ValueError:
        return False
    if page.hostname is None or page.hostname != server.hostname:
        return False
    if server_port is None:
        # A Host without a port (typical behind a TLS proxy) names the scheme's default one.
        return page_port in (80, 443)
    return page_port == server_port


def client_address(scope: Mapping[str, Any]) -> str:
    """The client's IP address as the server saw it (after trusted proxy headers)."""
    client = scope.get("client")
    return str(client[0]) if client else ""
