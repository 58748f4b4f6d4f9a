"""The real stack a hostile client meets: nats-server with the shipped account layout, Postgres,
the control plane, and a gateway agent on the memory backend, plus the attacker's connections."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.control.process import ControlPlane
from damm.errors import Code
from damm.protocol.bus import connect
from damm.stack.nats_server import NatsServer
from damm.subjects import EVENTS_STREAM, TELEMETRY_STREAM
from damm.wireguard.memory import MemoryBackend
from tests.fleet import setup_fleet

CATALOGUED = {code.slug for code in Code}


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def _ready(server: NatsServer, gateways: tuple[str, ...]) -> bool:
    return all(g in server.gateways for g in gateways) and reloads_done(server)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def reloads_done(server: NatsServer) -> bool:
    """Every SIGHUP the stack sent has finished reloading (a client that logs in to an account
    while it is being reloaded is dropped right after)."""
    text = (server.data_dir / "nats-server.log").read_text()
    return text.count('Trapped "hangup"') == text.count("Reloaded server configuration")


async def as_gateway(
    server: NatsServer, gateway_id: str, token: str, timeout: float = 10.0
) -> NATS:
    """Log in as a gateway's own NATS user once the server has reloaded its config with it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if gateway_id in server.gateways and reloads_done(server):
            try:
                nc = await connect(
                    server.url, user=f"gw-{gateway_id}", password=token, reconnect=False
                )
                await nc.flush()
                if reloads_done(server) and nc.is_connected:
                    return nc
                await nc.close()
            except Exception:  # the login is refused until the reload
                pass
        if loop.time() > deadline:
            raise AssertionError(f"gateway {gateway_id} cannot log in")
        await asyncio.sleep(0.1)


def code_of(reply: Msg | bytes) -> str | None:
    """The error code of a raw reply, or None for a success."""
    data = reply if isinstance(reply, bytes) else reply.data
    body: dict[str, Any] = json.loads(data)
    if body.get("ok"):
        return None
    return str(body["error"]["code"])


async def last_seq(nc: NATS, stream: str = EVENTS_STREAM) -> int:
    return int((await nc.jetstream().stream_info(stream)).state.last_seq)


@dataclass
class Fleet:
    plane: ControlPlane
    server: NatsServer
    admin: NATS
    device: NATS
    gw1: NATS
    gw2: NATS
    agent: GatewayAgent
    backend: MemoryBackend
    tokens: dict[str, str]

    async def events_head(self) -> int:
        assert self.plane.nc is not None
        return await last_seq(self.plane.nc)

    async def projected(self) -> None:
        """Every projector's checkpoint equals its stream's last sequence."""
        assert self.plane.nc is not None
        heads = {
            "readmodels": await last_seq(self.plane.nc, EVENTS_STREAM),
            "telemetry": await last_seq(self.plane.nc, TELEMETRY_STREAM),
        }

        def caught_up() -> bool:
            return all(p.applied_seq >= heads[p.name] for p in self.plane.projectors)

        await wait_for(caught_up, 10)


@pytest.fixture
async def fleet(
    control: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    nats_server: NatsServer,
    tmp_path: Path,
) -> AsyncIterator[Fleet]:
    assert control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    tokens = await setup_fleet(
        admin_nc,
        gateway_nc,
        regions=("eu", "us"),
        gateways=(("gw1", "eu"), ("gw2", "us")),
    )
    # A client logging in while the server reloads an account is dropped; nats-py may then hang
    # in connect. Start the agent once the stack's reloads for both gateways are through.
    await wait_until(
        lambda: _ready(nats_server, ("gw1", "gw2")),
    )
    backend = MemoryBackend()
    agent = GatewayAgent(
        AgentConfig(
            gateway_id="gw1",
            token=tokens["gw1_token"],
            nats_url=nats_server.url,
            state_dir=tmp_path / "agent",
            heartbeat_s=0.3,
            usage_s=0.2,
            reconcile_s=5,
        ),
        backend,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await wait_for(lambda: agent.synced.is_set() or task.done(), 10)
    if task.done():
        raise AssertionError(f"the agent stopped: {task.exception()!r}")
    gw1 = await as_gateway(nats_server, "gw1", tokens["gw1_token"])
    gw2 = await as_gateway(nats_server, "gw2", tokens["gw2_token"])
    yield Fleet(control, nats_server, admin_nc, device_nc, gw1, gw2, agent, backend, tokens)
    await gw1.close()
    await gw2.close()
    stop.set()
    await asyncio.wait_for(task, 10)


def decode_json(data: bytes) -> Any:
    return msgspec.json.decode(data)
