"""Which control-plane process publishes and runs policy reactors: one leader at a time.

The leader holds a Postgres advisory lock for as long as its session lives. The others fold the
same log and answer requests, so losing the leader costs at most one retry interval of
propagation.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from damm import log
from damm.clock import sleep_or_stop

_log = log.get("damm.leadership")


class Leadership:
    """Hold a Postgres advisory lock while alive; ``is_leader`` says whether we have it."""

    def __init__(self, dsn: str, name: str, *, retry_s: float = 1.0) -> None:
        self.dsn = dsn
        self.name = name
        self.retry_s = retry_s
        self.is_leader = False
        self.gained = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._hold(stop)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                _log.warning("leadership lost", lock=self.name, error=repr(exc))
            self._lose()
            await sleep_or_stop(self.retry_s, stop)

    async def _hold(self, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", self.name):
                if await sleep_or_stop(self.retry_s, stop):
                    return
            self.is_leader = True
            self.gained.set()
            _log.info("leader", lock=self.name)
            while not stop.is_set():  # keep checking the session is alive (lock dies with it)
                await conn.fetchval("SELECT 1")
                await sleep_or_stop(self.retry_s, stop)
        finally:
            self._lose()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    def _lose(self) -> None:
        if self.is_leader:
            _log.info("no longer leader", lock=self.name)
        self.is_leader = False
        self.gained.clear()
