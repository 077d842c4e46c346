"""The abuse limits in hub/limits.py, fed times as numbers: no sockets, no clocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub.limits import (
    FLOOD_WINDOW_S,
    AddressLimiter,
    FloodMemory,
    FrameLimiter,
    OriginPolicy,
    TenantConnections,
    TokenBucket,
    Verdict,
    client_address,
    normalize_origin,
)

T0 = 1_000.0

# -- token bucket ----------------------------------------------------------------------------


def test_a_full_bucket_gives_its_burst_at_once_then_refuses() -> None:
    bucket = TokenBucket(rate_per_s=2, burst=5)
    assert [bucket.take(T0) for _ in range(6)] == [True] * 5 + [False]


def test_tokens_come_back_at_the_rate() -> None:
    bucket = TokenBucket(rate_per_s=2, burst=5)
    for _ in range(5):
        bucket.take(T0)
    assert not bucket.take(T0 + 0.49)
    assert bucket.take(T0 + 0.5)
    assert not bucket.take(T0 + 0.5)
    assert [bucket.take(T0 + 2.0) for _ in range(4)] == [True, True, True, False]


def test_an_idle_bucket_refills_no_further_than_its_burst() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=3)
    bucket.take(T0)
    assert [bucket.take(T0 + 3600) for _ in range(4)] == [True, True, True, False]


def test_a_clock_that_goes_back_refills_nothing() -> None:
    bucket = TokenBucket(rate_per_s=1, burst=1)
    assert bucket.take(T0)
    assert not bucket.take(T0 - 100)
    assert not bucket.take(T0 + 0.5)
    assert bucket.take(T0 + 1)


def test_retry_after_is_the_time_to_the_next_token() -> None:
    bucket = TokenBucket(rate_per_s=4, burst=1)
    assert bucket.retry_after(T0) == 0.0
    bucket.take(T0)
    assert bucket.retry_after(T0) == pytest.approx(0.25)
    assert bucket.retry_after(T0 + 0.2) == pytest.approx(0.05)
    assert not bucket.take(T0 + 0.2)
    assert bucket.take(T0 + 0.25)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_a_bucket_needs_a_rate_and_a_burst(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@given(
    rate=st.integers(1, 100),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 2, allow_nan=False), max_size=300),
)
def test_a_bucket_never_admits_more_than_burst_plus_rate_times_time(
    rate: int, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    now = T0
    admitted = 0
    for gap in gaps:
        now += gap
        admitted += bucket.take(now)
        # What rounding tolerates: at most 1 us early per event.
        assert admitted <= burst + rate * (now - T0 + admitted * 1e-6)


# -- frame limiter: refusals and floods ----------------------------------------------------------


def test_frames_within_the_rate_pass() -> None:
    limiter = FrameLimiter(rate_per_s=10, burst=5, flood=3)
    # 10 frames a second for a minute: exactly the sustained rate, never refused.
    assert all(limiter.check(T0 + n / 10) is Verdict.PASS for n in range(600))


def test_frames_over_the_rate_are_refused_and_too_many_refusals_are_a_flood() -> None:
    limiter = FrameLimiter(rate_per_s=1, burst=2, flood=3)
    verdicts = [limiter.check(T0) for _ in range(6)]
    assert verdicts == [Verdict.PASS] * 2 + [Verdict.REFUSE] * 3 + [Verdict.FLOOD]


def test_refusals_older_than_the_window_do_not_count_towards_a_flood() -> None:
    limiter = FrameLimiter(rate_per_s=1, burst=1, flood=2)
    limiter.check(T0)
    assert limiter.check(T0) is Verdict.REFUSE
    assert limiter.check(T0) is Verdict.REFUSE
    later = T0 + FLOOD_WINDOW_S + 0.5
    # The bucket has refilled and the old refusals have left the window.
    assert limiter.check(later) is Verdict.PASS
    assert limiter.check(later) is Verdict.REFUSE
    assert limiter.check(later) is Verdict.REFUSE
    assert limiter.check(later) is Verdict.FLOOD


def test_a_refusal_at_the_window_edge_still_counts() -> None:
    limiter = FrameLimiter(rate_per_s=1, burst=1, flood=1)
    limiter.check(T0)
    assert limiter.check(T0) is Verdict.REFUSE
    limiter.check(T0 + FLOOD_WINDOW_S - 0.25)  # refilled: passes
    assert limiter.check(T0 + FLOOD_WINDOW_S) is Verdict.FLOOD


def test_a_client_that_waits_after_each_refusal_is_never_a_flood() -> None:
    limiter = FrameLimiter(rate_per_s=2, burst=4, flood=20)
    now = T0
    verdicts = []
    for _ in range(2000):
        verdict = limiter.check(now)
        verdicts.append(verdict)
        # As fast as it can, but a second's pause after each `rate_limited`.
        now += 0.01 if verdict is Verdict.PASS else 1.0
    assert Verdict.REFUSE in verdicts
    assert Verdict.FLOOD not in verdicts


def test_retry_after_a_refusal_is_the_time_to_the_next_pass() -> None:
    limiter = FrameLimiter(rate_per_s=4, burst=1, flood=10)
    limiter.check(T0)
    assert limiter.check(T0) is Verdict.REFUSE
    wait = limiter.retry_after(T0)
    assert wait == pytest.approx(0.25)
    assert limiter.check(T0 + wait) is Verdict.PASS


def test_a_client_paced_by_the_pauses_is_a_flood_once_the_refusals_add_up() -> None:
    # What the hub does to a client that sends regardless: read one frame, and after a
    # refusal nothing until the next would pass. Half its frames are refused, at the rate.
    limiter = FrameLimiter(rate_per_s=50, burst=200, flood=100)
    now, refused = T0, 0
    while (verdict := limiter.check(now)) is not Verdict.FLOOD:
        if verdict is Verdict.REFUSE:
            refused += 1
            now += limiter.retry_after(now)
    assert refused == 100
    assert now - T0 == pytest.approx(100 / 50, abs=0.05)


def test_a_limiter_settles_when_its_bucket_is_full_and_its_refusals_have_left_the_window() -> None:
    limiter = FrameLimiter(rate_per_s=1, burst=3, flood=10)
    assert limiter.settled_at() <= T0
    for _ in range(4):
        limiter.check(T0)
    # Full after 3 s, but the refusal at T0 counts for FLOOD_WINDOW_S.
    assert limiter.settled_at() == pytest.approx(T0 + FLOOD_WINDOW_S)
    quiet = FrameLimiter(rate_per_s=1, burst=3, flood=10)
    for _ in range(3):
        quiet.check(T0)
    assert quiet.settled_at() == pytest.approx(T0 + 3)


# -- flood memory --------------------------------------------------------------------------------


def flooded_limiter(at: float) -> FrameLimiter:
    limiter = FrameLimiter(rate_per_s=1, burst=1, flood=1)
    while limiter.check(at) is not Verdict.FLOOD:
        pass
    return limiter


def test_a_flooders_limiter_is_recalled_until_it_settles() -> None:
    memory = FloodMemory()
    limiter = flooded_limiter(T0)
    memory.remember("door", limiter, T0)
    assert memory.recall("door", T0 + 1) is limiter
    assert memory.recall("other door", T0 + 1) is None
    assert memory.recall("door", limiter.settled_at() + 0.01) is None
    assert len(memory) == 0


def test_settled_limiters_are_forgotten_whoever_is_asked_about() -> None:
    memory = FloodMemory()
    memory.remember("old", flooded_limiter(T0), T0)
    memory.remember("new", flooded_limiter(T0 + 5), T0 + 5)
    memory.recall("anyone", T0 + FLOOD_WINDOW_S + 1)
    assert len(memory) == 1
    assert memory.recall("new", T0 + FLOOD_WINDOW_S + 1) is not None


def test_flood_memory_never_holds_more_than_max_entries() -> None:
    memory = FloodMemory(max_entries=3)
    for n in range(10):
        memory.remember(n, flooded_limiter(T0), T0)
    assert len(memory) == 3
    assert [memory.recall(n, T0) is not None for n in (0, 6, 7, 8, 9)] == [False] * 2 + [True] * 3


# -- per-address limiter -------------------------------------------------------------------------


def test_each_address_has_its_own_bucket() -> None:
    limiter = AddressLimiter(rate_per_min=60, burst=2)
    assert [limiter.take("10.0.0.1", T0) for _ in range(3)] == [True, True, False]
    assert limiter.take("10.0.0.2", T0)
    assert limiter.retry_after("10.0.0.1", T0) == pytest.approx(1.0)
    assert limiter.retry_after("10.0.0.2", T0) == 0.0
    assert limiter.take("10.0.0.1", T0 + 1)


def test_the_rate_is_per_minute() -> None:
    limiter = AddressLimiter(rate_per_min=6, burst=1)
    assert limiter.take("a", T0)
    assert not limiter.take("a", T0 + 9.9)
    assert limiter.take("a", T0 + 10)


def test_rate_zero_turns_the_limit_off_and_remembers_nothing() -> None:
    limiter = AddressLimiter(rate_per_min=0, burst=1)
    assert all(limiter.take("a", T0) for _ in range(1000))
    assert len(limiter) == 0


def test_idle_addresses_are_forgotten_once_their_bucket_would_be_full() -> None:
    limiter = AddressLimiter(rate_per_min=60, burst=3)
    limiter.take("a", T0)  # full again at T0 + 1
    limiter.take("b", T0 + 0.5)  # full again at T0 + 1.5
    assert len(limiter) == 2
    limiter.take("c", T0 + 1)
    assert len(limiter) == 2  # "a" is gone
    limiter.take("c", T0 + 1.6)
    assert len(limiter) == 1  # and "b"


def test_forgetting_an_idle_address_changes_nothing_for_it() -> None:
    limiter = AddressLimiter(rate_per_min=60, burst=2)
    limiter.take("a", T0)
    limiter.take("b", T0 + 5)  # "a" is forgotten here
    assert [limiter.take("a", T0 + 5) for _ in range(3)] == [True, True, False]


def test_the_table_never_holds_more_than_max_addresses() -> None:
    limiter = AddressLimiter(rate_per_min=1, burst=5, max_addresses=100)
    for n in range(10_000):
        limiter.take(f"10.0.{n // 256}.{n % 256}", T0 + n / 1000)
        assert len(limiter) <= 100


def test_a_busy_address_stays_remembered_while_idle_ones_go() -> None:
    limiter = AddressLimiter(rate_per_min=60, burst=5, max_addresses=3)
    for n in range(50):
        # "busy" keeps spending; a new address every step pushes others out.
        limiter.take("busy", T0 + n * 0.1)
        limiter.take(f"other-{n}", T0 + n * 0.1)
    # A forgotten address would start from a full bucket of 5.
    assert sum(limiter.take("busy", T0 + 5.0) for _ in range(5)) <= 1


def test_client_address_is_the_scope_clients_host() -> None:
    assert client_address({"client": ("192.0.2.7", 50123)}) == "192.0.2.7"
    assert client_address({"client": None}) == ""
    assert client_address({}) == ""


# -- tenant connections --------------------------------------------------------------------------


def test_each_tenant_gets_up_to_its_cap() -> None:
    tenants = TenantConnections(cap=2)
    assert tenants.acquire("a")
    assert tenants.acquire("a")
    assert not tenants.acquire("a")
    assert tenants.acquire("b")
    assert (tenants.count("a"), tenants.count("b"), tenants.count("c")) == (2, 1, 0)


def test_a_release_makes_room() -> None:
    tenants = TenantConnections(cap=1)
    assert tenants.acquire("a")
    assert not tenants.acquire("a")
    tenants.release("a")
    assert tenants.count("a") == 0
    assert tenants.acquire("a")


# -- origins -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("https://dash.example.com", "https://dash.example.com"),
        (" HTTPS://Dash.Example.com/ ", "https://dash.example.com"),
        ("https://dash.example.com:443", "https://dash.example.com"),
        ("http://dash.example.com:80", "http://dash.example.com"),
        ("https://dash.example.com:8443", "https://dash.example.com:8443"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("capacitor://localhost", "capacitor://localhost"),
    ],
)
def test_origins_are_normalized(raw: str, normal: str) -> None:
    assert normalize_origin(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "dash.example.com",
        "https://",
        "https://dash.example.com/app",
        "https://dash.example.com?x=1",
        "https://user@dash.example.com",
        "https://dash.example.com:port",
        "null",
        "",
    ],
)
def test_what_is_not_an_origin_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="scheme://host"):
        normalize_origin(raw)


HUB_HOST = "hub.example.com:8080"


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://hub.example.com:8080", HUB_HOST),
        ("https://hub.example.com:8080", HUB_HOST),
        ("http://HUB.example.com:8080", "hub.EXAMPLE.com:8080"),
        ("https://hub.example.com", "hub.example.com"),
        ("http://hub.example.com", "hub.example.com"),
        ("https://hub.example.com", "hub.example.com:443"),
        ("http://127.0.0.1:8080", "127.0.0.1:8080"),
        ("http://[::1]:8080", "[::1]:8080"),
    ],
)
def test_a_page_of_the_hubs_own_host_is_allowed(origin: str, host: str) -> None:
    assert OriginPolicy([]).allows(origin, host)


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("https://evil.example", HUB_HOST),
        ("http://hub.example.com:9090", HUB_HOST),
        ("http://hub.example.com", HUB_HOST),
        ("https://hub.example.com:8443", "hub.example.com"),
        ("http://hub.example.com.evil.example:8080", HUB_HOST),
        ("null", HUB_HOST),
        ("garbage", HUB_HOST),
        ("http://hub.example.com:8080", None),
        ("http://hub.example.com:8080", "hub.example.com:not-a-port"),
    ],
)
def test_other_origins_are_refused_by_default(origin: str, host: str | None) -> None:
    assert not OriginPolicy([]).allows(origin, host)


def test_listed_origins_are_allowed_exactly() -> None:
    policy = OriginPolicy(["https://dash.example.com", "capacitor://localhost"])
    assert policy.allows("https://dash.example.com", HUB_HOST)
    assert policy.allows("https://dash.example.com:443", HUB_HOST)
    assert policy.allows("capacitor://localhost", HUB_HOST)
    assert not policy.allows("http://dash.example.com", HUB_HOST)
    assert not policy.allows("https://dash.example.com:8443", HUB_HOST)
    assert not policy.allows("https://other.example.com", HUB_HOST)
    # The hub's own host stays allowed next to the list.
    assert policy.allows("http://hub.example.com:8080", HUB_HOST)


def test_a_star_allows_every_origin() -> None:
    policy = OriginPolicy(["*"])
    assert policy.allows("https://anything.example", HUB_HOST)
    assert policy.allows("null", None)
