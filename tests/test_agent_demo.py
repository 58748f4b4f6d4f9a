"""The `damm up` demo: gateway and device namespaces, a tunnel, a ping, and a clean teardown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from damm import demo, netlab
from damm.control import ControlPlane
from damm.stack.nats_server import NatsServer

pytestmark = pytest.mark.netns


async def test_demo_pings_across_and_cleans_up(control: ControlPlane, nats_server: NatsServer,
                                               tmp_path: Path) -> None:
    ok, why = demo.demo_possible()
    if not ok:
        pytest.skip(f"demo needs network namespaces: {why}")
    assert control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    handle = await demo.run_demo(nats_server.url, nats_server.passwords["gateway"],
                                 nats_server.passwords["admin"], tmp_path / "demo")
    try:
        assert handle.ping_ok, handle.summary()
        assert any("works" in line for line in handle.summary())
        assert handle.config_path is not None and handle.config_path.stat().st_mode & 0o077 == 0
    finally:
        await handle.close()
    names = (await netlab.run("ip", "netns", "list")).stdout
    assert handle.gw_ns not in names and handle.dev_ns not in names
    assert netlab.can_run_netns()[0]
