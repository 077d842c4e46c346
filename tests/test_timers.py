"""Many deadlines under one timer (hub/timers.py)."""

from __future__ import annotations

import asyncio

from hub.timers import Deadlines


async def test_deadlines_run_in_order_and_cancelled_ones_do_not() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    ran: list[str] = []
    now = loop.time()
    deadlines.at(now + 0.06, lambda: ran.append("late"))
    early = deadlines.at(now + 0.02, lambda: ran.append("early"))
    deadlines.at(now + 0.04, lambda: ran.append("middle"))
    dropped = deadlines.at(now + 0.03, lambda: ran.append("dropped"))
    deadlines.cancel(dropped)
    # One added from a callback runs too.
    deadlines.at(now + 0.01, lambda: deadlines.at(now + 0.05, lambda: ran.append("again")))
    assert len(deadlines) == 4
    await asyncio.sleep(0.12)
    assert ran == ["early", "middle", "again", "late"]
    assert len(deadlines) == 0
    # Cancelling one that already ran changes nothing.
    deadlines.cancel(early)
    assert len(deadlines) == 0


async def test_far_deadlines_cancelled_in_numbers_do_not_pile_up() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    far = loop.time() + 86_400
    kept = [deadlines.at(far + n, lambda: None) for n in range(10)]
    for n in range(1_000):
        deadlines.cancel(deadlines.at(far + n, lambda: None))
    assert len(deadlines) == 10
    assert len(deadlines._heap) < 200, "cancelled deadlines were kept"
    ran: list[int] = []
    soon = deadlines.at(loop.time() + 0.01, lambda: ran.append(1))
    await asyncio.sleep(0.05)
    assert ran == [1] and soon[2] is None
    assert len(kept) == 10
    assert Deadlines.of(loop) is Deadlines.of(loop)


async def test_a_callback_may_cancel_many_while_they_fire() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    now = loop.time()
    far = [deadlines.at(now + 3600 + n, lambda: None) for n in range(200)]
    ran: list[str] = []

    def cancel_all() -> None:
        for deadline in far:
            deadlines.cancel(deadline)
        ran.append("cancelled")

    deadlines.at(now + 0.01, cancel_all)
    deadlines.at(now + 0.01, lambda: ran.append("beside"))
    deadlines.at(now + 0.03, lambda: ran.append("after"))
    await asyncio.sleep(0.08)
    assert ran == ["cancelled", "beside", "after"]
    assert len(deadlines) == 0
