"""Placement under a burst: the control plane counts its own assignments, so new devices spread
over equally loaded gateways instead of herding onto the one that sorts first."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from damm.clock import FrozenClock
from damm.control.handlers.admin import AdminHandlers
from damm.control.handlers.enrollment import EnrollmentCommitter
from damm.control.handlers.gateway import GatewayHandlers
from damm.domain.ipam import Overlay
from damm.protocol import messages as p
from damm.settings import ControlSettings
from tests.fleet import keypair
from tests.memory_log import call_as, healthy_gateway, memory_context


async def test_a_burst_of_500_spreads_over_100_gateways(tmp_path: Path) -> None:
    settings = ControlSettings(overlay=Overlay.parse("10.44.0.0/20"), keys_dir=tmp_path / "keys")
    ctx, _ = memory_context(tmp_path, FrozenClock(), settings)
    admin, gateways = AdminHandlers(ctx), GatewayHandlers(ctx)
    await admin.define_tier(p.DefineTier(tier="gold", regions=("eu",)), call_as("admin"))
    for i in range(100):
        gw = f"gw{i:03d}"
        await healthy_gateway(admin, gateways, gw, f"192.0.2.{i + 1}:51820")
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
