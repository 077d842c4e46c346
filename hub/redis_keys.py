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
        # The floors as of a presence stream entry, for hubs that start later. The suffix
        # names the format: a release that changes it starts from PostgreSQL again.
        self.checkpoint = f"{prefix}:presence:checkpoint:v1"
        # Held by the hub that builds the first checkpoint from PostgreSQL.
        self.checkpoint_lock = f"{prefix}:presence:checkpoint:lock"
        # Held by the hub that writes the checkpoints for a while.
        self.checkpoint_writer = f"{prefix}:presence:checkpoint:writer"

        # Held by the worker that runs the overtime scan this interval.
        self.scan_lock = f"{prefix}:scan:lock"
        # Every hub's liveness key (``hub``).
        self.hubs_pattern = f"{prefix}:hubs:*"

    def hub(self, hub: str) -> str:
        """Exists while hub process ``hub`` (its run id) is alive: it refreshes the expiry."""
        return f"{self.prefix}:hubs:{hub}"

    def acks(self, hub: str) -> str:
        """Pub/sub: the outcomes of the punches that hub ``hub`` handed over."""
        return f"{self.prefix}:acks:{hub}"
