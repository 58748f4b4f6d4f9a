"""The fold's egress bookkeeping, over random histories, without a server.

Two properties: the per-address counts always equal a recount of the devices holding an address
(revoked devices give theirs back, suspended ones keep it), and the peer-set changes the fold
announces, applied one after another, end at the snapshot, NAT addresses included.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from damm.control.state import DecisionState, PeerChange
from damm.domain.ipam import Overlay
from damm.events import model as m
from damm.events.model import Actor

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DEVICES = [f"dev{i}" for i in range(4)]
KEYS = [chr(ord("A") + i) * 42 + "E=" for i in range(8)]
POOL = m.EgressPoolDefined(
    pool_id="eu-de", provider="static", region="eu", countries=("DE",), ips=("198.51.100.0/30",)
)


def enrolled(i: int, address: str | None) -> m.DeviceEnrolled:
    return m.DeviceEnrolled(
        device_id=DEVICES[i], public_key=KEYS[i], token_id="tok", tier="gold", gateway_id="gw1",
        front_door_id="fd1", egress_pool_id="eu-de", address=f"10.44.0.{10 + i}",
        egress_address=address,
    )  # fmt: skip


device_index = st.integers(0, len(DEVICES) - 1)
event_st = st.one_of(
    st.builds(enrolled, device_index, st.sampled_from(["198.51.100.1", "198.51.100.2", None])),
    st.builds(lambda i: m.DeviceRevoked(device_id=DEVICES[i]), device_index),
    st.builds(lambda i, r: m.DeviceSuspended(device_id=DEVICES[i], reason=r), device_index,
              st.sampled_from(["abuse", "over_quota"])),
    st.builds(lambda i: m.DeviceResumed(device_id=DEVICES[i]), device_index),
    st.builds(lambda i: m.DeviceKeyRotated(device_id=DEVICES[i], old_public_key=KEYS[i],
                                           new_public_key=KEYS[i + 4]), device_index),
)  # fmt: skip


def aggregate(e: m.Event) -> str:
    device_id = getattr(e, "device_id", None)
    return f"device/{device_id}" if device_id else "egress/eu-de"


def fold(events: list[m.Event]) -> tuple[DecisionState, list[PeerChange]]:
    state = DecisionState(Overlay.parse("10.44.0.0/24"), "month")
    changes: list[PeerChange] = []
    state.peer_listeners.append(changes.append)
    for n, e in enumerate([POOL, *events], 1):
        env = m.Envelope(
            id=uuid.uuid4().hex, type=m.event_type_name(e), aggregate=aggregate(e),
            occurred_at=T0 + timedelta(seconds=n), actor=Actor("admin", "ops"),
            correlation_id=f"c{n}", event=e, seq=n,
        )  # fmt: skip
        state.apply(env, f"damm.evt.{aggregate(e).replace('/', '.')}")
    return state, changes


@given(st.lists(event_st, max_size=25))
def test_counts_equal_a_recount(events: list[m.Event]) -> None:
    state, _ = fold(events)
    holding = [d for d in state.devices.values() if d.status != "revoked"]
    recount = Counter(d.egress_address for d in holding if d.egress_address)
    assert +state.egress_in_use.get("eu-de", Counter()) == recount
    assert state.pool_assigned["eu-de"] == len(holding)


@given(st.lists(event_st, max_size=25))
def test_changes_replayed_equal_the_snapshot(events: list[m.Event]) -> None:
    state, changes = fold(events)
    peers: dict[str, tuple[tuple[str, ...], str | None]] = {}
    revision = 0
    for ch in changes:
        assert ch.prev_revision == revision  # the chain has no gaps
        revision = ch.revision
        nat = dict(ch.egress)
        for key in ch.removes:
            peers.pop(key, None)
        for key, ips in ch.upserts:
            peers[key] = (ips, nat.get(key))
    snapshot = {key: (ips, egress) for key, ips, egress in state.peer_entries("gw1")}
    assert peers == snapshot
    assert revision == state.peer_revisions.get("gw1", 0)
