"""Quota enforcement reaches the packet plane, over real WireGuard.

A tier with a small byte limit; the device pings until it crosses it; within QUOTA_BOUND_S the
device is suspended, its peer leaves the gateway and the ping fails. Resetting its usage lets the
quota reactor resume it, the peer returns and the ping works again once WireGuard's own timers
make the device re-handshake: removing the peer dropped the gateway's session keys, and a device
that hears nothing back starts a new handshake after about 15 s (keepalive + rekey timeout).
"""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

from damm import netns as netlab
from damm.control.process import ControlPlane
from damm.protocol import messages as p
from damm.protocol.client import call
from tests.fleet import enroll, keypair
from tests.test_e2e_tunnel import Site, _gone, _has, eventually, site  # noqa: F401 - fixture

pytestmark = pytest.mark.netns

LIMIT = 30_000
QUOTA_BOUND_S = 10.0
REHANDSHAKE_BOUND_S = 30.0


async def test_over_quota_device_loses_its_tunnel_and_resume_restores_it(
    site: Site,  # noqa: F811 - the fixture imported above
    control: ControlPlane,
    admin_nc: NATS,
    device_nc: NATS,
) -> None:
    await call(
        admin_nc,
        "admin.tier.define",
        p.DefineTier(tier="gold", regions=("eu",), byte_limit=LIMIT),
        p.Done,
    )
    private, public = keypair()
    enrolled = await enroll(device_nc, site.token, public_key=public)
    await eventually(lambda: _has(site, public), 2, "peer on the gateway")
    await site.bring_up_device(enrolled, private)
    assert await netlab.ping(site.dev_ns, "10.44.0.1", count=3, wait=5)
    # ~2 x 1,028 bytes of tunnel payload per ping: 40 pings cross 30,000 bytes
    await netlab.exec_in(
        site.dev_ns,
        "ping",
        "-q",
        "-c",
        "40",
        "-i",
        "0.02",
        "-s",
        "1000",
        "-W",
        "1",
        "10.44.0.1",
        check=False,
    )
    state = control.ctx.state  # type: ignore[union-attr]

    async def suspended() -> bool:
        dev = state.devices[enrolled.device_id]
        return dev.status == "suspended" and dev.reason == "over_quota"

    took = await eventually(suspended, QUOTA_BOUND_S, "device suspended over quota")
    await eventually(lambda: _gone(site, public), 2, "over-quota peer removed from the gateway")
    assert not await netlab.ping(site.dev_ns, "10.44.0.1", count=2, wait=1)

    await call(admin_nc, "admin.usage.reset", p.ResetUsage(device_id=enrolled.device_id), p.Done)

    async def active() -> bool:
        return state.devices[enrolled.device_id].status == "active"

    await eventually(active, QUOTA_BOUND_S, "device resumed after its usage was reset")
    await eventually(lambda: _has(site, public), 2, "peer back on the gateway")

    async def pings() -> bool:
        return await netlab.ping(site.dev_ns, "10.44.0.1", count=1, wait=1)

    await eventually(pings, REHANDSHAKE_BOUND_S, "ping works again after resume")
    assert took < QUOTA_BOUND_S
