"""Every Redis key and pub/sub channel name the hubs and workers use, in one place.

Every name starts with the deployment's prefix (``ATTENDANCE_REDIS_PREFIX``,
``attendance`` by default), so that one Redis can serve several deployments, or
other things besides.
"""

from __future__ import annotations

from typing import Final

DEFAULT_PREFIX: Final = "attendance"

# The workers' consumer group on the punch stream.
WORKER_GROUP: Final = "workers"


class RedisKeys:
    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        # Punches from every hub, for the workers' consumer group.
        self.punches = f"{prefix}:punches"
        # Punches a worker gave up on after too many deliveries, with why.
        self.dead_letters = f"{prefix}:punches:dead"
        # Presence events (committed punches, renames, terminals, clock ticks...), applied
        # by every hub in this stream's order.
        self.presence = f"{prefix}:presence"

    def acks(self, hub: str) -> str:
        """Pub/sub: the outcomes of the punches that hub ``hub`` handed over."""
        return f"{self.prefix}:acks:{hub}"
