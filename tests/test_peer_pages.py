"""Peer sets larger than one bus message: pages, the router's size guard, a real agent syncing."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.control.handlers.peer_snapshot import Entry, entry_bytes, page
from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.protocol.router import Call, Service, route
from damm.stack.nats_server import NatsServer
from damm.wireguard.memory import MemoryBackend
from tests.fleet import enroll, keypair, setup_fleet
from tests.planes import running_plane, settings_for

SMALL_PAYLOAD = 16 * 1024  # a bus whose messages hold about 230 peers


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


keys = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())
ips = st.lists(
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.sampled_from([32, 24, 16])).map(
        lambda t: f"10.{t[0]}.{t[1]}.0/{t[2]}"
    ),
    max_size=4,
).map(tuple)
egresses = st.none() | st.integers(0, 255).map(lambda n: f"198.51.100.{n}")
entry_sets = st.dictionaries(keys, st.tuples(ips, egresses), max_size=60).map(
    lambda d: sorted((k, v[0], v[1]) for k, v in d.items())
)


@given(entry=st.tuples(keys, ips, egresses))
def test_entry_size_is_the_encoded_size(entry: Entry) -> None:
    one = msgspec.json.encode([p.PeerEntry(*entry)])
    two = msgspec.json.encode([p.PeerEntry(*entry), p.PeerEntry(*entry)])
    assert entry_bytes(entry) == len(two) - len(one)


@given(entries=entry_sets, budget=st.integers(1, 2000))
def test_pages_cover_the_set_once_in_order_within_budget(entries: list[Entry], budget: int) -> None:
    got: list[Entry] = []
    after: str | None = None
    while True:
        chunk, after = page(entries, after, budget)
        assert len(chunk) == 1 or sum(map(entry_bytes, chunk)) <= budget
        got.extend(chunk)
        if after is None:
            break
        assert chunk and chunk[-1][0] == after
    assert got == entries


async def test_a_reply_too_large_for_the_bus_answers_a_catalogued_code(
    nc: NATS, admin_nc: NATS
) -> None:
    async def huge(req: p.Empty, call_: Call) -> p.PeerSnapshot:
        peers = tuple(p.PeerEntry(key(), ("10.0.0.0/32",)) for _ in range(20_000))
        return p.PeerSnapshot("gw", 1, peers)

    service = Service(nc, [route("test.huge", p.Empty, huge)], queue="t")
    await service.start()
    try:
        with pytest.raises(DammError) as info:
            # asked as the admin: the control-plane user only answers
            await call(admin_nc, "test.huge", p.Empty(), p.PeerSnapshot, timeout=5)
        assert info.value.code is Code.REPLY_TOO_LARGE
    finally:
        await service.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", max_payload=SMALL_PAYLOAD)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def wide_control(
    nats_server: NatsServer, dsn: str, tmp_path: Path
) -> AsyncIterator[ControlPlane]:
    """The usual control plane, on an overlay with room for a few hundred devices."""
    settings = settings_for(tmp_path, overlay="10.44.0.0/22")
    async with running_plane(nats_server, dsn, settings, leader=True) as plane:
        yield plane


async def test_a_peer_set_larger_than_one_bus_message_syncs_exactly(
    wide_control: ControlPlane, nats_server: NatsServer, tmp_path: Path
) -> None:
    admin = await connect(nats_server.url, user="admin", password=nats_server.passwords["admin"])
    gw_nc = await connect(nats_server.url, user="admin", password=nats_server.passwords["admin"])
    device_nc = await connect(nats_server.url)
    try:
        fleet = await setup_fleet(admin, gw_nc)
        want: dict[str, tuple[str, ...]] = {}
        for _ in range(8):
            batch = [keypair()[1] for _ in range(40)]
            done = await asyncio.gather(
                *(enroll(device_nc, fleet["token"], public_key=k) for k in batch)
            )
            want |= {
                k: (e.address.split("/")[0] + "/32",) for k, e in zip(batch, done, strict=True)
            }
        encoded = msgspec.json.encode([p.PeerEntry(k, v) for k, v in want.items()])
        assert len(encoded) > device_nc.max_payload == SMALL_PAYLOAD

        backend = MemoryBackend()
        agent = GatewayAgent(
            AgentConfig(
                gateway_id="gw1",
                token=fleet["gw1_token"],
                nats_url=nats_server.url,
                state_dir=tmp_path / "agent",
                heartbeat_s=0.5,
                usage_s=0.5,
            ),
            backend,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await asyncio.wait_for(agent.synced.wait(), 10)
            assert {k: s.allowed_ips for k, s in backend.peers.items()} == want
            assert agent.revision == wide_control.ctx.state.peer_revisions["gw1"]  # type: ignore[union-attr]
            # and it keeps following: one more device arrives as a change, not a resync
            late = keypair()[1]
            await enroll(device_nc, fleet["token"], public_key=late)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while late not in backend.peers:
                assert loop.time() < deadline, "the late device never reached the interface"
                await asyncio.sleep(0.01)
            assert agent.resyncs == 1 and len(backend.peers) == len(want) + 1
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    finally:
        for client in (admin, gw_nc, device_nc):
            await client.close()
