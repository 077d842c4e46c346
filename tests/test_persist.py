"""The punch batcher against real PostgreSQL, below the WebSocket layer."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from workers.persist import PunchBatcher, PunchRequest

pytestmark = pytest.mark.postgres


@pytest.fixture
def tenant(bare_tenant: str) -> str:
    return bare_tenant


def request(tenant: str, punch_id: uuid.UUID, **fields: object) -> PunchRequest:
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "tenant": tenant,
        "id": punch_id,
        "kind": "in",
        "at": now,
        "received_at": now,
        "source": "terminal",
        "employee": "e1",
        "site": "hq",
        "device": "door",
    }
    values.update(fields)
    return PunchRequest(**values)  # type: ignore[arg-type]


async def test_an_id_committed_by_another_transaction_mid_batch_is_a_duplicate(
    pool: asyncpg.Pool, tenant: str, owner: asyncpg.Connection, database: str
) -> None:
    """The batch's statement cannot see a row committed after it began; it must look again."""
    batcher = PunchBatcher(pool, max_batch=8, wait_ms=0, concurrency=1)
    batcher.start()
    punch = request(tenant, uuid.uuid4())
    blocker = await asyncpg.connect(database)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute(
        """INSERT INTO punches (tenant, id, employee, kind, at, received_at, site, source)
           VALUES ($1, $2, 'e1', 'in', $3, $4, 'hq', 'terminal')""",
        tenant,
        punch.id,
        punch.at,
        punch.received_at - timedelta(seconds=1),
    )
    submitted = asyncio.ensure_future(batcher.submit(punch))
    # Wait until the batch's INSERT is blocked on the uncommitted row, then let it go.
    for _ in range(200):
        waiting = await owner.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
        if waiting:
            break
        await asyncio.sleep(0.01)
    assert waiting, "the batch never blocked on the conflicting insert"
    await transaction.commit()
    await blocker.close()
    outcome = await asyncio.wait_for(submitted, 10)
    assert outcome.status == "duplicate"
    assert outcome.received_at == punch.received_at - timedelta(seconds=1)
    await batcher.stop()


async def test_copies_within_one_batch(
    pool: asyncpg.Pool, tenant: str, owner: asyncpg.Connection
) -> None:
    batcher = PunchBatcher(pool, max_batch=16, wait_ms=50, concurrency=1)
    batcher.start()
    punch_id = uuid.uuid4()
    first = request(tenant, punch_id)
    same = first._replace(badge=None)
    by_badge = first._replace(employee=None, badge="b1")
    changed = first._replace(kind="out")
    outcomes = await asyncio.gather(*(batcher.submit(r) for r in (first, same, by_badge, changed)))
    assert [(o.status, o.reason) for o in outcomes] == [
        ("accepted", None),
        ("duplicate", None),
        ("duplicate", None),
        ("rejected", "id_conflict"),
    ]
    assert {o.received_at for o in outcomes[:3]} == {first.received_at}
    count = await owner.fetchval("SELECT count(*) FROM punches WHERE tenant = $1", tenant)
    assert count == 1
    await batcher.stop()


async def test_new_punches_beside_resends_of_stored_ones(
    pool: asyncpg.Pool, tenant: str, owner: asyncpg.Connection
) -> None:
    """A batch that inserts fewer rows than it has punches still accepts the new ones."""
    batcher = PunchBatcher(pool, max_batch=16, wait_ms=50, concurrency=1)
    batcher.start()
    stored = request(tenant, uuid.uuid4())
    first = await batcher.submit(stored)
    assert first.status == "accepted"
    resent = stored._replace(received_at=datetime.now(UTC))
    fresh = [request(tenant, uuid.uuid4()) for _ in range(2)]
    outcomes = await asyncio.gather(
        *(
            batcher.submit(r)
            for r in (fresh[0], resent, fresh[1], resent._replace(kind="out"), fresh[0])
        )
    )
    assert [(o.status, o.reason) for o in outcomes] == [
        ("accepted", None),
        ("duplicate", None),
        ("accepted", None),
        ("rejected", "id_conflict"),
        ("duplicate", None),
    ]
    assert outcomes[1].received_at == stored.received_at
    assert outcomes[0].received_at == outcomes[4].received_at == fresh[0].received_at
    count = await owner.fetchval("SELECT count(*) FROM punches WHERE tenant = $1", tenant)
    assert count == 3
    await batcher.stop()


async def test_unknown_and_forbidden_are_not_stored(
    pool: asyncpg.Pool, tenant: str, owner: asyncpg.Connection
) -> None:
    batcher = PunchBatcher(pool, max_batch=16, wait_ms=20, concurrency=1)
    batcher.start()
    unknown = request(tenant, uuid.uuid4(), employee="ghost")
    wrong_badge = request(tenant, uuid.uuid4(), employee=None, badge="nope")
    forbidden = request(tenant, uuid.uuid4(), employee=None, badge="b1", only_employee="e2")
    own = request(tenant, uuid.uuid4(), only_employee="e1", site=None)
    outcomes = await asyncio.gather(
        *(batcher.submit(r) for r in (unknown, wrong_badge, forbidden, own))
    )
    assert [(o.status, o.reason) for o in outcomes] == [
        ("rejected", "unknown_employee"),
        ("rejected", "unknown_employee"),
        ("rejected", "forbidden"),
        ("accepted", None),
    ]
    assert outcomes[3].site == "hq"  # no terminal site: the employee's home site
    ids = {r["id"] for r in await owner.fetch("SELECT id FROM punches WHERE tenant = $1", tenant)}
    assert ids == {own.id}
    await batcher.stop()


async def test_database_down_answers_unavailable(tenant: str) -> None:
    from workers.persist import StoreUnavailable

    # Nothing listens on port 1: every connection attempt is refused at once.
    unreachable = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/none", min_size=0)
    batcher = PunchBatcher(unreachable, max_batch=8, wait_ms=0, concurrency=1)
    batcher.start()
    with pytest.raises(StoreUnavailable):
        await batcher.submit(request(tenant, uuid.uuid4()))
    await batcher.stop()
    await unreachable.close()
