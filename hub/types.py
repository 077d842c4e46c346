"""Type aliases shared across modules."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# A connection of its own or one borrowed from a pool; queries take either.
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
