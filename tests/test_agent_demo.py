"""The `damm up` demo: gateway and device namespaces, a tunnel through fd1, fd1 cut, failover to
fd2 on the signed catalog, the ping back, and a clean teardown."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from damm import netns as netlab
from damm.control.process import ControlPlane
from damm.dev import demo
from damm.device import files
from damm.device.wgconfig import parse_endpoint
from damm.stack.nats_server import NatsServer

pytestmark = pytest.mark.netns


@pytest.fixture
def nats_server(callout_nats_server: NatsServer) -> NatsServer:
    """Gateways run under their identity here, decided by the auth callout, as `damm up` runs."""
    return callout_nats_server


@pytest.fixture
def control(callout_control: ControlPlane) -> ControlPlane:
    return callout_control


def _pids(pattern: str) -> set[str]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return set(out.split())


async def test_demo_fails_over_and_cleans_up(
    control: ControlPlane, nats_server: NatsServer, dsn: str, tmp_path: Path
) -> None:
    ok, why = demo.demo_possible()
    if not ok:
        pytest.skip(f"demo needs network namespaces: {why}")
    assert control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    handle = await demo.run_demo(
        nats_server.url,
        nats_server.passwords["admin"],
        dsn,
        tmp_path / "demo",
    )
    wg_pattern = f"wireguard-go -f wg{handle.lab.tag}"
    try:
        summary = handle.summary()
        text = "\n".join(summary)
        assert handle.ok, text
        assert _pids(wg_pattern), "the demo's wireguard-go daemons run while it is up"
        # The orchestrator made the gateway: its plan, with the reason, opens the summary.
        assert summary[0].startswith(f"orchestrator: add_gateway {handle.gateway_id}: "), text
        assert not handle.gateway_restarted and not handle.reused

        # Step 1: the tunnel came up through fd1 and answered.
        assert handle.ping_ok and handle.first_endpoint == demo.FD1
        assert f"tunnel up via fd1 {demo.FD1}" in text and "ping 10.44.0.1" in text
        # Step 2: the signed catalog listed both doors before the failover.
        assert handle.catalog_version > 0 and {"fd1", "fd2"} <= set(handle.catalog_doors)
        # Step 3: fd1 cut, failover to fd2, ping back.
        assert handle.cut_confirmed
        res = handle.failover_result
        assert res is not None and res.front_door_id == "fd2" and res.new_endpoint == demo.FD2
        assert res.old_endpoint == demo.FD1 and res.live_updated
        assert res.catalog_version >= handle.catalog_version
        assert handle.failover_ping_ok
        assert f"failover to fd2 {demo.FD2}" in text and "ping ok" in text
        assert "did NOT" not in text

        # The device's state dir is what `damm device enroll` writes, moved by the failover.
        assert handle.state_dir is not None and handle.config_path is not None
        assert handle.config_path == handle.state_dir / files.CONFIG
        assert handle.config_path.stat().st_mode & 0o077 == 0
        assert parse_endpoint(handle.config_path.read_text()) == demo.FD2
        saved = files.load(handle.state_dir)
        assert saved.device_id == handle.device_id and saved.front_door_id == "fd2"
        assert saved.trust is not None and saved.trust.min_version == res.catalog_version
    finally:
        await handle.close()
    names = (await netlab.run("ip", "netns", "list")).stdout
    assert handle.gw_ns not in names and handle.dev_ns not in names
    assert not _pids(wg_pattern), "wireguard-go daemons left behind"
    assert not handle.lab.daemons and not handle.lab.namespaces

    # A demo right after, on the same data: it reuses its gateway and its device instead of
    # adding new ones that would linger stale in reports, and shows the same tunnel and failover.
    # The stopped host boots again under its own id; the orchestrator only has fd1 to turn back on.
    again = await demo.run_demo(
        nats_server.url,
        nats_server.passwords["admin"],
        dsn,
        tmp_path / "demo",
    )
    try:
        text = "\n".join(again.summary())
        assert again.ok, text
        assert (again.gateway_id, again.device_id) == (handle.gateway_id, handle.device_id)
        assert again.gateway_restarted and again.reused, text
        assert again.plan_lines == (
            f"orchestrator: add_front_door {handle.gateway_id}/fd1: topology lists front door "
            f"fd1 for {demo.REGION} gateways; {handle.gateway_id} lacks it",
        ), text
        assert again.first_endpoint == demo.FD1 and again.gateway_address == handle.gateway_address
        assert again.failover_result is not None
        assert again.failover_result.front_door_id == "fd2"
        assert control.ctx is not None
        assert list(control.ctx.state.gateways) == [handle.gateway_id]
        assert list(control.ctx.state.devices) == [handle.device_id]
    finally:
        await again.close()
    names = (await netlab.run("ip", "netns", "list")).stdout
    assert again.gw_ns not in names and again.dev_ns not in names
    assert netlab.can_run_netns()[0]
