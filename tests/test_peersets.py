"""Peer sets: the snapshot, the published changes, and the agent following them (memory backend)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import msgspec
import pytest
from nacl.public import PrivateKey
from nats.aio.client import Client as NATS

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.control.process import ControlPlane
from damm.control.reactors.key_expiry import KeyExpiryReactor
from damm.errors import Code, DammError
from damm.keys.rotation import prove as sign_rotation
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from damm.subjects import peers_subject
from damm.wireguard.base import PeerStats
from damm.wireguard.memory import MemoryBackend
from tests.fleet import enroll, keypair, setup_fleet


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def snapshot(nc: NATS, gateway_id: str, token: str) -> p.PeerSnapshot:
    return await call(
        nc,
        "gateway.peers",
        p.PeerSnapshotRequest(gateway_id=gateway_id, token=token),
        p.PeerSnapshot,
    )


@pytest.fixture
async def leader(control: ControlPlane) -> ControlPlane:
    assert control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    return control


async def test_snapshot_lists_active_devices_only(
    leader: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    empty = await snapshot(gateway_nc, "gw1", fleet["gw1_token"])
    assert empty.peers == () and empty.revision == 0
    a = await enroll(device_nc, fleet["token"])
    b = await enroll(device_nc, fleet["token"])
    await call(admin_nc, "admin.device.suspend", p.DeviceAction(device_id=b.device_id), p.Done)
    snap = await snapshot(gateway_nc, "gw1", fleet["gw1_token"])
    assert [e.allowed_ips for e in snap.peers] == [(a.address.replace("/24", "/32"),)]
    assert snap.revision > 0
    with pytest.raises(DammError) as info:
        await snapshot(gateway_nc, "gw1", "dmg_wrong")
    assert info.value.code is Code.UNAUTHORIZED


async def test_changes_chain_revisions(
    leader: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    got: list[p.PeerSetChange] = []

    async def on_msg(msg: object) -> None:
        got.append(msgspec.json.decode(msg.data, type=p.PeerSetChange))  # type: ignore[attr-defined]

    await gateway_nc.subscribe(peers_subject("gw1"), cb=on_msg)
    await gateway_nc.flush()
    priv, pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=pub)
    for action in ("suspend", "resume"):
        await call(
            admin_nc, f"admin.device.{action}", p.DeviceAction(device_id=dev.device_id), p.Done
        )
    _, new_pub = keypair()
    request_id = uuid.uuid4().hex
    proof = sign_rotation(priv, dev.rotation_key, dev.device_id, new_pub, request_id)
    await call(
        device_nc,
        "device.rotate_key",
        p.RotateKey(
            device_id=dev.device_id,
            old_public_key=pub,
            new_public_key=new_pub,
            proof=proof,
            request_id=request_id,
        ),
        p.KeyRotated,
    )
    await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=dev.device_id), p.Done)
    await wait_for(lambda: len(got) == 5)
    assert [c.prev_revision for c in got[1:]] == [c.revision for c in got[:-1]]
    assert got[0].prev_revision == 0
    assert [e.public_key for e in got[0].upserts] == [pub] and got[0].removes == ()
    assert got[1].removes == (pub,) and got[1].upserts == ()
    assert [e.public_key for e in got[2].upserts] == [pub]
    assert got[3].removes == (pub,) and [e.public_key for e in got[3].upserts] == [new_pub]
    assert got[4].removes == (new_pub,)
    snap = await snapshot(gateway_nc, "gw1", fleet["gw1_token"])
    assert snap.revision == got[-1].revision and snap.peers == ()


@pytest.fixture
async def agent_env(
    leader: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    nats_server: NatsServer,
    tmp_path: Path,
) -> AsyncIterator[tuple[GatewayAgent, MemoryBackend, dict[str, str]]]:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    backend = MemoryBackend()
    config = AgentConfig(
        gateway_id="gw1",
        token=fleet["gw1_token"],
        nats_url=nats_server.url,
        state_dir=tmp_path / "agent",
        heartbeat_s=0.3,
        usage_s=0.2,
        reconcile_s=5,
    )
    agent = GatewayAgent(config, backend)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(agent.synced.wait(), 5)
    yield agent, backend, fleet
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_agent_follows_enroll_revoke_suspend_rotate(
    agent_env: tuple[GatewayAgent, MemoryBackend, dict[str, str]], admin_nc: NATS, device_nc: NATS
) -> None:
    agent, backend, fleet = agent_env
    assert backend.public_key == agent.public_key and backend.listen_port == 51820
    priv, pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=pub)
    await wait_for(lambda: pub in backend.peers, 2)
    assert backend.peers[pub].allowed_ips == ("10.44.0.10/32",)
    await call(admin_nc, "admin.device.suspend", p.DeviceAction(device_id=dev.device_id), p.Done)
    await wait_for(lambda: pub not in backend.peers, 2)
    await call(admin_nc, "admin.device.resume", p.DeviceAction(device_id=dev.device_id), p.Done)
    await wait_for(lambda: pub in backend.peers, 2)
    _, new_pub = keypair()
    rid = uuid.uuid4().hex
    await call(
        device_nc,
        "device.rotate_key",
        p.RotateKey(
            device_id=dev.device_id,
            old_public_key=pub,
            new_public_key=new_pub,
            proof=sign_rotation(priv, dev.rotation_key, dev.device_id, new_pub, rid),
            request_id=rid,
        ),
        p.KeyRotated,
    )
    await wait_for(lambda: new_pub in backend.peers and pub not in backend.peers, 2)
    await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=dev.device_id), p.Done)
    await wait_for(lambda: not backend.peers, 2)
    assert agent.resyncs == 1  # everything above arrived as in-order changes


async def test_agent_resyncs_on_gap_and_removes_strangers(
    agent_env: tuple[GatewayAgent, MemoryBackend, dict[str, str]], device_nc: NATS
) -> None:
    agent, backend, fleet = agent_env
    _, stranger = keypair()
    backend.peers[stranger] = PeerStats(stranger, ("10.9.9.9/32",))
    # Pretend we missed a change: the next one will not follow our revision.
    agent.revision -= 1 if agent.revision else -1000
    _, pub = keypair()
    await enroll(device_nc, fleet["token"], public_key=pub)
    await wait_for(lambda: agent.resyncs >= 2 and pub in backend.peers, 3)
    assert stranger not in backend.peers


async def test_heartbeat_reply_triggers_resync(
    agent_env: tuple[GatewayAgent, MemoryBackend, dict[str, str]],
    leader: ControlPlane,
    device_nc: NATS,
) -> None:
    agent, backend, fleet = agent_env
    assert leader.leadership is not None
    leader.leadership.is_leader = False  # a lost publication: nothing is published
    _, pub = keypair()
    await enroll(device_nc, fleet["token"], public_key=pub)
    await wait_for(lambda: pub in backend.peers, 4)  # heartbeat (0.3 s) + grace (1 s) + resync
    assert agent.resyncs >= 2
    leader.leadership.is_leader = True


async def test_heartbeat_metrics_and_usage(
    agent_env: tuple[GatewayAgent, MemoryBackend, dict[str, str]],
    leader: ControlPlane,
    device_nc: NATS,
    dsn: str,
) -> None:
    agent, backend, fleet = agent_env
    _, pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=pub)
    await wait_for(lambda: pub in backend.peers, 2)
    backend.set_counters(pub, 1000, 500)
    backend.set_handshake(pub, datetime.now(UTC).timestamp())
    await wait_for(
        lambda: (
            not agent.ledger.pending
            and agent.ledger.meter.export_state()["peers"].get(pub) == [1000, 500]
        ),
        3,
    )
    backend.set_counters(pub, 1500, 700)
    await asyncio.sleep(0.5)
    ack = await agent.heartbeat()
    assert ack.peer_set_revision == agent.revision
    gw = leader.ctx.state.gateways["gw1"]  # type: ignore[union-attr]
    assert gw.peer_count == 1
    await wait_for(lambda: not agent.ledger.pending, 3)
    await leader.wait_projected()
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    row = await conn.fetchrow(
        "SELECT sum(rx_bytes) rx, sum(tx_bytes) tx FROM usage_totals WHERE device_id=$1",
        dev.device_id,
    )
    health = await conn.fetchrow("SELECT * FROM gateway_health WHERE gateway_id='gw1'")
    await conn.close()
    assert (row["rx"], row["tx"]) == (1500, 700)
    assert health is None or health["peer_count"] in (0, 1)


async def test_usage_survives_restart_without_double_count(
    leader: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    nats_server: NatsServer,
    tmp_path: Path,
    dsn: str,
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    backend = MemoryBackend()
    config = AgentConfig(
        gateway_id="gw1",
        token=fleet["gw1_token"],
        nats_url=nats_server.url,
        state_dir=tmp_path / "agent",
        heartbeat_s=5,
        usage_s=0.2,
    )
    _, pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=pub)
    for total in (100, 250):
        stop = asyncio.Event()
        agent = GatewayAgent(config, backend)
        task = asyncio.create_task(agent.run(stop))
        await asyncio.wait_for(agent.synced.wait(), 5)
        backend.set_counters(pub, total, total)
        await wait_for(
            lambda a=agent, t=total: (
                a.ledger.meter.export_state()["peers"].get(pub) == [t, t] and not a.ledger.pending
            ),
            3,
        )  # type: ignore[misc]
        stop.set()
        await asyncio.wait_for(task, 10)
    key_file = tmp_path / "agent" / "private.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    await leader.wait_projected()
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    rx = await conn.fetchval(
        "SELECT sum(rx_bytes) FROM usage_totals WHERE device_id=$1", dev.device_id
    )
    await conn.close()
    assert rx == 250


async def test_key_expiry_suspends_and_rotation_restores(
    leader: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS, dsn: str
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc, key_lifetime_s=3600)
    priv, pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=pub)
    ctx = leader.ctx
    assert ctx is not None and leader.leadership is not None
    later = datetime.now(UTC) + timedelta(hours=2)
    reactor = KeyExpiryReactor(ctx, leader.leadership, now=lambda: later)
    assert await reactor.sweep() == 1
    state = ctx.state.devices[dev.device_id]
    assert (state.status, state.reason) == ("suspended", "key_expired")
    _, new_pub = keypair()
    rid = uuid.uuid4().hex
    await call(
        device_nc,
        "device.rotate_key",
        p.RotateKey(
            device_id=dev.device_id,
            old_public_key=pub,
            new_public_key=new_pub,
            proof=sign_rotation(priv, dev.rotation_key, dev.device_id, new_pub, rid),
            request_id=rid,
        ),
        p.KeyRotated,
    )
    assert ctx.state.devices[dev.device_id].status == "active"
    snap = await snapshot(gateway_nc, "gw1", fleet["gw1_token"])
    assert [e.public_key for e in snap.peers] == [new_pub]
    await leader.wait_projected()
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    row = await conn.fetchrow(
        "SELECT status, status_reason FROM devices WHERE device_id=$1", dev.device_id
    )
    await conn.close()
    assert tuple(row) == ("active", "key_rotated")


def test_private_key_file_is_private(tmp_path: Path) -> None:
    from damm.agent.identity import load_or_create_key

    priv, pub = load_or_create_key(tmp_path)
    assert load_or_create_key(tmp_path) == (priv, pub)
    raw = base64.b64decode(priv)
    assert base64.b64encode(bytes(PrivateKey(raw).public_key)).decode() == pub
    (tmp_path / "private.key").chmod(0o644)
    with pytest.raises(DammError):
        load_or_create_key(tmp_path)
