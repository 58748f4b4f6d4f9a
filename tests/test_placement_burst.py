"""Placement under a burst: the control plane counts its own assignments, so new devices spread
over equally loaded gateways instead of herding onto the one that sorts first."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

from damm.clock import FrozenClock
from damm.control.handlers.admin import AdminHandlers
from damm.control.handlers.enrollment import EnrollmentCommitter
from damm.control.handlers.gateway import GatewayHandlers
from damm.domain.ipam import Overlay
from damm.events.model import Actor
from damm.protocol import messages as p
from damm.protocol.router import Call
from damm.settings import ControlSettings
from tests.fleet import keypair
from tests.memory_log import memory_context


def call_as(kind: str) -> Call:
    return Call(uuid.uuid4().hex, Actor(kind, "-"))


async def test_a_burst_of_500_spreads_over_100_gateways(tmp_path: Path) -> None:
    settings = ControlSettings(overlay=Overlay.parse("10.44.0.0/20"), keys_dir=tmp_path / "keys")
    ctx, _ = memory_context(tmp_path, FrozenClock(), settings)
    admin, gateways = AdminHandlers(ctx), GatewayHandlers(ctx)
    await admin.define_tier(p.DefineTier(tier="gold", regions=("eu",)), call_as("admin"))
    for i in range(100):
        gw = f"gw{i:03d}"
        added = await admin.add_gateway(
            p.AddGateway(gateway_id=gw, region="eu", front_door=f"192.0.2.{i + 1}:51820"),
            call_as("admin"),
        )
        await gateways.register(
            p.RegisterGateway(
                gateway_id=gw, token=added.token, public_key=keypair()[1], listen_port=51820
            ),
            call_as("gateway"),
        )
        await gateways.heartbeat(
            p.Heartbeat(
                gateway_id=gw, token=added.token, peer_count=0, active_peers=0,
                rx_bytes=0, tx_bytes=0, load=0.0,
            ),
            call_as("gateway"),
        )  # fmt: skip
    tok = await admin.create_token(p.CreateToken(tier="gold"), call_as("admin"))
    committer = EnrollmentCommitter(ctx)
    committer.start()
    try:
        done = await asyncio.gather(
            *(
                committer.enroll(
                    p.Enroll(token=tok.token, public_key=keypair()[1], request_id=f"r{i}"),
                    call_as("device"),
                )
                for i in range(500)
            )
        )
    finally:
        await committer.stop()
    per_gateway = Counter(e.gateway_id for e in done)
    assert len(done) == 500
    assert max(per_gateway.values()) <= 15, per_gateway.most_common(3)  # 3% of 500
