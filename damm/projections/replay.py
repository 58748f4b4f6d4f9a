"""Rebuild the read models from the event log, prove the live ones match, or swap them out.

The read models are derived state; the log is the truth. Replay folds DAMM_EVENTS from sequence 1
into a shadow schema with the same migrations and the same ``apply_batch`` the live projector
uses, so any difference between shadow and live is a bug or tampering, never a second code path.

``verify`` compares at one exact log position: the live checkpoint, re-read in the same
REPEATABLE READ snapshot as the comparison, so a projector that keeps running cannot produce a
false alarm. ``replace_live`` swaps the shadow in under a lock the live projectors wait on; they
fail their next statement, reconnect and resume from the checkpoint that came with the new schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from damm import log
from damm.clock import cancel_and_wait
from damm.errors import Code, DammError
from damm.projections.migrate import check_schema, migrate
from damm.projections.readmodels import REPLAYED_TABLES
from damm.projections.runner import (
    Puller,
    Quarantined,
    apply_batch,
    checkpoint,
    decode_batch,
    quarantined,
    stream_seq,
)
from damm.subjects import EVENTS_STREAM

_log = log.get("damm.replay")

Progress = Callable[[int, int], None]
_Item = tuple[int, list[Any]] | BaseException | None

PROJECTOR = "readmodels"
OLD_SCHEMA = "damm_old"
FETCH = 1000
SAMPLES = 5
SWAP_ATTEMPTS = 3
# Tables filled from other streams (telemetry) that a swap must carry over, not rebuild.
CARRIED_TABLES = ("gateway_health",)


@dataclass(frozen=True)
class TableDiff:
    """Row-multiset difference of one table: rows the log implies that live lacks, and back."""

    missing_in_live: int = 0
    extra_in_live: int = 0
    samples: tuple[tuple[str, dict[str, Any]], ...] = ()
    rows: int = 0

    @property
    def ok(self) -> bool:
        return self.missing_in_live == 0 and self.extra_in_live == 0


@dataclass
class VerifyReport:
    seq: int
    tables: dict[str, TableDiff] = field(default_factory=dict)
    # Events the live projector set aside: the read models cannot be said to match the log.
    quarantined: tuple[Quarantined, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.quarantined and all(diff.ok for diff in self.tables.values())

    @property
    def differing(self) -> dict[str, TableDiff]:
        return {name: diff for name, diff in self.tables.items() if not diff.ok}


class ReplayError(DammError):
    """The log cannot be replayed to the requested position."""

    def __init__(self, detail: str) -> None:
        super().__init__(Code.REPLAY_FAILED, detail)


async def rebuild(
    nc: NATS,
    dsn: str,
    *,
    live_schema: str = "damm",
    shadow_schema: str = "damm_replay",
    upto: int | None = None,
    progress: Progress | None = None,
    stream: str = EVENTS_STREAM,
) -> int:
    """Build ``shadow_schema`` from scratch up to ``upto`` (default: the log's head right now)."""
    _check_pair(live_schema, shadow_schema)
    async with _shadow_conn(dsn, shadow_schema, fresh=True) as conn:
        target = await _stream_head(nc, stream) if upto is None else upto
        return await _fold(nc, conn, stream, 0, target, progress)


async def verify(
    nc: NATS,
    dsn: str,
    *,
    live_schema: str = "damm",
    shadow_schema: str = "damm_replay",
    progress: Progress | None = None,
    keep_shadow: bool = False,
    stream: str = EVENTS_STREAM,
    projector: str = PROJECTOR,
) -> VerifyReport:
    """Compare every replayed table of ``live_schema`` with a replay to the live checkpoint.

    The live tables are copied at one instant (a repeatable-read snapshot that also fixes the
    checkpoint), and the log is replayed to exactly that checkpoint. A projector that keeps
    moving meanwhile changes nothing about the comparison, so verification ends in one pass
    however busy the log is.
    """
    _check_pair(live_schema, shadow_schema)
    frozen = f"{shadow_schema}_live"
    check_schema(frozen)
    live = await asyncpg.connect(dsn)
    try:
        async with live.transaction(isolation="repeatable_read"):
            seq = await _live_checkpoint(live, live_schema, projector)
            held = tuple(await quarantined(live, projector, live_schema))
            await live.execute(f"DROP SCHEMA IF EXISTS {frozen} CASCADE")
            await live.execute(f"CREATE SCHEMA {frozen}")
            for table in REPLAYED_TABLES:
                await live.execute(
                    f"CREATE TABLE {frozen}.{table} AS SELECT * FROM {live_schema}.{table}"
                )
        try:
            async with _shadow_conn(dsn, shadow_schema, fresh=True) as shadow:
                try:
                    await _fold(nc, shadow, stream, 0, seq, progress, projector)
                    tables = {
                        t: await _diff(live, frozen, shadow_schema, t) for t in REPLAYED_TABLES
                    }
                    return VerifyReport(seq=seq, tables=tables, quarantined=held)
                finally:
                    if not keep_shadow:
                        await shadow.execute(f"DROP SCHEMA IF EXISTS {shadow_schema} CASCADE")
        finally:
            await live.execute(f"DROP SCHEMA IF EXISTS {frozen} CASCADE")
    finally:
        await live.close()


async def replace_live(
    nc: NATS,
    dsn: str,
    *,
    live_schema: str = "damm",
    shadow_schema: str = "damm_replay",
    progress: Progress | None = None,
    stream: str = EVENTS_STREAM,
    projector: str = PROJECTOR,
) -> int:
    """Rebuild the read models from the log and atomically put them in place of the live ones.

    The bulk of the work happens beside the live schema while it keeps serving; only the final
    catch-up (events the live projector applied meanwhile) and the renames run under the lock.
    Returns the checkpoint the new live schema starts from.
    """
    _check_pair(live_schema, shadow_schema)
    async with _shadow_conn(dsn, shadow_schema, fresh=True) as conn:
        try:
            head = await _stream_head(nc, stream)
            seq = await _fold(nc, conn, stream, 0, head, progress, projector)
            for attempt in range(1, SWAP_ATTEMPTS + 1):
                try:
                    return await _swap(
                        nc, conn, stream, seq, live_schema, shadow_schema, projector, progress
                    )
                except (asyncpg.DeadlockDetectedError, asyncpg.LockNotAvailableError) as exc:
                    # A reader held a live table while we held the checkpoint: nothing changed,
                    # the shadow is intact, try again.
                    _log.warning("replay swap retry", attempt=attempt, error=repr(exc))
                    seq = await checkpoint(conn, projector)
            raise ReplayError(f"could not take the live schema's locks in {SWAP_ATTEMPTS} tries")
        except BaseException:
            await conn.execute(f"DROP SCHEMA IF EXISTS {shadow_schema} CASCADE")
            raise


async def _swap(
    nc: NATS,
    conn: Any,
    stream: str,
    seq: int,
    live: str,
    shadow: str,
    projector: str,
    progress: Progress | None,
) -> int:
    async with conn.transaction():
        # The checkpoint first: every projector's batch starts by locking its row, so from here
        # on no batch commits into the live schema until we are done.
        await conn.execute(f"LOCK TABLE {live}.checkpoint IN ACCESS EXCLUSIVE MODE")
        await conn.execute(
            "LOCK TABLE "
            + ", ".join(f"{live}.{t}" for t in (*REPLAYED_TABLES, *CARRIED_TABLES))
            + " IN ACCESS EXCLUSIVE MODE"
        )
        live_seq = await _live_checkpoint(conn, live, projector)
        if live_seq > seq:
            seq = await _fold(nc, conn, stream, seq, live_seq, progress, projector)
        await conn.execute(
            f"INSERT INTO {shadow}.checkpoint (projector, last_seq)"
            f" SELECT projector, last_seq FROM {live}.checkpoint WHERE projector <> $1",
            projector,
        )
        for table in CARRIED_TABLES:
            await conn.execute(f"INSERT INTO {shadow}.{table} SELECT * FROM {live}.{table}")
        await conn.execute(f"DROP SCHEMA IF EXISTS {OLD_SCHEMA} CASCADE")
        await conn.execute(f"ALTER SCHEMA {live} RENAME TO {OLD_SCHEMA}")
        await conn.execute(f"ALTER SCHEMA {shadow} RENAME TO {live}")
        await conn.execute(f"DROP SCHEMA {OLD_SCHEMA} CASCADE")
    _log.info("read models replaced", schema=live, seq=seq)
    return seq


# --- folding the log --------------------------------------------------------------------------


async def _fold(
    nc: NATS,
    conn: Any,
    stream: str,
    after: int,
    upto: int,
    progress: Progress | None,
    projector: str = PROJECTOR,
) -> int:
    """Apply stream messages ``after+1 .. upto`` to the schema on ``conn``'s search path.

    Fetching runs one batch ahead of applying so the bus and the database work at the same
    time; each applied batch is its own transaction with the checkpoint, like the projector's.
    """
    if upto <= after:
        return after
    queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=4)
    reader = asyncio.create_task(_read(nc, stream, after, upto, queue))
    done = after
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            done, msgs = item
            decoded, undecodable = decode_batch(msgs)
            envelopes = [e for e in decoded if e.seq <= upto]
            bad = [q for q in undecodable if q.seq <= upto]
            if envelopes or bad:
                await apply_batch(conn, projector, envelopes, undecodable=bad)
            if progress is not None:
                progress(done, upto)
        await reader
    finally:
        await cancel_and_wait(reader)
    return done


