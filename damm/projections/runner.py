"""Durable projectors: fold a stream into Postgres exactly once over at-least-once delivery.

Each fetched batch is applied in one transaction together with the checkpoint (the last stream
sequence applied). Messages at or below the checkpoint are skipped, so a redelivery after a crash
between commit and ack changes nothing. The checkpoint in Postgres is the truth; the durable
consumer is recreated from it on start, which also makes a rebuilt schema resume correctly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from damm import log
from damm.events import codec
from damm.events.model import Envelope
from damm.projections.readmodels import Stmt, statements

_log = log.get("damm.projector")

Project = Callable[[Envelope], Iterable[Stmt]]

_COMBINABLE_PREFIX = "INSERT INTO usage_totals"


def plan(envelopes: Iterable[Envelope], project: Project = statements) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """Group a batch's statements per table, keeping order within each table.

    Consecutive identical statements become one ``executemany``; consecutive usage increments for
    the same device and period are summed first (addition commutes).
    """
    per_table: dict[str, list[tuple[str, list[tuple[Any, ...]]]]] = {}
    for env in envelopes:
        for st in project(env):
            runs = per_table.setdefault(st.table, [])
            if runs and runs[-1][0] == st.sql:
                runs[-1][1].append(st.args)
            else:
                runs.append((st.sql, [st.args]))
    out: list[tuple[str, list[tuple[Any, ...]]]] = []
    for runs in per_table.values():
        for sql, rows in runs:
            out.append((sql, _sum_usage(rows) if sql.startswith(_COMBINABLE_PREFIX) else rows))
    return out


def _sum_usage(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    totals: dict[tuple[str, str], list[int]] = {}
    for device_id, period, rx, tx in rows:
        acc = totals.setdefault((device_id, period), [0, 0])
        acc[0] += rx
        acc[1] += tx
    return [(d, p, rx, tx) for (d, p), (rx, tx) in totals.items()]


async def checkpoint(conn: Any, name: str) -> int:
    seq = await conn.fetchval("SELECT last_seq FROM checkpoint WHERE projector = $1", name)
    return int(seq or 0)


async def apply_batch(conn: Any, name: str, envelopes: Sequence[Envelope], project: Project = statements) -> int:
    """Apply envelopes above the checkpoint in one transaction; return the new checkpoint."""
    async with conn.transaction():
        last = await conn.fetchval(
            "SELECT last_seq FROM checkpoint WHERE projector = $1 FOR UPDATE", name
        )
        if last is None:
            await conn.execute("INSERT INTO checkpoint (projector, last_seq) VALUES ($1, 0)", name)
            last = 0
        fresh = [e for e in envelopes if e.seq > last]
        if not fresh:
            return int(last)
        for sql, rows in plan(fresh, project):
            await conn.executemany(sql, rows)
        new = max(e.seq for e in fresh)
        await conn.execute("UPDATE checkpoint SET last_seq = $2 WHERE projector = $1", name, new)
        return new


def decode_all(msgs: Sequence[Any]) -> Iterator[Envelope]:
    for msg in msgs:
        seq = int(msg.metadata.sequence.stream)
        try:
            yield codec.decode(msg.data, seq=seq)
        except codec.CodecError as exc:
            # An undecodable message is skipped, loudly: blocking the projector on it would
            # stop every read model for one bad record, and the log keeps it for inspection.
            _log.error("undecodable event skipped", seq=seq, error=str(exc))


@dataclass
class Projector:
    name: str
    stream: str
    dsn: str
    schema: str = "damm"
    filter_subject: str | None = None
    batch_size: int = 1000
    project: Project = statements
    applied_seq: int = 0
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, nc: NATS, stop: asyncio.Event) -> None:
        """Project until ``stop`` is set, retrying through bus and database failures."""
        while not stop.is_set():
            try:
                await self._run_once(nc, stop)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    nats.errors.Error) as exc:
                _log.warning("projector restarting", projector=self.name, error=repr(exc))
                await _sleep_or_stop(stop, 1.0)

    async def _run_once(self, nc: NATS, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema})
        try:
            # One active instance per projector across all control-plane processes: a shared
            # pull consumer would split batches between them and the checkpoint would skip some.
            while not await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtext($1))", f"damm-projector-{self.schema}-{self.name}"
            ):
                if stop.is_set():
                    return
                await _sleep_or_stop(stop, 1.0)
            self.applied_seq = await checkpoint(conn, self.name)
            js = nc.jetstream(timeout=10)
            psub = await self._subscribe(js, self.applied_seq)
            try:
                while not stop.is_set():
                    try:
                        msgs = await psub.fetch(self.batch_size, timeout=0.5)
                    except (TimeoutError, nats.errors.TimeoutError):
                        self.caught_up.set()
                        continue
                    envelopes = list(decode_all(msgs))
                    self.applied_seq = await apply_batch(conn, self.name, envelopes, self.project)
                    await msgs[-1].ack()
                    if len(msgs) < self.batch_size:
                        self.caught_up.set()
            finally:
                await psub.unsubscribe()
        finally:
            await conn.close()

    async def _subscribe(self, js: Any, after: int) -> Any:
        durable = f"proj-{self.name}"
        try:
            await js.delete_consumer(self.stream, durable)
        except NotFoundError:
            pass
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
            max_ack_pending=-1,
            ack_wait=30,
            filter_subject=self.filter_subject,
        )
        return await js.pull_subscribe(
            self.filter_subject or "", durable=durable, stream=self.stream, config=config
        )


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
