"""A snapshot restores everything a decision reads, derived indices included, without a server:
the restored state encodes to the same bytes and its indices equal the folded ones."""

from __future__ import annotations

from pathlib import Path

from damm.clock import FrozenClock
from damm.control.handlers.admin import AdminHandlers
from damm.control.handlers.enrollment import EnrollmentCommitter
from damm.control.handlers.gateway import GatewayHandlers
from damm.control.snapshots import encode, restore
from damm.control.state import DecisionState
from damm.domain.ipam import Overlay
from damm.protocol import messages as p
from damm.settings import ControlSettings
from tests.fleet import keypair
from tests.memory_log import call_as, healthy_gateway, memory_context


async def test_restore_rebuilds_every_index(tmp_path: Path) -> None:
    settings = ControlSettings(overlay=Overlay.parse("10.44.0.0/22"), keys_dir=tmp_path / "k")
    ctx, log = memory_context(tmp_path, FrozenClock(), settings)
    admin, gateways = AdminHandlers(ctx), GatewayHandlers(ctx)
    await admin.define_tier(
        p.DefineTier(tier="gold", regions=("eu",), key_lifetime_s=600), call_as("admin")
    )
    await admin.define_egress(
        p.DefineEgress(pool_id="de", region="eu", countries=("DE",), ips=("198.51.100.0/30",)),
        call_as("admin"),
    )
    for gw in ("gw1", "gw2", "gw3"):
        await healthy_gateway(admin, gateways, gw, "192.0.2.1:51820")
    tok = await admin.create_token(p.CreateToken(tier="gold"), call_as("admin"))
    committer = EnrollmentCommitter(ctx)
    committer.start()
    try:
        enrolled = [
            await committer.enroll(
                p.Enroll(
                    token=tok.token,
                    public_key=keypair()[1],
                    request_id=call_as("d").correlation_id,
                    exit_country="DE" if i % 2 else None,
                ),
                call_as("device"),
            )
            for i in range(12)
        ]
    finally:
        await committer.stop()
    await admin.revoke_device(p.DeviceAction(device_id=enrolled[3].device_id), call_as("admin"))
    await admin.suspend_device(p.DeviceAction(device_id=enrolled[4].device_id), call_as("admin"))

    folded = ctx.state
    seq = len(log.messages)
    snap = encode(folded, seq)
    restored = DecisionState(settings.overlay)
    restore(snap, restored)

    assert encode(restored, seq) == snap
    assert restored.tokens_by_hash.keys() == folded.tokens_by_hash.keys()
    assert {g: set(d) for g, d in restored.devices_by_gateway.items()} == {
        g: set(d) for g, d in folded.devices_by_gateway.items()
    }
    assert +restored.active_on == +folded.active_on
    assert +restored.pool_assigned == +folded.pool_assigned
    assert {k: +v for k, v in restored.egress_in_use.items()} == {
        k: +v for k, v in folded.egress_in_use.items()
    }
    assert restored.pool_addresses == folded.pool_addresses
    assert restored.addresses.used_indices() == folded.addresses.used_indices()
    assert restored.addresses.peek(3) == folded.addresses.peek(3)
    assert sorted(restored.key_expiries) == sorted(
        e for e in folded.key_expiries if folded.devices[e[1]].status == "active"
    )
    telemetry_free = {
        g: (c.region, c.registered, c.active, c.front_doors)
        for g, c in folded.placement.gateways.items()
    }
    assert {
        g: (c.region, c.registered, c.active, c.front_doors)
        for g, c in restored.placement.gateways.items()
    } == telemetry_free
