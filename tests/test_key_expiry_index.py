"""The key-expiry reactor finds due devices through an index by expiry time, not by scanning
every device each second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from damm.clock import FrozenClock
from damm.control.handlers.admin import AdminHandlers
from damm.control.handlers.enrollment import EnrollmentCommitter
from damm.control.handlers.gateway import GatewayHandlers
from damm.control.reactors.key_expiry import KeyExpiryReactor
from damm.domain.ipam import Overlay
from damm.protocol import messages as p
from damm.settings import ControlSettings
from tests.fleet import keypair
from tests.memory_log import memory_context
from tests.test_placement_burst import call_as


class NoScan(dict[str, Any]):
    """A device table that fails the test when anyone walks all of it."""

    def values(self) -> Any:
        raise AssertionError("scanned every device")

    def items(self) -> Any:
        raise AssertionError("scanned every device")

    def __iter__(self) -> Any:
        raise AssertionError("scanned every device")


class Leader:
    is_leader = True


async def test_only_due_devices_are_visited_and_suspended(tmp_path: Path) -> None:
    clock = FrozenClock()
    settings = ControlSettings(overlay=Overlay.parse("10.44.0.0/22"), keys_dir=tmp_path / "k")
    ctx, _ = memory_context(tmp_path, clock, settings)
    admin, gateways = AdminHandlers(ctx), GatewayHandlers(ctx)
    await admin.define_tier(
        p.DefineTier(tier="short", regions=("eu",), key_lifetime_s=60), call_as("admin")
    )
    await admin.define_tier(p.DefineTier(tier="long", regions=("eu",)), call_as("admin"))
    added = await admin.add_gateway(
        p.AddGateway(gateway_id="gw1", region="eu", front_door="192.0.2.1:51820"), call_as("admin")
    )
    await gateways.register(
        p.RegisterGateway(
            gateway_id="gw1", token=added.token, public_key=keypair()[1], listen_port=51820
        ),
        call_as("gateway"),
    )
    await gateways.heartbeat(
        p.Heartbeat(
            gateway_id="gw1", token=added.token, peer_count=0, active_peers=0,
            rx_bytes=0, tx_bytes=0, load=0.0,
        ),
        call_as("gateway"),
    )  # fmt: skip
    committer = EnrollmentCommitter(ctx)
    committer.start()
    try:
        short = await admin.create_token(p.CreateToken(tier="short"), call_as("admin"))
        long = await admin.create_token(p.CreateToken(tier="long"), call_as("admin"))
        ids = {}
        for tok, n in ((long.token, 300), (short.token, 3)):
            for _ in range(n):
                done = await committer.enroll(
                    p.Enroll(
                        token=tok, public_key=keypair()[1], request_id=call_as("d").correlation_id
                    ),
                    call_as("device"),
                )
                ids[done.device_id] = tok
    finally:
        await committer.stop()
    reactor = KeyExpiryReactor(ctx, Leader())  # type: ignore[arg-type]
    ctx.state.devices = NoScan(ctx.state.devices)
    assert await reactor.sweep() == 0
    clock.advance(61)
    assert await reactor.sweep() == 3
    suspended = [d for d, tok in ids.items() if tok == short.token]
    for device_id in suspended:
        dev = dict.__getitem__(ctx.state.devices, device_id)
        assert (dev.status, dev.reason) == ("suspended", "key_expired")
    assert await reactor.sweep() == 0
