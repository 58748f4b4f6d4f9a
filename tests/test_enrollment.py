"""Enrollment over real NATS request/reply, against a real control plane and Postgres."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from damm.clock import SkewedClock
from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.protocol import messages as p
from damm.protocol.client import call
from tests.fleet import enroll, keypair, setup_fleet


async def test_enroll_happy_path(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS, dsn: str
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    result = await enroll(device_nc, fleet["token"])
    assert result.address == "10.44.0.10/24"
    assert result.gateway_id == "gw1"
    assert result.endpoint == "192.0.2.1:51820"
    assert result.gateway_public_key == fleet["gw1_public_key"]
    assert result.catalog is not None and result.catalog.region == "eu"
    await control.wait_projected()
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    row = await conn.fetchrow("SELECT * FROM devices WHERE device_id=$1", result.device_id)
    tok = await conn.fetchrow("SELECT uses, active_sessions FROM tokens")
    addr = await conn.fetchval("SELECT address FROM addresses WHERE device_id=$1", result.device_id)
    await conn.close()
    assert row["status"] == "active" and row["address"] == "10.44.0.10"
    assert tuple(tok) == (1, 1)
    assert addr == "10.44.0.10"


async def test_retried_request_is_recorded_once(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    _, pub = keypair()
    first = await enroll(device_nc, fleet["token"], public_key=pub, request_id="r-1")
    again = await enroll(device_nc, fleet["token"], public_key=pub, request_id="r-1")
    assert first == again


async def expect(code: Code, coro: object) -> DammError:
    with pytest.raises(DammError) as info:
        await coro  # type: ignore[misc]
    assert info.value.code is code, info.value.line()
    return info.value


async def test_token_failures(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc, uses=1)
    await expect(Code.TOKEN_UNKNOWN, enroll(device_nc, "dmt_nope"))
    await expect(Code.TOKEN_UNKNOWN, enroll(device_nc, "garbage"))
    await enroll(device_nc, fleet["token"])
    await expect(Code.TOKEN_USED_UP, enroll(device_nc, fleet["token"]))
    created = await call(admin_nc, "admin.token.create", p.CreateToken(tier="gold"), p.TokenCreated)
    await call(admin_nc, "admin.token.revoke", p.RevokeToken(token_id=created.token_id), p.Done)
    await expect(Code.TOKEN_REVOKED, enroll(device_nc, created.token))
    short = await call(
        admin_nc, "admin.token.create", p.CreateToken(tier="gold", ttl_s=1), p.TokenCreated
    )
    assert isinstance(control.clock, SkewedClock)
    control.clock.advance(1.1)
    await expect(Code.TOKEN_EXPIRED, enroll(device_nc, short.token))


async def test_malformed_and_oversized(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    await expect(Code.MALFORMED_KEY, enroll(device_nc, fleet["token"], public_key="abc"))
    before = (await control.nc.jetstream().stream_info("DAMM_EVENTS")).state.last_seq  # type: ignore[union-attr]
    reply = await device_nc.request("damm.req.enroll", b"{not json", timeout=2)
    assert b"malformed_request" in reply.data
    # Above the route's 16 KiB, below the device account's max_payload (bigger bodies never
    # reach the control plane: the server drops the sender, see tests/security).
    reply = await device_nc.request("damm.req.enroll", b"x" * 20_000, timeout=2)
    assert b"request_too_large" in reply.data
    after = (await control.nc.jetstream().stream_info("DAMM_EVENTS")).state.last_seq  # type: ignore[union-attr]
    assert after == before


async def test_revoked_device_cannot_return(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    _, pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=pub)
    await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=dev.device_id), p.Done)
    await expect(Code.DEVICE_REVOKED, enroll(device_nc, fleet["token"], public_key=pub))
    again = await enroll(device_nc, fleet["token"])
    assert again.address == "10.44.0.10/24"  # the revoked address went back to the pool


async def test_concurrent_enrollments_distinct_addresses(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    results = await asyncio.gather(*(enroll(device_nc, fleet["token"]) for _ in range(100)))
    assert len({r.address for r in results}) == 100
