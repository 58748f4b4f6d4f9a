"""Findings 5 and 9 against the real stack: identities through the auth callout, throttling.

The nats-server runs the shipped callout layout (accounts DAMM, DEV, ANON, GW); the control
plane answers the callout from its fold. Each party connects as it would in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.keys import nats_identity
from damm.protocol import messages as p
from damm.protocol.bus import connect, refusal
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from tests.fleet import enroll, keypair, setup_fleet
from tests.planes import running_plane, settings_for
from tests.security.conftest import Party

ANON_MAX_CONNECTIONS = 24
ANON_MAX_SUBSCRIPTIONS = 64


@pytest.fixture
def callout_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(
        tmp_path / "nats",
        callout=True,
        anon_max_connections=ANON_MAX_CONNECTIONS,
        anon_max_subscriptions=ANON_MAX_SUBSCRIPTIONS,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def plane(
    callout_server: NatsServer, dsn: str, tmp_path: Path
) -> AsyncIterator[ControlPlane]:
    async with running_plane(callout_server, dsn, settings_for(tmp_path)) as control:
        yield control


@pytest.fixture
async def admin(callout_server: NatsServer, plane: ControlPlane) -> AsyncIterator[NATS]:
    client = await connect(
        callout_server.url, user="admin", password=callout_server.passwords["admin"]
    )
    yield client
    await client.close()


@pytest.fixture
async def fleet(admin: NATS) -> dict[str, str]:
    # The control user may publish only what the control plane writes; the admin registers the
    # gateways here, as handler tests do.
    return await setup_fleet(admin, admin, gateways=(("gw1", "eu"), ("gw2", "eu")))


@pytest.fixture
async def parties() -> AsyncIterator[Callable[[], Party]]:
    made: list[Party] = []

    def make() -> Party:
        made.append(Party())
        return made[-1]

    yield make
    for party in made:
        if party.nc is not None and not party.nc.is_closed:
            await party.nc.close()


async def _eventually(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def _refused(party: Party, attempt: Callable[[], Awaitable[object]]) -> None:
    """The server refused what ``attempt`` published: no answer, a permissions violation."""
    with pytest.raises(DammError) as caught:
        await attempt()
    assert caught.value.code is Code.UNAVAILABLE  # nothing answered it
    await _eventually(lambda: any("permissions violation" in str(e).lower() for e in party.errors))


def _enroll_body(token: str) -> p.Enroll:
    return p.Enroll(token=token, public_key=keypair()[1], request_id=uuid.uuid4().hex)


async def test_a_device_reads_no_other_devices_replies(
    callout_server: NatsServer, fleet: dict[str, str], parties: Callable[[], Party]
) -> None:
    seed_a, seed_b = nats_identity.new_user_seed(), nats_identity.new_user_seed()
    a, b, bare = parties(), parties(), parties()
    nc_a = await a.open(callout_server.url, seed=seed_a)
    nc_b = await b.open(callout_server.url, seed=seed_b)
    nc_bare = await bare.open(callout_server.url)
    seen: list[bytes] = []

    async def keep(msg: Any) -> None:
        seen.append(msg.data)

    inbox_a = f"_INBOX_{nats_identity.public_key(seed_a)}.>"
    for nc in (nc_b, nc_bare):
        for subject in (inbox_a, "_INBOX_*.>", "_INBOX.>", ">"):
            with contextlib.suppress(nats.errors.Error):
                await nc.subscribe(subject, cb=keep)
        await nc.flush()
    enrolled = await enroll(nc_a, fleet["token"])
    assert enrolled.device_id
    # B's attempts at A's inbox were refused; the bare client's own inbox heard nothing.
    await _eventually(lambda: any("permissions violation" in str(e).lower() for e in b.errors))
    await nc_b.flush()
    await nc_bare.flush()
    assert not any(enrolled.device_id.encode() in data for data in seen)


async def test_an_anonymous_client_may_call_only_the_catalog_and_enrollment(
    callout_server: NatsServer, fleet: dict[str, str], parties: Callable[[], Party]
) -> None:
    bare = parties()
    nc = await bare.open(callout_server.url)
    try:
        await call(nc, "catalog.get", p.GetCatalog(region="eu"), p.SignedCatalogReply)
    except DammError as err:  # answered: a catalogued refusal at most
        assert err.code not in (Code.INTERNAL, Code.UNAVAILABLE)
    # No key, no private inbox: enrolling would put the reply where others could read it.
    body = _enroll_body(fleet["token"])
    await _refused(bare, lambda: call(nc, "enroll", body, p.Enrolled, timeout=0.5))

    enrolling = parties()
    nc2 = await enrolling.open(callout_server.url, seed=nats_identity.new_user_seed())
    rotate = p.RotateKey(
        device_id="d1", old_public_key=keypair()[1], new_public_key=keypair()[1], proof="x",
        request_id=uuid.uuid4().hex,
    )  # fmt: skip
    await _refused(
        enrolling, lambda: call(nc2, "device.rotate_key", rotate, p.KeyRotated, timeout=0.5)
    )
    for command, body in (
        ("admin.token.create", p.CreateToken(tier="gold")),
        ("gateway.heartbeat", p.Empty()),
    ):
        await _refused(enrolling, lambda c=command, b=body: call(nc2, c, b, p.Done, timeout=0.5))


async def test_a_device_cannot_act_on_another_device(
    callout_server: NatsServer, fleet: dict[str, str], parties: Callable[[], Party]
) -> None:
    seed_victim, seed_attacker = nats_identity.new_user_seed(), nats_identity.new_user_seed()
    victim, attacker = parties(), parties()
    victim_nc = await victim.open(callout_server.url, seed=seed_victim)
    victim_dev = await enroll(victim_nc, fleet["token"])
    attacker_nc = await attacker.open(callout_server.url, seed=seed_attacker)
    await enroll(attacker_nc, fleet["token"])
    await attacker_nc.close()
    # Reconnect: now an enrolled device, in DEV, allowed to call device requests at all.
    attacker = parties()
    attacker_nc = await attacker.open(callout_server.url, seed=seed_attacker)
    forged = {"Nats-Request-Info": f'{{"acc":"DEV","user":"device:{victim_dev.device_id}"}}'}
    rotate = p.RotateKey(
        device_id=victim_dev.device_id, old_public_key=keypair()[1],
        new_public_key=keypair()[1], proof="AAAA", request_id=uuid.uuid4().hex,
    )  # fmt: skip
    for headers in (None, forged):
        raw = await attacker_nc.request(
            "damm.req.device.rotate_key",
            __import__("msgspec").json.encode(rotate),
            timeout=5,
            headers=headers,
        )
        assert b'"not_your_device"' in raw.data, raw.data


async def test_a_gateway_cannot_use_another_gateways_identity(
    callout_server: NatsServer, fleet: dict[str, str]
) -> None:
    with pytest.raises(DammError) as caught:
        await connect(
            callout_server.url, user="gw-gw2", password=fleet["gw1_token"], reconnect=False
        )
    assert caught.value.code is Code.UNAUTHORIZED
    gw1 = await connect(
        callout_server.url, user="gw-gw1", password=fleet["gw1_token"], reconnect=False
    )
    try:
        got = await call(
            gw1,
            "gateway.heartbeat",
            p.Heartbeat(gateway_id="gw1", token=fleet["gw1_token"], peer_count=0, active_peers=0,
                        rx_bytes=0, tx_bytes=0, load=0.1),
            p.Done,
        )  # fmt: skip
        assert got.seq > 0
        spy = Party()
        spy_nc = await spy.open(callout_server.url, user="gw-gw1", password=fleet["gw1_token"])
        await spy_nc.subscribe("damm.peers.gw2")
        await spy_nc.flush()
        await _eventually(
            lambda: any("permissions violation" in str(e).lower() for e in spy.errors)
        )
        await spy_nc.close()
    finally:
        await gw1.close()


async def test_unauthenticated_requests_are_throttled_per_connection_and_per_source(
    callout_server: NatsServer, fleet: dict[str, str], parties: Callable[[], Party]
) -> None:
    async def codes(nc: NATS, n: int) -> list[str]:
        out = []
        for _ in range(n):
            try:
                await call(nc, "catalog.get", p.GetCatalog(region="nowhere"), p.SignedCatalogReply)
                out.append("ok")
            except DammError as err:
                out.append(err.code.slug)
        return out

    first = await codes(await parties().open(callout_server.url), 15)
    assert "rate_limited_connection" in first
    assert first.index("rate_limited_connection") >= 5  # an honest burst passes
    source_codes: list[str] = []
    for _ in range(14):
        nc = await parties().open(callout_server.url)
        source_codes += await codes(nc, 9)
        await nc.close()
    assert "rate_limited_source" in source_codes
    # The control plane's own account is not throttled.
    inside = await connect(
        callout_server.url, user="admin", password=callout_server.passwords["admin"]
    )
    try:
        assert "rate_limited_connection" not in await codes(inside, 30)
    finally:
        await inside.close()


async def test_unauthenticated_connections_and_subscriptions_are_capped(
    callout_server: NatsServer, plane: ControlPlane, parties: Callable[[], Party]
) -> None:
    held = []
    with pytest.raises(DammError) as caught:
        for _ in range(ANON_MAX_CONNECTIONS + 1):
            held.append(await connect(callout_server.url, reconnect=False))
    assert caught.value.code is Code.TOO_MANY_CONNECTIONS
    assert len(held) == ANON_MAX_CONNECTIONS
    for nc in held:
        await nc.close()
    party = parties()
    nc = await party.open(callout_server.url)
    for n in range(ANON_MAX_SUBSCRIPTIONS + 10):
        await nc.subscribe(f"_INBOX.x{n}")
    await nc.flush()

    def told() -> list[Exception]:
        return [*party.errors, *([nc.last_error] if nc.last_error else [])]

    await _eventually(lambda: any(refusal(e) is not None for e in told()))
    refused = [refusal(e) for e in told()]
    assert any(r is not None and r.code is Code.TOO_MANY_SUBSCRIPTIONS for r in refused)


async def test_the_cli_enrolls_and_rotates_under_its_own_identity(
    callout_server: NatsServer, plane: ControlPlane, fleet: dict[str, str], tmp_path: Path
) -> None:
    import os
    import stat
    import subprocess
    import sys

    damm = str(Path(sys.executable).parent / "damm")
    token_file = tmp_path / "token"
    token_file.write_text(fleet["token"] + "\n")
    token_file.chmod(0o600)
    env = {**os.environ, "DAMM_NATS_URL": callout_server.url, "DAMM_HOME": str(tmp_path / "n")}
    state_dir = tmp_path / "dev"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [damm, "device", *args, "--state-dir", str(state_dir)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    done = await asyncio.to_thread(run, "enroll", "--token-file", str(token_file))
    assert done.returncode == 0, done.stderr
    identity = nats_identity.public_key((state_dir / "identity.nk").read_bytes().strip())
    assert stat.S_IMODE((state_dir / "identity.nk").stat().st_mode) == 0o600
    assert plane.ctx is not None
    device_id = plane.ctx.state.identities[identity]
    assert plane.ctx.state.devices[device_id].identity_key == identity
    rotated = await asyncio.to_thread(run, "rotate-key")
    assert rotated.returncode == 0, rotated.stderr
    assert f"rotated key of {device_id}" in rotated.stdout


async def test_a_gateway_cannot_aim_answers_at_another_gateway(
    callout_server: NatsServer, fleet: dict[str, str], parties: Callable[[], Party]
) -> None:
    """All gateways share the GW account, where NATS does not check the reply subject a
    request names: the control plane answers a gateway only on its own reply subjects."""
    victim, hostile = parties(), parties()
    victim_nc = await victim.open(callout_server.url, user="gw-gw2", password=fleet["gw2_token"])
    seen: list[str] = []

    async def keep(msg: Any) -> None:
        seen.append(msg.subject)

    for subject in ("damm.peers.gw2", "damm.gwr.gw2.>", "_INBOX_gw-gw2.>"):
        with contextlib.suppress(nats.errors.Error):
            await victim_nc.subscribe(subject, cb=keep)
    await victim_nc.flush()
    nc = await hostile.open(callout_server.url, user="gw-gw1", password=fleet["gw1_token"])
    own: list[str] = []

    async def mine(msg: Any) -> None:
        own.append(msg.subject)

    await nc.subscribe("damm.gwr.gw1.>", cb=mine)
    beat = __import__("msgspec").json.encode(
        p.Heartbeat(gateway_id="gw1", token=fleet["gw1_token"], peer_count=0, active_peers=0,
                    rx_bytes=0, tx_bytes=0, load=0.1)
    )  # fmt: skip
    targets = ("damm.peers.gw2", "damm.gwr.gw2.x", "_INBOX_gw-gw2.x", "damm.gwr.gw2")
    for target in targets:  # no reply token: nowhere of its own to answer, so no answer
        await nc.publish("damm.req.gateway.heartbeat", beat, reply=target)
    for i, target in enumerate(targets):
        await nc.publish(
            "damm.req.gateway.heartbeat", beat, reply=target,
            headers={"Damm-Reply-Token": f"t{i}", "Damm-Correlation-Id": uuid.uuid4().hex},
        )  # fmt: skip
    # Answered, each on the hostile gateway's own subject, whatever reply it named.
    await _eventually(lambda: len(own) == len(targets), 10.0)
    assert sorted(own) == [f"damm.gwr.gw1.t{i}" for i in range(len(targets))]
    # Nor may it publish there itself.
    for target in ("damm.peers.gw2", "damm.gwr.gw2.x", "_INBOX_gw-gw2.x"):
        await nc.publish(target, b"{}")
    await _eventually(
        lambda: any("permissions violation" in str(e).lower() for e in hostile.errors)
    )
    await nc.flush()
    await victim_nc.flush()
    assert seen == []
    # The victim's own calls still work on its own subjects.
    gw2 = await connect(callout_server.url, user="gw-gw2", password=fleet["gw2_token"])
    try:
        done = await call(
            gw2, "gateway.heartbeat",
            p.Heartbeat(gateway_id="gw2", token=fleet["gw2_token"], peer_count=0, active_peers=0,
                        rx_bytes=0, tx_bytes=0, load=0.1),
            p.Done,
        )  # fmt: skip
        assert done.seq > 0
    finally:
        await gw2.close()
