"""Heartbeats reach Postgres coalesced: one row per gateway per batch, the same result as
applying every heartbeat in turn."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from damm.events import model as m
from damm.events.store import envelope
from damm.projections.runner import plan

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def beat(gw: str, offset: int, load: float) -> m.Envelope:
    subject = f"damm.tel.heartbeat.{gw}"
    event = m.GatewayHeartbeat(
        gateway_id=gw, peer_count=0, active_peers=0, rx_bytes=0, tx_bytes=0, load=load
    )
    return envelope(
        subject,
        event,
        actor=m.Actor("gateway", gw),
        correlation_id="c",
        now=T0 + timedelta(seconds=offset),
        aggregate=f"gateway/{gw}",
    )


def upsert_in_turn(rows: list[tuple[object, ...]]) -> dict[object, tuple[object, ...]]:
    """What the statement's ``WHERE last_heartbeat <= EXCLUDED.last_heartbeat`` does per row."""
    table: dict[object, tuple[object, ...]] = {}
    for row in rows:
        old = table.get(row[0])
        if old is None or old[1] <= row[1]:  # type: ignore[operator]
            table[row[0]] = row
    return table


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(("a", "b", "c")), st.integers(0, 5), st.sampled_from((0.1, 0.5))),
        max_size=40,
    )
)
def test_a_batch_writes_one_row_per_gateway_with_the_same_outcome(
    beats: list[tuple[str, int, float]],
) -> None:
    envs = [beat(gw, offset, load) for gw, offset, load in beats]
    everything = [row for _, rows in plan(envs, coalesce=False) for row in rows]
    coalesced = [row for _, rows in plan(envs) for row in rows]
    assert len(coalesced) == len({gw for gw, _, _ in beats})
    assert upsert_in_turn(coalesced) == upsert_in_turn(everything)