async def _read(nc: NATS, stream: str, after: int, upto: int, queue: asyncio.Queue[_Item]) -> None:
    try:
        await _read_into(nc, stream, after, upto, queue)
    except Exception as exc:  # handed to the applying side, which owns error handling
        await queue.put(exc)


async def _read_into(
    nc: NATS, stream: str, after: int, upto: int, queue: asyncio.Queue[_Item]
) -> None:
    js = nc.jetstream(timeout=10)
    config = ConsumerConfig(
        name=f"replay-{uuid.uuid4().hex[:12]}",
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=after + 1,
        inactive_threshold=60.0,
        mem_storage=True,
        num_replicas=1,
    )
    info = await js.add_consumer(stream, config)
    puller = await Puller(nc, stream, info.name).start()
    try:
        pos = after
        while pos < upto:
            try:
                msgs = await puller.fetch(min(FETCH, upto - pos), timeout=2.0)
            except (TimeoutError, nats.errors.TimeoutError):
                state = (await js.stream_info(stream)).state
                if int(state.last_seq) < upto:
                    raise ReplayError(
                        f"{stream} ends at {state.last_seq}, asked to replay to {upto}"
                    ) from None
                continue
            kept = [m for m in msgs if stream_seq(m) <= upto]
            if not kept:
                break
            pos = stream_seq(kept[-1])
            await queue.put((pos, kept))
        await queue.put(None)
    finally:
        with contextlib.suppress(Exception):
            await puller.stop()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)


