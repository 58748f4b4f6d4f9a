"""The real stack a hostile client meets: nats-server with the shipped configuration (the auth
callout decides every outside connection), Postgres, the control plane, and a gateway agent on
the memory backend, plus the attacker's connections, each as production would make it:

- ``anon``: no credentials (account ANON: the catalog only, its answers are public);
- a newcomer: a fresh identity key that is no device yet (ANON: enrollment and the catalog,
  with an inbox only it may read);
- ``device``: an enrolled device under its own identity (account DEV);
- ``gw1``/``gw2``: each gateway under its own user (account GW: its own requests, peer set and
  reply subjects ``damm.gwr.<id>.>``);
- ``admin``: the operator, inside the control plane's account.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.control.process import ControlPlane
from damm.domain.throttle import Rate
from damm.errors import Code
from damm.keys import nats_identity
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import REPLY_TOKEN_HEADER, use_private_replies
from damm.stack.nats_server import NatsServer
from damm.subjects import EVENTS_STREAM, TELEMETRY_STREAM, gateway_reply_prefix
from damm.wireguard.memory import MemoryBackend
from tests.fleet import enroll, setup_fleet
from tests.planes import running_plane, settings_for

CATALOGUED = {code.slug for code in Code}
# Every party of a test connects from 127.0.0.1, one source to the per-source throttle, where in
# production each is its own. That bucket is raised here so each attack reaches the check it is
# about; the per-connection rate is the shipped one (the throttle attack meets it), and
# tests/security/test_identity.py meets the per-source rate as shipped.
SHARED_SOURCE = Rate(per_second=1000.0, burst=10_000.0)

_gateway_of: weakref.WeakKeyDictionary[NATS, str] = weakref.WeakKeyDictionary()


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class Party:
    """One outside connection, and what the server told it went wrong (asynchronously: a
    refused publish or subscription is not answered, only reported to the error callback)."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self.nc: NATS | None = None

    async def error_cb(self, exc: Exception) -> None:
        self.errors.append(exc)

    def violations(self) -> int:
        return sum("permissions violation" in str(e).lower() for e in self.errors)

    async def open(self, url: str, seed: bytes | None = None, **options: Any) -> NATS:
        if seed is not None:
            options["nkeys_seed_str"] = seed.decode()
            options["inbox_prefix"] = f"_INBOX_{nats_identity.public_key(seed)}"
        nc: NATS = await nats.connect(
            url, error_cb=self.error_cb, allow_reconnect=False, max_reconnect_attempts=0,
            connect_timeout=2, **options,
        )  # fmt: skip
        self.nc = nc
        return nc


_parties: weakref.WeakKeyDictionary[NATS, Party] = weakref.WeakKeyDictionary()


def party_of(nc: NATS) -> Party:
    return _parties[nc]


async def refused_by_server(nc: NATS, before: int, count: int = 1, timeout: float = 5.0) -> None:
    """The server reported ``count`` more permissions violations to ``nc`` than ``before``."""
    await nc.flush()
    await wait_for(lambda: party_of(nc).violations() >= before + count, timeout)


async def as_gateway(server: NatsServer, gateway_id: str, token: str) -> NATS:
    """A gateway's own connection, as its agent makes it; the callout decides it at once."""
    party = Party()
    nc = await party.open(server.url, user=f"gw-{gateway_id}", password=token)
    _parties[nc] = party
    _gateway_of[nc] = gateway_id
    use_private_replies(nc, gateway_id)  # as damm.protocol.bus.connect does for a gateway
    return nc


async def request(
    nc: NATS,
    subject: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Msg:
    """A raw request as the party would send it. A gateway names its answer by a reply token:
    the control plane answers a gateway only on ``damm.gwr.<id>.<token>``."""
    gateway_id = _gateway_of.get(nc)
    if gateway_id is None:
        return await nc.request(subject, body, timeout=timeout, headers=headers)
    token = uuid.uuid4().hex
    own = f"{gateway_reply_prefix(gateway_id)}.{token}"
    sub = await nc.subscribe(own, max_msgs=1)
    try:
        await nc.publish(
            subject, body, reply=own, headers={**(headers or {}), REPLY_TOKEN_HEADER: token}
        )
        return await sub.next_msg(timeout=timeout)
    finally:
        if not sub._closed:
            await sub.unsubscribe()


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
    gw1: NATS
    gw2: NATS
    agent: GatewayAgent
    backend: MemoryBackend
    tokens: dict[str, str]
    opened: list[NATS] = field(default_factory=list)

    async def anonymous(self) -> NATS:
        """A connection with no credentials at all (account ANON: the catalog only)."""
        return await self.open()

    async def open(self, seed: bytes | None = None, **options: Any) -> NATS:
        party = Party()
        nc = await party.open(self.server.url, seed, **options)
        _parties[nc] = party
        self.opened.append(nc)
        return nc

    async def newcomer(self) -> tuple[bytes, NATS]:
        """A device that has made its identity key and is not enrolled yet (account ANON)."""
        seed = nats_identity.new_user_seed()
        return seed, await self.open(seed)

    async def enrolled(
        self, public_key: str | None = None, region: str | None = None
    ) -> tuple[p.Enrolled, NATS]:
        """A device enrolled under a fresh identity, connected again as the device it now is
        (account DEV), as ``damm device`` does after enrolling."""
        seed, nc = await self.newcomer()
        dev = await enroll(nc, self.tokens["token"], public_key=public_key, region=region)
        await nc.close()
        identity = nats_identity.public_key(seed)
        assert self.plane.ctx is not None
        state = self.plane.ctx.state
        await wait_for(lambda: state.identities.get(identity) == dev.device_id)
        return dev, await self.open(seed)

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
async def hostile_control(
    callout_nats_server: NatsServer, dsn: str, tmp_path: Path
) -> AsyncIterator[ControlPlane]:
    """The control plane on the shipped configuration (accounts DAMM, DEV, ANON, GW and the
    auth callout it answers)."""
    settings = settings_for(tmp_path, throttle_source=SHARED_SOURCE)
    async with running_plane(callout_nats_server, dsn, settings) as plane:
        yield plane


@pytest.fixture
async def callout_admin(
    callout_nats_server: NatsServer, hostile_control: ControlPlane
) -> AsyncIterator[NATS]:
    server = callout_nats_server
    client = await connect(server.url, user="admin", password=server.passwords["admin"])
    yield client
    await client.close()


@pytest.fixture
async def fleet(
    hostile_control: ControlPlane,
    callout_admin: NATS,
    callout_nats_server: NatsServer,
    tmp_path: Path,
) -> AsyncIterator[Fleet]:
    control, admin_nc, nats_server = hostile_control, callout_admin, callout_nats_server
    assert control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    # The control user may publish only what the control plane writes: the operator registers
    # the gateways' first keys here, as the handler tests do; the agent re-registers gw1.
    tokens = await setup_fleet(
        admin_nc, admin_nc, regions=("eu", "us"), gateways=(("gw1", "eu"), ("gw2", "us"))
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
    opened: list[NATS] = []
    fleet = Fleet(control, nats_server, admin_nc, gw1, gw2, agent, backend, tokens, opened)
    yield fleet
    for nc in (*fleet.opened, gw1, gw2):
        if not nc.is_closed:
            await nc.close()
    stop.set()
    await asyncio.wait_for(task, 10)
