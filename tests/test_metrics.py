"""The metrics against a real hub: every name the dashboard and the alert rules use is
exported, the metrics move when the things they count happen, and no label carries an id."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import websockets
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from hub import metrics
from hub.redis_keys import RedisKeys
from tests.conftest import TEST_SECRET
from tests.support import (
    JSON,
    Client,
    HubProcess,
    TenantKit,
    provisioned_tenant,
    punch_frame,
    running_hub,
)

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "attendance-hub.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- reading /metrics ---------------------------------------------------------------------------


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(base_url: str) -> Samples:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def moved(
    base_url: str, name: str, before: float, timeout: float = 10, **labels: str
) -> float:
    """The sample's value once it is above ``before`` (or after ``timeout`` s)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        now = value(await scrape(base_url), name, **labels)
        if now > before or asyncio.get_running_loop().time() > deadline:
            return now
        await asyncio.sleep(0.05)


# -- the names the dashboard and the alert rules use ----------------------------------------------

_TOKEN = re.compile(
    r"""(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
      | (?P<variable>\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)
      | (?P<number>[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?[smhdwy]?)
      | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}\[\]])
      | (?P<space>\s+)""",
    re.VERBOSE,
)
# Keywords after which a parenthesised list of label names follows.
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_OPERATORS = {"and", "or", "unless", "bool", "offset", "atan2"}
_PAIRS = {")": "(", "]": "[", "}": "{"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, checking on the way that it lexes and
    that its brackets balance (promql's own parser is not available offline)."""
    names: set[str] = set()
    tokens = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        assert match is not None, f"cannot read {expr[position:]!r} in {expr!r}"
        position = match.end()
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
    stack: list[str] = []
    skip_list = False
    for index, (kind, text) in enumerate(tokens):
        if kind == "op" and text in "([{":
            stack.append(text)
            continue
        if kind == "op" and text in ")]}":
            assert stack and stack[-1] == _PAIRS[text], f"unbalanced {text!r} in {expr!r}"
            stack.pop()
            if text == ")":
                skip_list = False
            continue
        if kind != "name":
            continue
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if text in _GROUPING:
            # `group_left` may stand without a list.
            skip_list = following == "("
        elif stack and stack[-1] in "{[":
            pass  # a label name, or a duration
        elif skip_list:
            pass  # a label in by (...), on (...)
        elif following == "(" or following in _GROUPING or text in _OPERATORS:
            pass  # a function, an aggregation (sum by (...) (...)) or an operator
        else:
            names.add(text)
    assert not stack, f"unclosed {stack} in {expr!r}"
    return names


def dashboard_exprs() -> list[str]:
    model = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in model["panels"]:
        for target in panel.get("targets", ()):
            exprs.append(target["expr"])
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_dashboard_is_a_grafana_model_on_a_datasource_variable() -> None:
    model = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    titles = " ".join(panel["title"].lower() for panel in model["panels"])
    for subject in (
        "connections",
        "frames",
        "ack latency",
        "batch size",
        "commit time",
        "stream backlog",
        "dead letters",
        "fan-out latency",
        "alerts by kind",
        "http errors",
        "memory",
        "cpu",
    ):
        assert subject in titles, subject


def test_the_alert_rules_are_complete_and_their_promql_reads() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[0-9]+[smh]", rule["for"]), rule
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
        assert promql_metric_names(rule["expr"]), rule
    used = {name for rule in rules for name in promql_metric_names(rule["expr"])}
    # What the issue asks the rules to watch.
    assert {
        "attendance_http_requests_total",
        "attendance_punch_failures_total",
        "attendance_db_pool_in_use_connections",
        "attendance_stream_entries",
        "attendance_stream_dead_letter_entries",
        "process_start_time_seconds",
    } <= used


def test_the_promql_check_catches_what_it_should() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(attendance_x_bucket{job=~"$job"}'
        "[$__rate_interval])))"
    ) == {"attendance_x_bucket"}
    assert promql_metric_names("a / on (pool) group_left b > 0 and up == 0") == {"a", "b", "up"}
    with pytest.raises(AssertionError):
        promql_metric_names("sum(rate(a[5m])")
    with pytest.raises(AssertionError):
        promql_metric_names("sum(a{b='c')})")


def registry_names() -> set[str]:
    """Every sample name hub/metrics.py's registry exports, histograms' series included."""
    return {sample.name for family in REGISTRY.collect() for sample in family.samples}


# -- a hub of the tests' own ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_hub(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        # Small queues, so that a client that stops reading is closed 4009 soon.
        "ATTENDANCE_SEND_QUEUE_FRAMES": "16",
        "ATTENDANCE_SEND_QUEUE_BYTES": str(64 * 1024),
        "ATTENDANCE_RATE_PER_S": "0",
    }
    with running_hub(tmp_path_factory.mktemp("metrics-hub"), env) as process:
        yield process


@pytest.fixture
async def kit(metrics_hub: HubProcess, database: str) -> AsyncIterator[TenantKit]:
    async with provisioned_tenant(metrics_hub.base_url, database, TEST_SECRET, "m") as tenant:
        yield tenant


def ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


async def supervisor(kit: TenantKit) -> Client:
    lead = await kit.connect(kit.token("supervisor", "lead", sites=["hq"]))
    await lead.send({"type": "subscribe", "channel": "presence:hq"})
    assert (await lead.recv())["type"] == "subscribed"
    assert (await lead.recv())["type"] == "snapshot"
    return lead


async def test_every_name_the_dashboard_and_the_alerts_use_is_exported(
    metrics_hub: HubProcess, kit: TenantKit
) -> None:
    # Some traffic first: a punch, a subscription, a REST request.
    lead = await supervisor(kit)
    door = await kit.connect()
    assert (await door.punch(punch_frame("e1")))["status"] == "accepted"
    assert (await kit.http.get("/v1/sites")).status_code == 200
    await door.close()
    await lead.close()
    exported = {name for name, _ in await scrape(metrics_hub.base_url)}
    # What the process exports once observed, as hub/metrics.py defines it; `up` is
    # Prometheus's own.
    known = exported | registry_names() | {"up"}
    used = {name for expr in dashboard_exprs() for name in promql_metric_names(expr)}
    used |= {name for rule in alert_rules() for name in promql_metric_names(rule["expr"])}
    assert used - known == set()
    # The process collector's series are there on this platform, and the pool gauges.
    assert {"process_start_time_seconds", "process_resident_memory_bytes"} <= exported
    samples = await scrape(metrics_hub.base_url)
    assert value(samples, "attendance_db_pool_max_connections", pool="app") == 8
    in_use = value(samples, "attendance_db_pool_in_use_connections", pool="app")
    assert 0 <= in_use <= value(samples, "attendance_db_pool_connections", pool="app")


async def test_a_punch_moves_its_ack_latency_and_punches_total(
    metrics_hub: HubProcess, kit: TenantKit
) -> None:
    before = await scrape(metrics_hub.base_url)
    door = await kit.connect()
    for employee in ("e1", "e2"):
        assert (await door.punch(punch_frame(employee)))["status"] == "accepted"
    await door.close()
    after = await scrape(metrics_hub.base_url)
    count = "attendance_punch_ack_latency_seconds_count"
    assert value(after, count) == value(before, count) + 2
    slowest = "attendance_punch_ack_latency_seconds_bucket"
    # Acked within 10 s, and the sum grew by something positive but under 20 s.
    assert value(after, slowest, le="10.0") == value(before, slowest, le="10.0") + 2
    grew = value(after, "attendance_punch_ack_latency_seconds_sum") - value(
        before, "attendance_punch_ack_latency_seconds_sum"
    )
    assert 0 < grew < 20
    accepted = "attendance_punches_total"
    assert (
        value(after, accepted, result="accepted") == value(before, accepted, result="accepted") + 2
    )


async def test_a_subscriber_and_a_punch_move_the_fanout_latency(
    metrics_hub: HubProcess, kit: TenantKit
) -> None:
    lead = await supervisor(kit)
    name = "attendance_fanout_latency_seconds_count"
    before = value(await scrape(metrics_hub.base_url), name)
    door = await kit.connect()
    assert (await door.punch(punch_frame("e3")))["status"] == "accepted"
    delta = await lead.recv()
    assert delta["type"] == "delta"
    # Queued before the ack: the batcher applies the commit to the floors first.
    assert value(await scrape(metrics_hub.base_url), name) > before
    await door.close()
    await lead.close()


async def device(kit: TenantKit, name: str) -> str:
    response = await kit.http.put(f"/v1/devices/{name}", json={"site": "hq", "name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


async def closed_with(client: Client) -> int | None:
    try:
        while True:
            await client.recv(timeout=30)
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def test_closes_move_disconnects_by_code(metrics_hub: HubProcess, kit: TenantKit) -> None:
    name = "attendance_ws_disconnects_total"
    base = metrics_hub.base_url
    before = await scrape(base)

    # 1000: the client says goodbye.
    door = await kit.connect()
    await door.close()
    assert (
        await moved(base, name, value(before, name, code="1000"), code="1000")
        == value(before, name, code="1000") + 1
    )

    # 4008: more than 20 malformed frames within 10 s.
    flooder = await kit.connect(await device(kit, f"garbled-{secrets.token_hex(3)}"))
    for _ in range(25):
        await flooder.ws.send("this is not a frame")
    assert await closed_with(flooder) == 4008
    assert (
        await moved(base, name, value(before, name, code="4008"), code="4008")
        == value(before, name, code="4008") + 1
    )

    # 4009: a dashboard that stops reading while its answers pile up.
    slow_name = "attendance_ws_slow_consumer_closes_total"
    slow_before = sum(value(before, slow_name, queue=queue) for queue in ("frames", "bytes"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", metrics_hub.port))
    sock.setblocking(False)
    ws = await websockets.connect(
        kit.ws_url,
        sock=sock,
        subprotocols=[JSON],  # type: ignore[list-item]
        max_queue=1,
        max_size=2**20,
    )
    reader = Client(ws, JSON)
    assert (await reader.hello(kit.token("supervisor", "lead", sites=["hq"])))["type"] == "welcome"
    ref = "r" * 128
    try:
        for n in range(20_000):
            await asyncio.wait_for(ws.send(json.dumps({"type": "ping", "ref": ref})), 5)
            if n % 500 == 499:
                samples = await scrape(base)
                if value(samples, name, code="4009") > value(before, name, code="4009"):
                    break
    except (TimeoutError, websockets.ConnectionClosed):
        pass  # the hub stopped reading it: it was shut out
    assert (
        await moved(base, name, value(before, name, code="4009"), code="4009")
        == value(before, name, code="4009") + 1
    )
    after = await scrape(base)
    assert sum(value(after, slow_name, queue=queue) for queue in ("frames", "bytes")) == (
        slow_before + 1
    )
    ws.transport.abort()


async def test_an_alert_moves_alerts_by_kind(metrics_hub: HubProcess, kit: TenantKit) -> None:
    name = "attendance_alerts_raised_total"
    before = value(await scrape(metrics_hub.base_url), name, kind="clock_skew")
    door = await kit.connect()
    # The terminal's clock is half an hour slow.
    skewed = punch_frame("e2", at=ago(1800))
    assert (await door.punch(skewed))["status"] == "accepted"
    assert await moved(metrics_hub.base_url, name, before, kind="clock_skew") == before + 1
    # Sent again: stored already, so not counted again.
    assert (await door.punch(skewed))["status"] == "duplicate"
    await door.close()
    listed = (await kit.http.get("/v1/alerts")).json()["alerts"]
    assert [a["kind"] for a in listed] == ["clock_skew"]
    assert value(await scrape(metrics_hub.base_url), name, kind="clock_skew") == before + 1


async def test_http_requests_count_the_route_template_not_the_path(
    metrics_hub: HubProcess, kit: TenantKit
) -> None:
    name = "attendance_http_requests_total"
    template = {"route": "/v1/employees/{employee}", "status": "404"}
    unmatched = {"route": "unmatched", "status": "404"}
    before = await scrape(metrics_hub.base_url)
    nobody = f"nobody-{secrets.token_hex(4)}"
    response = await kit.http.get(f"/v1/employees/{nobody}")
    assert response.status_code == 404
    nowhere = f"/no-such-page-{secrets.token_hex(4)}"
    assert (await kit.http.get(nowhere)).status_code == 404
    after = await scrape(metrics_hub.base_url)
    assert value(after, name, **template) == value(before, name, **template) + 1
    assert value(after, name, **unmatched) == value(before, name, **unmatched) + 1
    labels = {label for _, labels in after for label in labels}
    assert not any(nobody in text or nowhere in text for _, text in labels)


async def test_no_label_carries_a_tenant_employee_device_or_session_id(
    metrics_hub: HubProcess, kit: TenantKit
) -> None:
    lead = await kit.connect(kit.token("supervisor", "lead", sites=["hq"]))
    door_socket = await websockets.connect(kit.ws_url, subprotocols=[JSON])  # type: ignore[list-item]
    door = Client(door_socket, JSON)
    welcome = await door.hello(kit.terminal_token)
    punched = punch_frame(badge="b1")
    assert (await door.punch(punched))["status"] == "accepted"
    assert (await kit.http.get("/v1/employees/e1")).status_code == 200
    assert (await kit.http.get("/v1/presence/hq")).status_code == 200
    await door.close()
    await lead.close()
    ids = {kit.slug, "e1", "e2", "e3", "b1", "b2", "b3", "door", "hq", welcome["session"]}
    ids.add(punched["id"])
    uuid_like = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}")
    for sample, labels in await scrape(metrics_hub.base_url):
        for label, text in labels:
            assert text not in ids, (sample, label, text)
            assert kit.slug not in text, (sample, label, text)
            assert not uuid_like.search(text), (sample, label, text)
            # Route templates, not paths: no id of this tenant inside one.
            assert not any(f"/{part}" in text for part in ("e1", "hq", "door")), (sample, text)


# -- the punch stream, on Redis -------------------------------------------------------------------


@pytest.fixture
def redis_hub(
    database: str, redis_server: str, redis_prefix: str, tmp_path: Path
) -> Iterator[HubProcess]:
    env = {
        "ATTENDANCE_DATABASE_URL": database,
        "ATTENDANCE_SECRET": TEST_SECRET,
        "ATTENDANCE_REDIS_URL": redis_server,
        "ATTENDANCE_REDIS_PREFIX": redis_prefix,
    }
    with running_hub(tmp_path, env) as process:
        yield process


@pytest.mark.one_server
async def test_a_dead_lettered_entry_moves_the_stream_metrics(
    redis_hub: HubProcess, redis_server: str, redis_prefix: str
) -> None:
    base = redis_hub.base_url
    before = await scrape(base)
    for gauge in (
        "attendance_stream_entries",
        "attendance_stream_pending_entries",
        "attendance_stream_dead_letter_entries",
    ):
        assert (gauge, frozenset()) in before, gauge
    client = redis.Redis.from_url(redis_server)
    try:
        # An entry no worker can read goes straight to the dead letters.
        client.xadd(RedisKeys(redis_prefix).punches, {b"garbage": uuid.uuid4().hex.encode()})
    finally:
        client.close()
    counter = "attendance_stream_dead_letters_total"
    assert await moved(base, counter, value(before, counter)) == value(before, counter) + 1
    gauge = "attendance_stream_dead_letter_entries"
    assert await moved(base, gauge, value(before, gauge)) == 1


# -- hub/metrics.py on its own --------------------------------------------------------------------


def test_a_loop_histogram_counts_into_cumulative_buckets() -> None:
    histogram = metrics.LoopHistogram(
        f"attendance_test_{secrets.token_hex(4)}_seconds", "for the test", (0.1, 1.0)
    )
    try:
        for observed in (0.05, 0.1, 0.5, 3.0):
            histogram.observe(observed)
        [family] = histogram.collect()
        samples = {(s.name.rsplit("_", 1)[-1], s.labels.get("le")): s.value for s in family.samples}
        assert samples[("bucket", "0.1")] == 2  # 0.05, and 0.1 itself (le is <=)
        assert samples[("bucket", "1.0")] == 3
        assert samples[("bucket", "+Inf")] == 4
        assert samples[("count", None)] == 4
        assert samples[("sum", None)] == pytest.approx(3.65)
    finally:
        REGISTRY.unregister(histogram)


def test_label_values_come_from_fixed_sets() -> None:
    from workers.checks import SEVERITY as FRAUD
    from workers.scan import SEVERITY as SCAN

    assert set(metrics.ALERT_KINDS) == {*FRAUD, *SCAN, "unknown_pin", "bad_record"}
    before = {
        code: REGISTRY.get_sample_value("attendance_ws_disconnects_total", {"code": code}) or 0.0
        for code in ("other", "4009")
    }
    metrics.disconnected(4999)
    metrics.disconnected(None)
    metrics.disconnected(4009)
    assert REGISTRY.get_sample_value("attendance_ws_disconnects_total", {"code": "other"}) == (
        before["other"] + 2
    )
    assert REGISTRY.get_sample_value("attendance_ws_disconnects_total", {"code": "4009"}) == (
        before["4009"] + 1
    )
    other = REGISTRY.get_sample_value("attendance_alerts_raised_total", {"kind": "other"}) or 0.0
    metrics.alert_raised("a_kind_nobody_wrote")
    assert REGISTRY.get_sample_value("attendance_alerts_raised_total", {"kind": "other"}) == (
        other + 1
    )
    assert (
        REGISTRY.get_sample_value("attendance_alerts_raised_total", {"kind": "a_kind_nobody_wrote"})
        is None
    )
