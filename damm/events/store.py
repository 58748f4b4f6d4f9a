"""Appending to and reading from the event log.

Every append may carry an expected last subject sequence (optimistic concurrency per aggregate)
and a message id (a retried request is recorded once). Decisions that touch several aggregates
are appended as one JetStream atomic batch, so a failure never leaves half a decision behind.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from damm.errors import Code, DammError
from damm.events import codec
from damm.events.model import Actor, Envelope, Event, event_type_name
from damm.metrics import ControlMetrics
from damm.subjects import EVENT_PREFIX, EVENTS_STREAM

WRONG_LAST_SEQUENCE = 10071
# What a clustered stream answers an atomic batch whose expected sequence no longer holds (seen
# on a three-node cluster): a lost race like 10071, not an infrastructure failure.
BATCH_WRONG_LAST_SEQUENCE = 10164
BATCH_DUPLICATE_MSG_ID = 10201
MAX_BATCH = 1000


class ConflictError(DammError):
    """Another writer appended to the aggregate first; re-read and decide again."""

    def __init__(self, subject: str, detail: str) -> None:
        self.subject = subject
        super().__init__(Code.CONFLICT, f"{subject}: {detail}")


class AppendError(DammError):
    """The log refused or did not acknowledge an append for a reason other than a conflict
    (a full disk, no stream, a lost leader): nothing was decided, the request may be retried.

    ``transient`` marks the refusals that pass by themselves within seconds (no stream leader
    while a cluster elects one), which the committer retries until the request's deadline."""

    def __init__(self, detail: str, *, transient: bool = False) -> None:
        self.transient = transient
        super().__init__(Code.UNAVAILABLE, f"the event log refused the append: {detail}")


@dataclass(frozen=True, slots=True)
class Append:
    """One message of a decision. ``expected_seq`` 0 means the subject must still be empty.

    ``expected_subject`` moves that expectation to another subject or a wildcard (a family of
    subjects), e.g. every catalog and leader term at once.
    """

    subject: str
    envelope: Envelope
    expected_seq: int | None = None
    msg_id: str | None = None
    expected_subject: str | None = None

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.expected_seq is not None:
            h["Nats-Expected-Last-Subject-Sequence"] = str(self.expected_seq)
            if self.expected_subject is not None:
                h["Nats-Expected-Last-Subject-Sequence-Subject"] = self.expected_subject
        if self.msg_id is not None:
            h["Nats-Msg-Id"] = self.msg_id
        return h


@dataclass(frozen=True, slots=True)
class Appended:
    """Where a decision landed: the sequence of each message, or that it was there already."""

    seqs: tuple[int, ...]
    duplicate: bool = False


def envelope(
    subject: str,
    event: Event,
    *,
    actor: Actor,
    correlation_id: str,
    now: datetime | None = None,
    aggregate: str | None = None,
) -> Envelope:
    if aggregate is None:
        _, _, rest = subject.partition(f"{EVENT_PREFIX}.")
        kind, _, ident = rest.partition(".")
        aggregate = f"{kind}/{ident}"
    return Envelope(
        id=uuid.uuid4().hex,
        type=event_type_name(event),
        aggregate=aggregate,
        occurred_at=now or datetime.now(UTC),
        actor=actor,
        correlation_id=correlation_id,
        event=event,
    )


