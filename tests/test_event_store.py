"""The event log against a real nats-server: round trips, conflicts, retries, atomicity."""

from __future__ import annotations

import asyncio

import pytest

from damm.events import model as m
from damm.events.store import Append, ConflictError, EventStore, envelope
from damm.subjects import event_subject

ADMIN = m.Actor("admin", "alice")


def tier_append(
    name: str,
    expected: int | None = None,
    msg_id: str | None = None,
    regions: tuple[str, ...] = ("eu",),
) -> Append:
    subject = event_subject("tier", name)
    env = envelope(
        subject,
        m.TierDefined(tier=name, regions=regions),
        actor=ADMIN,
        correlation_id=msg_id or "c1",
    )
    return Append(subject, env, expected_seq=expected, msg_id=msg_id)


async def test_append_load_round_trip(store: EventStore) -> None:
    first = await store.append(tier_append("gold", expected=0))
    second = await store.append(tier_append("gold", expected=first.seqs[0], regions=("eu", "us")))
    await store.append(tier_append("silver", expected=0))
    history, last = await store.load(event_subject("tier", "gold"))
    assert [e.seq for e in history] == [first.seqs[0], second.seqs[0]]
    assert last == second.seqs[0]
    assert history[1].event == m.TierDefined(tier="gold", regions=("eu", "us"))
    assert history[0].actor == ADMIN
    assert history[0].aggregate == "tier/gold"


async def test_concurrent_appends_exactly_one_wins(store: EventStore) -> None:
    await store.append(tier_append("gold", expected=0))
    last = await store.last_seq(event_subject("tier", "gold"))
    results = await asyncio.gather(
        *(store.append(tier_append("gold", expected=last, msg_id=f"req-{i}")) for i in range(8)),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    conflicts = [r for r in results if isinstance(r, ConflictError)]
    assert len(wins) == 1 and len(conflicts) == 7
    history, _ = await store.load(event_subject("tier", "gold"))
    assert len(history) == 2


async def test_retry_recorded_once_even_with_expected_sequence(store: EventStore) -> None:
    """JetStream: the sequence check runs before dedupe, so the retry gets 10071."""
    item = tier_append("gold", expected=0, msg_id="req-42")
    first = await store.append(item)
    again = await store.append(item)
    assert again.duplicate and again.seqs == first.seqs
    plain = tier_append("silver", msg_id="req-43")
    one = await store.append(plain)
    two = await store.append(plain)
    assert two.seqs == one.seqs
    assert await store.stream_last_seq() == 2


async def test_atomic_batch_all_or_nothing(store: EventStore) -> None:
    await store.append(tier_append("taken", expected=0))
    before = await store.stream_last_seq()
    with pytest.raises(ConflictError):
        await store.append_batch(
            [
                tier_append("a", expected=0),
                tier_append("taken", expected=0),
                tier_append("b", expected=0),
            ]
        )
    assert await store.stream_last_seq() == before
    ok = await store.append_batch([tier_append("a", expected=0), tier_append("b", expected=0)])
    assert ok.seqs == (before + 1, before + 2)


async def test_batch_retry_is_recognised(store: EventStore) -> None:
    batch = [tier_append("a", expected=0), tier_append("b", expected=0, msg_id="enroll-7")]
    first = await store.append_batch(batch)
    again = await store.append_batch(batch)
    assert again.duplicate and again.seqs == (first.seqs[1],)
    assert await store.stream_last_seq() == 2
