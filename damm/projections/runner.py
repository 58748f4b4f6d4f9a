"""Durable projectors: fold a stream into Postgres exactly once over at-least-once delivery.

Each fetched batch is applied in one transaction together with the checkpoint (the last stream
sequence applied). Messages at or below the checkpoint are skipped, so a redelivery after a crash
between commit and ack changes nothing. The checkpoint in Postgres is the truth; the durable
consumer is recreated from it on start, which also makes a rebuilt schema resume correctly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from damm import log
from damm.clock import sleep_or_stop
from damm.errors import Code
from damm.events import codec
from damm.events.model import Envelope
from damm.metrics import ControlMetrics
from damm.projections.migrate import check_schema
from damm.projections.readmodels import Stmt, statements

_log = log.get("damm.projector")

Project = Callable[[Envelope], Iterable[Stmt]]

_COMBINABLE_PREFIX = "INSERT INTO usage_totals"
_LATEST_WINS_PREFIX = "INSERT INTO gateway_health"


def plan(
    envelopes: Iterable[Envelope], project: Project = statements, *, coalesce: bool = True
) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """Group a batch's statements per table, keeping order within each table.

    Consecutive identical statements become one ``executemany``; consecutive usage increments for
    the same device and period are summed first (addition commutes), and of a gateway's
    heartbeats only the latest is written (the upsert keeps the latest anyway), so a thousand
    gateways beating cost a thousand rows per batch at most, whatever the rate.
    """
    return group((st for env in envelopes for st in project(env)), coalesce=coalesce)


def group(
    stmts: Iterable[Stmt], *, coalesce: bool = True
) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """``plan`` over statements already built."""
    per_table: dict[str, list[tuple[str, list[tuple[Any, ...]]]]] = {}
    for st in stmts:
        runs = per_table.setdefault(st.table, [])
        if runs and runs[-1][0] == st.sql:
            runs[-1][1].append(st.args)
        else:
            runs.append((st.sql, [st.args]))
    out: list[tuple[str, list[tuple[Any, ...]]]] = []
    for runs in per_table.values():
        for sql, rows in runs:
            if coalesce and sql.startswith(_COMBINABLE_PREFIX):
                rows = _sum_usage(rows)
            elif coalesce and sql.startswith(_LATEST_WINS_PREFIX):
                rows = _latest_per_gateway(rows)
            out.append((sql, rows))
    return out


def _latest_per_gateway(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """(gateway_id, last_heartbeat, ...) rows: the newest per gateway, the later one on a tie."""
    latest: dict[Any, tuple[Any, ...]] = {}
    for row in rows:
        old = latest.get(row[0])
        if old is None or old[1] <= row[1]:
            latest[row[0]] = row
    return list(latest.values())


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


@dataclass(frozen=True, slots=True)
class Quarantined:
    """An event a projector set aside: its place in the stream and why it could not apply."""

    seq: int
    subject: str
    event_type: str
    error: str


# What an event's own content can make Postgres refuse (a number out of a column's range, a
# string it cannot store, a broken constraint). Anything else is the database's trouble.
EVENT_REFUSALS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)


async def _quarantine(conn: Any, name: str, items: Iterable[Quarantined]) -> None:
    for q in items:
        _log.error(
            "event quarantined by projector",
            code=Code.EVENT_QUARANTINED.slug,
            projector=name,
            seq=q.seq,
            subject=q.subject,
            event_type=q.event_type,
            error=q.error,
        )
        await conn.execute(
            "INSERT INTO quarantine (projector, seq, subject, event_type, error)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (projector, seq) DO NOTHING",
            name,
            q.seq,
            q.subject[:200],
            q.event_type[:100],
            q.error[:500],
        )


async def _apply_one_by_one(
    conn: Any, name: str, envelopes: Sequence[Envelope], project: Project
) -> list[Quarantined]:
    """The slow path after a batch was refused: each event in its own savepoint, so one event
    the columns cannot hold is set aside and every other one still lands, in order."""
    refused: list[Quarantined] = []
    for env in envelopes:
        try:
            async with conn.transaction():
                for sql, rows in plan([env], project):
                    await conn.executemany(sql, rows)
        except EVENT_REFUSALS as exc:
            refused.append(Quarantined(env.seq, env.aggregate, env.type, str(exc)))
    return refused


def _plan_each(
    envelopes: Sequence[Envelope], project: Project
) -> tuple[list[Envelope], list[Stmt], list[Quarantined]]:
    """Events whose statements cannot even be built are set aside before touching Postgres."""
    good: list[Envelope] = []
    stmts: list[Stmt] = []
    bad: list[Quarantined] = []
    for env in envelopes:
        try:
            built = list(project(env))
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            bad.append(Quarantined(env.seq, env.aggregate, env.type, repr(exc)))
        else:
            good.append(env)
            stmts += built
    return good, stmts, bad


async def apply_batch(
    conn: Any,
    name: str,
    envelopes: Sequence[Envelope],
    project: Project = statements,
    undecodable: Sequence[Quarantined] = (),
) -> int:
    """Apply envelopes above the checkpoint in one transaction; return the new checkpoint.

    An event that cannot be applied is quarantined (a row, a loud log line) and the checkpoint
    moves past it: one bad record must never stop every read model behind it.
    """
    async with conn.transaction():
        last = await conn.fetchval(
            "SELECT last_seq FROM checkpoint WHERE projector = $1 FOR UPDATE", name
        )
        if last is None:
            await conn.execute("INSERT INTO checkpoint (projector, last_seq) VALUES ($1, 0)", name)
            last = 0
        fresh = [e for e in envelopes if e.seq > last]
        bad = [q for q in undecodable if q.seq > last]
        if not fresh and not bad:
            return int(last)
        fresh, stmts, unplannable = _plan_each(fresh, project)
        bad += unplannable
        try:
            async with conn.transaction():
                for sql, rows in group(stmts):
                    await conn.executemany(sql, rows)
        except EVENT_REFUSALS:
            bad += await _apply_one_by_one(conn, name, fresh, project)
        await _quarantine(conn, name, sorted(bad, key=lambda q: q.seq))
        new = max([e.seq for e in fresh] + [q.seq for q in bad])
        await conn.execute("UPDATE checkpoint SET last_seq = $2 WHERE projector = $1", name, new)
        return new


async def quarantined(
    conn: Any, name: str | None = None, schema: str | None = None
) -> list[Quarantined]:
    """What a projector (or every projector) has set aside, oldest first."""
    table = f"{check_schema(schema)}.quarantine" if schema else "quarantine"
    rows = await conn.fetch(
        f"SELECT seq, subject, event_type, error FROM {table}"
        " WHERE $1::text IS NULL OR projector = $1 ORDER BY projector, seq",
        name,
    )
    return [Quarantined(int(r["seq"]), r["subject"], r["event_type"], r["error"]) for r in rows]


def stream_seq(msg: Any) -> int:
    """The stream sequence from a JetStream reply subject, without building ``msg.metadata``
    (a dataclass and a datetime per message, a visible share of the projector's CPU)."""
    tokens: list[str] = msg.reply.split(".") if msg.reply else []
    if len(tokens) == _V1_ACK_TOKENS and tokens[0] == "$JS":
        return int(tokens[5])
    if len(tokens) >= _V2_ACK_TOKENS and tokens[0] == "$JS":
        return int(tokens[7])
    return int(msg.metadata.sequence.stream)


def consumer_seq(msg: Any) -> int:
    """The consumer's delivery sequence: one more for every delivery, redeliveries included."""
    tokens: list[str] = msg.reply.split(".") if msg.reply else []
    if len(tokens) == _V1_ACK_TOKENS and tokens[0] == "$JS":
        return int(tokens[6])
    if len(tokens) >= _V2_ACK_TOKENS and tokens[0] == "$JS":
        return int(tokens[8])
    return int(msg.metadata.sequence.consumer)


class DeliveryGap(Exception):
    """A delivery went missing between the server and us (a node or the stream's leader died
    mid-fetch). Acking past it would acknowledge it unseen (AckAll) and the checkpoint would
    skip it for good, so the projector starts again from its checkpoint instead."""


def check_deliveries(previous: int, msgs: Sequence[Any]) -> int:
    """The last delivery sequence of ``msgs``, which must follow ``previous`` one by one."""
    for msg in msgs:
        seq = consumer_seq(msg)
        if seq != previous + 1:
            raise DeliveryGap(f"delivery {seq} after {previous}")
        previous = seq
    return previous


_V1_ACK_TOKENS = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
_V2_ACK_TOKENS = 11  # $JS.ACK.<domain>.<acchash>.<stream>.<consumer>.<delivered>.<sseq>...


def stream_position(msg: Any) -> tuple[float, int]:
    """When the message was stored (unix seconds) and how many stream messages followed it
    undelivered at the time it was delivered, from the reply subject like ``stream_seq``."""
    tokens: list[str] = msg.reply.split(".") if msg.reply else []
    if len(tokens) == _V1_ACK_TOKENS and tokens[0] == "$JS":
        return int(tokens[7]) / 1e9, int(tokens[8])
    if len(tokens) >= _V2_ACK_TOKENS and tokens[0] == "$JS":
        return int(tokens[9]) / 1e9, int(tokens[10])
    meta = msg.metadata
    return meta.timestamp.timestamp(), int(meta.num_pending)


class Puller:
    """Reads a pull consumer through one callback subscription into a buffer.

    nats-py's ``fetch`` awaits every message through ``wait_for`` (a task per message), which
    cost about three times the rest of the read path and capped projection near 12k events/s.
    Here messages land in a list from the subscription callback. A fetch asks with ``no_wait``
    (the server answers at once with what it has), and only when that was nothing, lingers for
    a single message, so no request outlives its fetch and batches stay full under load.
    Messages of a request abandoned by a cancelled fetch still land in the buffer, in delivery
    order, for the next fetch: nothing is lost or reordered.
    """

    def __init__(self, nc: NATS, stream: str, consumer: str) -> None:
        self.nc = nc
        self.stream = stream
        self.consumer = consumer
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Any = None
        self._buffer: list[Any] = []
        self._requests: dict[str, tuple[asyncio.Future[None], list[int]]] = {}
        self._current = ""
        self._serial = 0
        self._error: str | None = None

    async def start(self) -> Puller:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        """Up to ``batch`` messages in stream order; ``TimeoutError`` if none came in time."""
        if len(self._buffer) < batch:
            await self._request({"batch": batch - len(self._buffer), "no_wait": True}, timeout)
        if not self._buffer:
            await self._request({"batch": 1, "expires": int(timeout * 1e9)}, timeout)
        if self._error is not None:
            error, self._error = self._error, None
            raise nats.errors.Error(f"pull from {self.stream}/{self.consumer}: {error}")
        if not self._buffer:
            raise TimeoutError
        out, self._buffer = self._buffer[:batch], self._buffer[batch:]
        return out

    async def _request(self, ask: dict[str, Any], timeout: float) -> None:
        self._serial += 1
        token = str(self._serial)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._requests[token] = (done, [int(ask["batch"])])
        self._current = token
        try:
            await self.nc.publish(
                self._next_subject, json.dumps(ask).encode(), reply=f"{self._inbox}.{token}"
            )
            # The server ends every request itself (batch filled, 404, 408); the margin only
            # guards against a lost connection.
            await asyncio.wait([done], timeout=timeout + 2.0)
        finally:
            self._requests.pop(token, None)

    async def _on_msg(self, msg: Any) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            # Stream messages keep their own subject, so they count against the one request
            # in flight; a straggler of an abandoned one at worst ends this request early.
            self._buffer.append(msg)
            request = self._requests.get(self._current)
            if request is not None:
                request[1][0] -= 1
                if request[1][0] <= 0:
                    self._finish(self._current)
            return
        token = msg.subject[len(self._inbox) + 1 :]
        if status == "100":  # idle heartbeat
            return
        if status not in ("404", "408") and token in self._requests:
            self._error = f"{status} {msg.headers.get('Description', '')}".strip()
        self._finish(token)

    def _finish(self, token: str) -> None:
        request = self._requests.pop(token, None)
        if request is not None and not request[0].done():
            request[0].set_result(None)


def decode_all(msgs: Sequence[Any]) -> Iterator[Envelope]:
    envelopes, _ = decode_batch(msgs)
    yield from envelopes


def decode_batch(msgs: Sequence[Any]) -> tuple[list[Envelope], list[Quarantined]]:
    """Decode a fetched batch; what cannot be decoded is quarantined by ``apply_batch``
    rather than blocking the projector (the log keeps the message for inspection)."""
    envelopes: list[Envelope] = []
    bad: list[Quarantined] = []
    for msg in msgs:
        seq = stream_seq(msg)
        try:
            envelopes.append(codec.decode(msg.data, seq=seq))
        except (codec.CodecError, RecursionError) as exc:
            bad.append(Quarantined(seq, str(msg.subject), "undecodable", str(exc)[:500]))
    return envelopes, bad


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
    metrics: ControlMetrics = field(default_factory=ControlMetrics)
    # For the lag metrics: whether this process holds the projector's lock, events known to
    # wait behind the checkpoint, and when the newest applied event was stored.
    active: bool = False
    waiting: int = 0
    applied_at: float = 0.0

    def __post_init__(self) -> None:
        self.metrics.follow_projector(self.name, active=lambda: self.active, lag=self.lag)

    def lag(self) -> tuple[int, float]:
        """Events waiting, and seconds: while any wait, the age of the newest applied event."""
        if not self.active or self.waiting <= 0:
            return 0, 0.0
        age = time.time() - self.applied_at if self.applied_at else 0.0
        return self.waiting, max(0.0, age)

    async def run(self, nc: NATS, stop: asyncio.Event) -> None:
        """Project until ``stop`` is set, retrying through bus and database failures."""
        while not stop.is_set():
            try:
                await self._run_once(nc, stop)
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                nats.errors.Error,
                DeliveryGap,
            ) as exc:
                _log.warning("projector restarting", projector=self.name, error=repr(exc))
                await self._count_waiting(nc)
                await sleep_or_stop(1.0, stop)
            except Exception:
                # A bug must not silently stop every read model: log it loudly and resume from
                # the checkpoint, which makes the retry safe.
                _log.exception("projector failed; restarting", projector=self.name)
                await self._count_waiting(nc)
                await sleep_or_stop(1.0, stop)
        self.active = False

    async def _count_waiting(self, nc: NATS) -> None:
        """While the projector cannot run, keep its lag growing with the stream (best effort)."""
        with contextlib.suppress(Exception):
            info = await nc.jetstream(timeout=2).stream_info(self.stream)
            self.waiting = max(0, int(info.state.last_seq) - self.applied_seq)

    async def _run_once(self, nc: NATS, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema})
        try:
            # One active instance per projector across all control-plane processes: a shared
            # pull consumer would split batches between them and the checkpoint would skip some.
            while not await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtext($1))",
                f"damm-projector-{self.schema}-{self.name}",
            ):
                self.active = False
                if stop.is_set():
                    return
                await sleep_or_stop(1.0, stop)
            self.active = True
            self.applied_seq = await checkpoint(conn, self.name)
            js = nc.jetstream(timeout=10)
            puller = await self._subscribe(js, nc, self.applied_seq)
            delivered = 0  # a consumer made afresh numbers its deliveries from 1
            # Fetch the next batch while this one is applied: the bus and Postgres then work at
            # the same time instead of taking turns. Acks still follow commits in order.
            ahead = asyncio.create_task(puller.fetch(self.batch_size, 0.5))
            try:
                while not stop.is_set():
                    try:
                        msgs = await ahead
                    except (TimeoutError, nats.errors.TimeoutError):
                        self.waiting = 0
                        self.caught_up.set()
                        ahead = asyncio.create_task(puller.fetch(self.batch_size, 0.5))
                        continue
                    ahead = asyncio.create_task(puller.fetch(self.batch_size, 0.5))
                    delivered = check_deliveries(delivered, msgs)
                    envelopes, undecodable = decode_batch(msgs)
                    self.applied_seq = await apply_batch(
                        conn, self.name, envelopes, self.project, undecodable
                    )
                    # Everything after the batch was still undelivered when its last message
                    # came, prefetched or not, so that message's pending count is the backlog.
                    self.applied_at, self.waiting = stream_position(msgs[-1])
                    await msgs[-1].ack()
                    if len(msgs) < self.batch_size:
                        self.caught_up.set()
            finally:
                ahead.cancel()
                ahead.add_done_callback(_retrieve)
                await puller.stop()
        finally:
            await conn.close()

    async def _subscribe(self, js: Any, nc: NATS, after: int) -> Puller:
        durable = f"proj-{self.name}"
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(self.stream, durable)
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
            max_ack_pending=-1,
            ack_wait=30,
            filter_subject=self.filter_subject,
        )
        await js.add_consumer(self.stream, config)
        return await Puller(nc, self.stream, durable).start()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark an abandoned prefetch's outcome as seen: it is moot once its projector stopped."""
    if not task.cancelled():
        task.exception()