async def _stream_head(nc: NATS, stream: str) -> int:
    info = await nc.jetstream(timeout=10).stream_info(stream)
    return int(info.state.last_seq)


# --- schemas ----------------------------------------------------------------------------------


def _check_pair(live: str, shadow: str) -> None:
    check_schema(live)
    check_schema(shadow)
    if live == shadow or OLD_SCHEMA in (live, shadow):
        raise ValueError(f"live {live!r} and shadow {shadow!r} must differ, neither {OLD_SCHEMA!r}")


@contextlib.asynccontextmanager
async def _shadow_conn(dsn: str, shadow: str, *, fresh: bool) -> AsyncIterator[Any]:
    """A connection whose unqualified table names are the shadow's, as ``apply_batch`` expects."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": shadow})
    try:
        if fresh:
            await _reset_shadow(conn, shadow)
        yield conn
    finally:
        await conn.close()


async def _reset_shadow(conn: Any, shadow: str) -> None:
    await conn.execute(f"DROP SCHEMA IF EXISTS {shadow} CASCADE")
    await migrate(conn, shadow)
    # migrate sets search_path only for its own transaction; ours already names the shadow,
    # but plans cached against the dropped schema must not survive.
    await conn.reload_schema_state()


async def _live_checkpoint(conn: Any, live: str, projector: str) -> int:
    seq = await conn.fetchval(
        f"SELECT last_seq FROM {live}.checkpoint WHERE projector = $1", projector
    )
    return int(seq or 0)


# --- comparing --------------------------------------------------------------------------------


async def _columns(conn: Any, schema: str, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
        schema,
        table,
    )
    return [r["column_name"] for r in rows]


async def _diff(conn: Any, live: str, shadow: str, table: str) -> TableDiff:
    # Name the shadow's columns explicitly: a live schema with a column order that drifted
    # (hand-applied ALTERs) still compares by name, and a missing column fails loudly.
    cols = ", ".join(f'"{c}"' for c in await _columns(conn, shadow, table))
    extra = f"SELECT {cols} FROM {live}.{table} EXCEPT ALL SELECT {cols} FROM {shadow}.{table}"
    missing = f"SELECT {cols} FROM {shadow}.{table} EXCEPT ALL SELECT {cols} FROM {live}.{table}"
    samples: list[tuple[str, dict[str, Any]]] = []
    counts: dict[str, int] = {}
    for side, sql in (("missing_in_live", missing), ("extra_in_live", extra)):
        counts[side] = int(await conn.fetchval(f"SELECT count(*) FROM ({sql}) d"))
        if counts[side]:
            rows = await conn.fetch(f"SELECT * FROM ({sql}) d LIMIT {SAMPLES}")
            samples.extend((side, dict(r)) for r in rows)
    rows_live = int(await conn.fetchval(f"SELECT count(*) FROM {live}.{table}"))
    return TableDiff(
        missing_in_live=counts["missing_in_live"],
        extra_in_live=counts["extra_in_live"],
        samples=tuple(samples),
        rows=rows_live,
    )


def describe(report: VerifyReport) -> Sequence[str]:
    """One line per differing table, for the CLI and logs."""
    lines = [
        f"{Code.EVENT_QUARANTINED.slug}: event {q.seq} on {q.subject} ({q.event_type}): {q.error}"
        for q in report.quarantined
    ]
    for name, diff in report.differing.items():
        lines.append(
            f"{name}: {diff.missing_in_live} row(s) missing in live,"
            f" {diff.extra_in_live} extra in live"
        )
    return lines
