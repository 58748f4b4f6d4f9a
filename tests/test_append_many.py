"""Pipelined appends: order, headers (dedupe, expected sequence) and errors behave like append."""

from __future__ import annotations

import pytest

from damm.events import model as m
from damm.events.store import Append, ConflictError, EventStore, envelope
from damm.subjects import event_subject

ADMIN = m.Actor("admin", "alice")


def usage(n: int, *, msg_id: str | None = None, expected: int | None = None) -> Append:
    subject = event_subject("gateway", f"gw-{n % 3}")
    event = m.UsageReported(
        gateway_id=f"gw-{n % 3}", report_id=f"r{n}", deltas=(m.UsageDelta(f"dev-{n}", n, 2 * n),)
    )
    env = envelope(subject, event, actor=ADMIN, correlation_id=f"c{n}")
    return Append(subject, env, expected_seq=expected, msg_id=msg_id)


async def test_sequences_follow_item_order_across_windows(store: EventStore) -> None:
    items = [usage(n) for n in range(50)]
    results = await store.append_many(items, window=7)
    assert [r.seqs for r in results] == [(n,) for n in range(1, 51)]
    assert not any(r.duplicate for r in results)
    history, _ = await store.load(event_subject("gateway", "gw-1"))
    assert [
        e.event.report_id
        for e in history  # type: ignore[union-attr]
    ] == [f"r{n}" for n in range(50) if n % 3 == 1]


async def test_msg_ids_dedupe_a_retried_call(store: EventStore) -> None:
    items = [usage(n, msg_id=f"req-{n}") for n in range(20)]
    first = await store.append_many(items)
    again = await store.append_many(items)
    assert [r.seqs for r in again] == [r.seqs for r in first]
    assert all(r.duplicate for r in again)
    assert await store.stream_last_seq() == 20


async def test_expected_sequence_conflict_and_retry(store: EventStore) -> None:
    subject = event_subject("gateway", "gw-0")
    await store.append_many([usage(0, expected=0, msg_id="a"), usage(3, expected=1, msg_id="b")])
    assert await store.last_seq(subject) == 2
    # A retry of the landed one is recognised as ours (10071 before dedupe) ...
    retry = await store.append_many([usage(3, expected=1, msg_id="b")])
    assert retry[0].duplicate and retry[0].seqs == (2,)
    # ... a stale writer without that message id is a conflict, and nothing after it is lost.
    with pytest.raises(ConflictError):
        await store.append_many([usage(6, expected=1, msg_id="c"), usage(7)])
    assert await store.stream_last_seq() == 3  # the independent item in the window landed


async def test_empty_and_bad_window(store: EventStore) -> None:
    assert await store.append_many([]) == []
    with pytest.raises(ValueError):
        await store.append_many([usage(1)], window=0)
