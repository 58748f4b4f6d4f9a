"""The agent's egress NAT follows a peer-set change at the cost of what the change touches, and
lands exactly where a full reconcile of the whole peer set lands, for any sequence of changes."""

from __future__ import annotations

import asyncio
import base64
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damm.agent import egress as nat
from damm.agent.runner import AgentConfig, GatewayAgent
from damm.protocol import messages as p
from damm.wireguard.memory import MemoryBackend
from damm.wireguard.peer_diff import Peer

KEYS = [base64.b64encode(bytes([i + 1]) * 32).decode() for i in range(8)]
# Few sources, so peers often share one (never in a real peer set, but the rule must hold).
IPS = st.sampled_from(
    [("10.44.0.10/32",), ("10.44.0.11/32",), ("10.44.0.12/32", "fd00::c/128"), ("fd00::/64",)]
)
EGRESS = st.none() | st.sampled_from(["198.51.100.1", "198.51.100.2", "203.0.113.9"])
ENTRY = st.tuples(IPS, EGRESS)
PEERS = st.dictionaries(st.sampled_from(KEYS), ENTRY, max_size=8)
CHANGES = st.lists(
    st.tuples(
        st.dictionaries(st.sampled_from(KEYS), ENTRY, max_size=3),
        st.lists(st.sampled_from(KEYS), unique=True, max_size=3),
    ),
    max_size=10,
)
Entries = dict[str, tuple[tuple[str, ...], str | None]]


@settings(max_examples=200, deadline=None)
@given(PEERS, st.lists(st.tuples(st.sampled_from(KEYS), st.none() | ENTRY), max_size=20))
def test_the_index_equals_the_map_built_from_scratch(
    start: Entries, steps: list[tuple[str, tuple[tuple[str, ...], str | None] | None]]
) -> None:
    index = nat.NatIndex.of(start)
    peers = dict(start)
    for key, entry in steps:
        before = dict(index)
        if entry is None:
            touched = index.drop(key)
            peers.pop(key, None)
        else:
            touched = index.put(key, *entry)
            peers[key] = entry
        full = nat.desired_map(peers)
        assert dict(index) == full
        # only the sources it reports touched may have moved
        assert {s for s in before.keys() | full.keys() if before.get(s) != full.get(s)} <= touched


@settings(max_examples=80, deadline=None)
@given(start=PEERS, sequence=CHANGES)
def test_the_agent_applies_egress_changes_incrementally(
    start: Entries, sequence: list[tuple[Entries, list[str]]]
) -> None:
    async def scenario(state_dir: Path) -> None:
        config = AgentConfig(gateway_id="gw1", token="t", nats_url="nats://unused",
                             state_dir=state_dir)  # fmt: skip
        table = nat.MemoryNat()
        agent = GatewayAgent(config, MemoryBackend(), nat.EgressReconciler(table))
        agent.egress_of = {k: e for k, (_, e) in start.items() if e}
        async with agent._wg:
            await agent._reconcile({k: Peer(k, ips) for k, (ips, _) in start.items()})
        peers = dict(start)
        assert table.elements == nat.desired_map(peers)
        for n, (upserts, removes) in enumerate(sequence):
            for key in removes:
                peers.pop(key, None)
            peers.update(upserts)
            agent._changes.append(
                p.PeerSetChange(
                    "gw1",
                    n,
                    n + 1,
                    tuple(p.PeerEntry(k, ips, e) for k, (ips, e) in sorted(upserts.items())),
                    tuple(removes),
                )
            )
            with pytest.MonkeyPatch.context() as mp:  # the change path never builds it all
                mp.setattr(nat, "desired_map", lambda _: pytest.fail("whole map built"))
                await agent._apply_changes()
            assert table.elements == nat.desired_map(peers) == agent.egress.applied  # type: ignore[union-attr]
        before = table.batches
        await agent.verify()  # a full reconcile finds nothing to change
        assert table.batches == before and table.elements == nat.desired_map(peers)

    with tempfile.TemporaryDirectory(prefix="dmt-egress-") as tmp:
        asyncio.run(scenario(Path(tmp)))