class EventStore:
    def __init__(
        self,
        nc: NATS,
        *,
        stream: str = EVENTS_STREAM,
        timeout: float = 5.0,
        metrics: ControlMetrics | None = None,
    ) -> None:
        self.nc = nc
        self.metrics = metrics or ControlMetrics()
        self.js = nc.jetstream(timeout=timeout)
        self.stream = stream
        self.timeout = timeout

    async def append(self, item: Append) -> Appended:
        return await self.append_batch([item])

    async def publish_telemetry(self, subject: str, env: Envelope) -> int:
        """High-volume telemetry (heartbeats) to its own stream; returns its sequence there."""
        ack = await self.js.publish(subject, codec.encode(env))
        return int(ack.seq)

    async def append_batch(
        self, items: Sequence[Append], *, ack_timeout: float | None = None
    ) -> Appended:
        """Append all of ``items`` or none of them.

        ``ack_timeout`` (default: the store's) bounds the wait for the log's acknowledgement; a
        caller that can safely retry (message ids) waits less, so a dead stream leader costs
        one short wait rather than the caller's whole deadline.

        A 10071 or 10201 on a message that carries a Msg-Id may mean our own earlier attempt
        landed (JetStream runs the sequence check before dedupe), so the subject's last
        message is compared with ours before calling it a conflict.
        """
        if not items:
            return Appended(())
        if len(items) > MAX_BATCH:
            raise AppendError(f"a batch holds at most {MAX_BATCH} messages, got {len(items)}")
        seqs: tuple[int, ...]
        try:
            wait = ack_timeout or self.timeout
            if len(items) == 1:
                seq, duplicate = await self._publish_one(items[0], wait)
                return Appended((seq,), duplicate=duplicate)
            else:
                seqs = await self._publish_atomic(items, wait)
        except _Refused as refused:
            if refused.err_code in _CONFLICTS:
                mine = await self._already_mine(items)
                if mine is not None:
                    return Appended((mine,), duplicate=True)
                subject = next((i.subject for i in items if i.expected_seq is not None), "")
                raise ConflictError(subject, refused.description) from None
            raise AppendError(f"{refused.err_code}: {refused.description}") from None
        return Appended(seqs)

    async def append_many(self, items: Sequence[Append], window: int = 1000) -> list[Appended]:
        """Append independent messages with up to ``window`` acknowledgements in flight.

        Awaiting each round trip in series caps the log at a few thousand appends a second
        (about 3-5k/s here, against 30-50k/s pipelined); bulk writers (usage reports, imports,
        benchmarks) pipeline instead.
        Unlike ``append_batch`` this is not atomic: when one item is refused, the rest of its
        window and all earlier windows may have landed; later windows are not sent. Retrying the
        whole call is safe when the items carry msg ids. Refusals raise like ``append``.

        nats-py's ``publish_async`` is not used: in 2.16 an error ack raises inside its reply
        handler and the future never completes, so a conflict would look like a timeout.
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        if not items:
            return []
        loop = asyncio.get_running_loop()
        inbox = self.nc.new_inbox()
        waiting: dict[str, asyncio.Future[Any]] = {}

        async def on_ack(msg: Any) -> None:
            future = waiting.pop(msg.subject[len(inbox) + 1 :], None)
            if future is None or future.done():
                return
            if msg.headers and msg.headers.get("Status") == "503":
                future.set_result({"error": {"err_code": 0, "description": "no responders"}})
            else:
                future.set_result(json.loads(msg.data))

        sub = await self.nc.subscribe(f"{inbox}.*", cb=on_ack)
        results: list[Appended] = []
        try:
            for start in range(0, len(items), window):
                chunk = items[start : start + window]
                futures: list[asyncio.Future[Any]] = []
                for n, item in enumerate(chunk, start):
                    future = loop.create_future()
                    waiting[str(n)] = future
                    futures.append(future)
                    await self.nc.publish(
                        item.subject,
                        codec.encode(item.envelope),
                        reply=f"{inbox}.{n}",
                        headers=item.headers() or None,
                    )
                _, pending = await asyncio.wait(futures, timeout=self.timeout)
                if pending:
                    raise AppendError(f"{len(pending)} append(s) not acknowledged in time")
                for item, future in zip(chunk, futures, strict=True):
                    ack: dict[str, Any] = future.result()
                    error = ack.get("error")
                    if error:
                        results.append(
                            await self._explain(
                                item,
                                int(error.get("err_code", 0)),
                                str(error.get("description", "")),
                            )
                        )
                    else:
                        duplicate = bool(ack.get("duplicate"))
                        results.append(Appended((int(ack["seq"]),), duplicate=duplicate))
                        if not duplicate:
                            self._count([item])
        finally:
            await sub.unsubscribe()
        return results

    def _count(self, items: Sequence[Append]) -> None:
        for item in items:
            self.metrics.events_appended.labels(item.envelope.type).inc()

    async def _explain(self, item: Append, err_code: int, description: str) -> Appended:
        """What ``append`` would have said about a refused pipelined message."""
        if err_code in _CONFLICTS:
            mine = await self._already_mine([item])
            if mine is not None:
                return Appended((mine,), duplicate=True)
            raise ConflictError(item.subject, description)
        raise AppendError(f"{item.subject}: {err_code}: {description}")

    async def _publish_one(self, item: Append, timeout: float) -> tuple[int, bool]:
        try:
            ack = await self.js.publish(
                item.subject,
                codec.encode(item.envelope),
                timeout=timeout,
                headers=item.headers() or None,
            )
        except APIError as exc:
            raise _Refused(exc.err_code or 0, exc.description or str(exc)) from None
        if ack.duplicate:
            seq = await self._already_mine([item])
            return (seq if seq is not None else int(ack.seq)), True
        self._count([item])
        return int(ack.seq), False

    async def _publish_atomic(self, items: Sequence[Append], timeout: float) -> tuple[int, ...]:
        batch_id = uuid.uuid4().hex
        last = len(items)
        for n, item in enumerate(items, 1):
            headers = item.headers()
            headers["Nats-Batch-Id"] = batch_id
            headers["Nats-Batch-Sequence"] = str(n)
            data = codec.encode(item.envelope)
            if n < last:
                await self.nc.publish(item.subject, data, headers=headers)
                continue
            headers["Nats-Batch-Commit"] = "1"
            try:
                reply = await self.nc.request(item.subject, data, timeout=timeout, headers=headers)
            except nats.errors.NoRespondersError:
                raise AppendError("no stream accepts the batch subject", transient=True) from None
            ack: dict[str, Any] = json.loads(reply.data)
            error = ack.get("error")
            if error:
                raise _Refused(int(error.get("err_code", 0)), str(error.get("description", "")))
            end = int(ack["seq"])
            self._count(items)
            return tuple(range(end - last + 1, end + 1))
        raise AssertionError("unreachable")

    async def _already_mine(self, items: Sequence[Append]) -> int | None:
        for item in items:
            if item.msg_id is None:
                continue
            try:
                raw = await self.js.get_last_msg(self.stream, item.subject)
            except NotFoundError:
                return None
            if raw.headers and raw.headers.get("Nats-Msg-Id") == item.msg_id:
                return int(raw.seq or 0)
            return None
        return None

    async def last_seq(self, subject: str) -> int:
        try:
            raw = await self.js.get_last_msg(self.stream, subject)
        except NotFoundError:
            return 0
        return int(raw.seq or 0)

    async def last(self, subject: str) -> Envelope | None:
        """The last message on a subject (or a wildcard family), decoded with its sequence."""
        try:
            raw = await self.js.get_last_msg(self.stream, subject)
        except NotFoundError:
            return None
        seq = int(raw.seq or 0)
        return codec.decode(raw.data or b"", seq=seq)

    async def stream_last_seq(self) -> int:
        info = await self.js.stream_info(self.stream)
        return int(info.state.last_seq)

    async def load(self, subject: str) -> tuple[list[Envelope], int]:
        """One aggregate's history in order, plus the sequence to expect on the next append."""
        last = await self.last_seq(subject)
        if last == 0:
            return [], 0
        sub = await self.js.subscribe(
            subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, stream=self.stream
        )
        history: list[Envelope] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=self.timeout)
                seq = int(msg.metadata.sequence.stream)
                history.append(codec.decode(msg.data, seq=seq))
                if seq >= last:
                    break
        finally:
            await sub.unsubscribe()
        return history, last


_CONFLICTS = (WRONG_LAST_SEQUENCE, BATCH_WRONG_LAST_SEQUENCE, BATCH_DUPLICATE_MSG_ID)


class _Refused(Exception):
    def __init__(self, err_code: int, description: str) -> None:
        self.err_code = err_code
        self.description = description
        super().__init__(f"{err_code}: {description}")
