"""What makes a fault's failure window longer than the cluster's own recovery (issue 11's
figures), one cause per test: each reproduces the cause on a real three-node cluster with real
control planes, rather than waiting for a load run to hit it by chance."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from damm.control.follower import StateFollower
from damm.control.state import DecisionState
from damm.events import model as m
from damm.events.store import EventStore
from damm.events.streams import ensure_streams
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.settings import ControlSettings
from damm.stack.nats_cluster import NatsCluster, until_meta_leader
from damm.subjects import EVENTS_STREAM
from tests.chaos.harness import Stack, read_log
from tests.fleet import keypair
from tests.test_follower_resume import append_until_taken, tier


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="damm-chaos-", dir="/tmp"))
    yield path
    if not os.environ.get("DAMM_CHAOS_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


async def _until(check: object, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_an_enrollment_lost_with_its_clients_node_is_sent_again(root: Path, dsn: str) -> None:
    """The node a device is connected to dies holding its request (paused, then killed: the
    request sat unread in its socket). The device reconnects to another node at once; the
    request must be sent again there within its deadline, not waited out until the client is
    told it failed, and it is recorded once."""
    stack = Stack(root, dsn, nodes=3, planes=1)
    await stack.start()
    try:
        leaders = {await stack.stream_leader(), await stack.meta_leader()}
        name = next(n.server_name for n in stack.servers if n.server_name not in leaders)
        node = stack.node(name)
        assert node.proc is not None
        device = await connect(node.url, name="chaos-device")  # learns the others from INFO
        try:
            public_key = keypair()[1]
            os.kill(node.proc.pid, signal.SIGSTOP)
            request = p.Enroll(
                token=stack.fleet["token"], public_key=public_key, request_id=uuid.uuid4().hex
            )
            sent = time.monotonic()
            pending = asyncio.create_task(call(device, "enroll", request, p.Enrolled, timeout=5))
            # The request has left the client: it sits in the paused node's socket.
            await _until(lambda: device._pending_data_size == 0 and device.stats["out_msgs"], 5)
            await asyncio.to_thread(node.kill)
            enrolled = await pending
            took = time.monotonic() - sent
            await asyncio.to_thread(node.start)
        finally:
            await device.close()
        nc = await connect(stack.url, user="control", password=stack.password)
        try:
            envs = await read_log(nc)
        finally:
            await nc.close()
        recorded = [
            e.event
            for e in envs
            if isinstance(e.event, m.DeviceEnrolled) and e.event.public_key == public_key
        ]
        assert [e.device_id for e in recorded] == [enrolled.device_id]
        assert took < 5.0
    finally:
        await stack.stop()


async def _moved(
    nc: NATS, ask: str, body: dict[str, object], check: Callable[[], Awaitable[bool]]
) -> None:
    """Ask for a leader step-down towards a preferred node until ``check`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{ask} never moved where asked")
        with contextlib.suppress(Exception):  # a step-down is refused while one is under way
            await nc.request(ask, json.dumps(body).encode(), timeout=5)
        await asyncio.sleep(0.5)


async def test_a_follower_keeps_up_while_its_consumers_node_and_meta_leader_is_down(
    tmp_path: Path,
) -> None:
    """The node hosting a replica's decision-state consumer also leads JetStream's meta group,
    and dies. The stream itself keeps its leader and takes appends at once, but the consumer can
    only be recreated once a new meta leader is elected, 4-9 s later: a replica that waited for
    it failed every lost race (and with them its enrollments) meanwhile. The barrier reads what
    it misses from the stream's surviving replicas instead."""
    cluster = NatsCluster(tmp_path / "cluster")
    await asyncio.to_thread(cluster.start)
    password = cluster.passwords["control"]
    followers: list[StateFollower] = []

    async def reconnected() -> None:
        for f in followers:
            f.reconnected()

    writer = await connect(cluster.url, user="control", password=password, name="writer")
    sys_nc = await connect(cluster.url, user="sys", password=cluster.passwords["sys"])
    follow_nc = await connect(
        cluster.url, user="control", password=password, on_reconnected=reconnected
    )
    try:
        js = writer.jetstream(timeout=5)
        await until_meta_leader(js)
        await ensure_streams(js, 3)
        store = EventStore(writer)
        await store.append(tier("before"))
        state = DecisionState(ControlSettings(keys_dir=tmp_path / "keys").overlay)
        follower = StateFollower(follow_nc, state)
        followers.append(follower)
        await follower.start()
        infos = await js.consumers_info(EVENTS_STREAM)
        assert len(infos) == 1 and infos[0].cluster is not None
        host = str(infos[0].cluster.leader)

        async def stream_leader() -> str:
            info = await js.stream_info(EVENTS_STREAM)
            return str(info.cluster.leader if info.cluster else "")

        async def meta_leader() -> str:
            msg = await sys_nc.request("$SYS.REQ.SERVER.PING.JSZ", b"", timeout=2)
            return str(json.loads(msg.data)["data"]["meta_cluster"].get("leader", ""))

        other = next(n.server_name for n in cluster.nodes if n.server_name != host)

        async def stream_elsewhere() -> bool:
            return await stream_leader() not in ("", host)

        async def meta_on_host() -> bool:
            return await meta_leader() == host

        await _moved(
            writer,
            f"$JS.API.STREAM.LEADER.STEPDOWN.{EVENTS_STREAM}",
            {"placement": {"preferred": other}},
            stream_elsewhere,
        )
        await _moved(
            sys_nc, "$JS.API.META.LEADER.STEPDOWN", {"placement": {"preferred": host}}, meta_on_host
        )
        await follower.sync(timeout=10)

        await asyncio.to_thread(cluster.node(host).kill)
        await append_until_taken(store, tier("after"))
        loop = asyncio.get_running_loop()
        appended = loop.time()
        await follower.sync(timeout=10)
        took = loop.time() - appended
        assert "after" in state.tiers
        assert took < 2.0, f"the barrier waited {took:.1f}s for a new meta leader"
        await follower.stop()
    finally:
        for nc in (writer, sys_nc, follow_nc):
            await nc.close()
        await asyncio.to_thread(cluster.stop)
