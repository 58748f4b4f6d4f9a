"""Incremental reconcile equals a full reconcile, for any sequence of peer-set changes.

The agent sends only the change, from what it applied, and never reads the interface on that
path; a leaving peer is cleared at once and removed after the next metering read. These
properties drive the real agent code over the in-memory interface.
"""

from __future__ import annotations

import asyncio
import base64
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.protocol import messages as p
from damm.wireguard.base import PeerStats
from damm.wireguard.memory import MemoryBackend
from damm.wireguard.peer_diff import Peer, apply, change_diff, diff, settle

KEYS = [base64.b64encode(bytes([i + 1]) * 32).decode() for i in range(10)]
CIDRS = ["10.44.0.10/32", "10.44.0.11/32", "10.44.0.12/32", "fd00::/64", "10.0.0.0/8"]

ip_sets = st.lists(st.sampled_from(CIDRS), unique=True, min_size=1, max_size=3).map(
    lambda ips: tuple(sorted(ips))
)
peer_sets = st.dictionaries(st.sampled_from(KEYS), ip_sets, max_size=8).map(
    lambda d: {k: Peer(k, ips) for k, ips in d.items()}
)
# One change: keys set to new allowed IPs, keys removed (as the control plane publishes them).
changes = st.tuples(
    st.dictionaries(st.sampled_from(KEYS), ip_sets, max_size=4),
    st.lists(st.sampled_from(KEYS), unique=True, max_size=4),
)
Change = tuple[dict[str, tuple[str, ...]], list[str]]


def step(desired: dict[str, Peer], change: Change) -> tuple[dict[str, Peer], set[str]]:
    upserts, removes = change
    new = dict(desired)
    for key in removes:
        new.pop(key, None)
    for key, ips in upserts.items():
        new[key] = Peer(key, ips)
    return new, set(upserts) | set(removes)


def live(peers: dict[str, Peer]) -> dict[str, Peer]:
    return {k: v for k, v in peers.items() if v.allowed_ips}


@given(interface=peer_sets, start=peer_sets, sequence=st.lists(changes, max_size=8))
def test_change_diffs_then_settle_equal_one_full_diff(
    interface: dict[str, Peer], start: dict[str, Peer], sequence: list[Change]
) -> None:
    applied = apply(interface, diff(interface, start))
    desired = start
    for change in sequence:
        desired, touched = step(desired, change)
        applied = apply(applied, change_diff(applied, desired, touched))
        # nothing leaving the set carries traffic, from the moment of the change
        assert live(applied) == live(desired)
    settled = apply(applied, settle(applied, desired))
    assert settled == desired == apply(interface, diff(interface, desired))


def agent_in(state_dir: Path) -> tuple[GatewayAgent, MemoryBackend]:
    backend = MemoryBackend()
    config = AgentConfig(gateway_id="gw1", token="t", nats_url="nats://unused", state_dir=state_dir)
    return GatewayAgent(config, backend), backend


@settings(max_examples=60, deadline=None)
@given(interface=peer_sets, start=peer_sets, sequence=st.lists(changes, max_size=8))
def test_the_agent_applies_changes_incrementally_and_lands_on_the_full_reconcile(
    interface: dict[str, Peer], start: dict[str, Peer], sequence: list[Change]
) -> None:
    async def scenario(state_dir: Path) -> None:
        agent, backend = agent_in(state_dir)
        backend.peers = {k: PeerStats(k, v.allowed_ips, rx_bytes=7) for k, v in interface.items()}
        async with agent._wg:
            await agent._reconcile(start)
        desired = start
        always = interface.keys() & start.keys()
        for n, change in enumerate(sequence):
            desired, _ = step(desired, change)
            always &= desired.keys()
            upserts, removes = change
            agent._changes.append(
                p.PeerSetChange(
                    "gw1",
                    n,
                    n + 1,
                    tuple(p.PeerEntry(k, ips) for k, ips in sorted(upserts.items())),
                    tuple(removes),
                )
            )
            backend.fail_reads = True  # the change path never reads the interface
            await agent._apply_changes()
            backend.fail_reads = False
            configured = {k: s.as_peer() for k, s in backend.peers.items()}
            assert agent.revision == n + 1 and agent.desired == desired
            assert configured == agent.applied and live(configured) == live(desired)
        async with agent._wg:  # the metering read, then the cleared peers go
            agent._observe(await backend.read())
            await agent._settle()
        assert {k: s.as_peer() for k, s in backend.peers.items()} == desired
        # a peer that stayed all along was updated in place: its counters were never reset
        assert all(backend.peers[k].rx_bytes == 7 for k in always)
        assert (await agent.verify()).is_empty  # a full read finds nothing left to do

    with tempfile.TemporaryDirectory(prefix="dmt-incr-") as tmp:
        asyncio.run(scenario(Path(tmp)))
