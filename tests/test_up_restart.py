"""Restarting `damm up` on the same data keeps its promises: the same NATS port, a gateway agent
that reconnects by itself, and a device whose device.json still points at the right place."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.device import files
from damm.device.failover import failover
from damm.device.profile import save_enrollment
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.stack.stackfile import StackFile
from damm.wireguard.memory import MemoryBackend
from tests.test_device_standing import catalog_lists, wait_for

DAMM = str(Path(sys.executable).parent / "damm")


class Up:
    """One `damm up --no-demo` process on ``home``."""

    def __init__(self, home: Path) -> None:
        env = {**os.environ, "DAMM_HOME": str(home)}
        env.pop("DAMM_NATS_URL", None)
        env.pop("DAMM_DATABASE_URL", None)
        self.home = home
        self.proc = subprocess.Popen(
            [DAMM, "up", "--no-demo"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    async def ready(self) -> StackFile:
        deadline = time.monotonic() + 60
        while True:
            stack = StackFile.read(self.home)
            if stack is not None and stack.pid == self.proc.pid:
                return stack
            assert self.proc.poll() is None, self.proc.communicate()[0]
            assert time.monotonic() < deadline, "damm up did not write its stack file"
            await asyncio.sleep(0.1)

    async def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(self.proc.communicate, timeout=60)
        assert self.proc.returncode == 0, out
        return out


@pytest.fixture
def damm_home() -> Iterator[Path]:
    """Straight under /tmp: embedded Postgres opens every parent of its data directory to its
    own system user, and a concurrent pytest session closes /tmp/pytest-of-root again."""
    root = Path(tempfile.mkdtemp(prefix="damm-up-", dir="/tmp"))
    yield root / "home"
    shutil.rmtree(root, ignore_errors=True)


async def test_restart_keeps_the_port_and_the_agent_and_device_carry_on(
    tmp_path: Path, damm_home: Path
) -> None:
    home = damm_home
    up = Up(home)
    agent_stop = asyncio.Event()
    agent_task: asyncio.Task[None] | None = None
    try:
        stack = await up.ready()
        admin = await connect(stack.nats_url, user="admin", password=stack.passwords["admin"])
        try:
            await call(admin, "admin.tier.define", p.DefineTier(tier="gold", regions=("eu",)),
                       p.Done)  # fmt: skip
            added = await call(
                admin,
                "admin.gateway.add",
                p.AddGateway(gateway_id="gw1", region="eu", front_door="192.0.2.1:51820"),
                p.GatewayAdded,
            )
            await call(admin, "admin.gateway.front_door", p.SetFrontDoor(
                gateway_id="gw1", front_door_id="fd2", endpoint="192.0.2.2:51820", priority=20,
            ), p.Done)  # fmt: skip
            token = (
                await call(admin, "admin.token.create", p.CreateToken(tier="gold"), p.TokenCreated)
            ).token
        finally:
            await admin.close()
        agent = GatewayAgent(
            AgentConfig(
                gateway_id="gw1",
                token=added.token,
                nats_url=stack.nats_url,
                state_dir=tmp_path / "gw1",
                heartbeat_s=0.5,
                usage_s=1.0,
            ),
            MemoryBackend(),
        )
        agent_task = asyncio.create_task(agent.run(agent_stop))
        await asyncio.wait_for(agent.synced.wait(), 30)

        state_dir = tmp_path / "device"
        public = files.generate_key(state_dir)
        # damm up runs the auth callout: a device enrolls under its own key, as the CLI does.
        device_nc = await connect(
            stack.nats_url, identity_seed=files.identity_seed(state_dir, create=True)
        )
        try:
            for _ in range(50):  # until the agent's first heartbeat is folded
                try:
                    res = await call(device_nc, "enroll", p.Enroll(
                        token=token, public_key=public, request_id="r1"), p.Enrolled)  # fmt: skip
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            dev, _ = save_enrollment(state_dir, res, public, stack.nats_url)
        finally:
            await device_nc.close()
        assert agent.nc is not None
        reconnects = agent.nc.stats["reconnects"]

        # A restart while the agent runs, with its connections closing under it.
        await up.stop()
        assert StackFile.read(home) is not None, "the stack file records where the stack lives"
        up = Up(home)
        again = await up.ready()
        assert again.nats_url == stack.nats_url

        await wait_for(lambda: agent.nc is not None and agent.nc.stats["reconnects"] > reconnects
                       and agent.nc.is_connected, timeout=30)  # fmt: skip
        await asyncio.wait_for(agent.heartbeat(), 10)  # the agent speaks to the new control plane

        # The device carries on with the URL it enrolled through, under its own key (check-in
        # and failover reports are device requests: an anonymous connection may not make them).
        nats_url = files.load(state_dir).nats_url
        device_nc = await connect(nats_url, identity_seed=files.identity_seed(state_dir))
        try:
            await wait_for(lambda: catalog_lists(device_nc, dev.trust, "fd2"), timeout=30)  # type: ignore[arg-type]
            moved = await failover(device_nc, state_dir)
        finally:
            await device_nc.close()
        assert moved.front_door_id == "fd2" and moved.reported, moved.report_error
    finally:
        agent_stop.set()
        if agent_task is not None:
            await asyncio.gather(agent_task, return_exceptions=True)
        out = await up.stop()
    assert "DAMM is up." in out
    ports = json.loads((home / "stack.json").read_text())
    assert ports["pid"] == 0
    # Commands say the stack is stopped instead of hunting for a server that is gone.
    env = {**os.environ, "DAMM_HOME": str(home)}
    env.pop("DAMM_NATS_URL", None)
    env.pop("DAMM_DATABASE_URL", None)
    done = await asyncio.to_thread(
        subprocess.run, [DAMM, "admin", "tier", "create", "x"], env=env, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 3 and "stack is stopped" in done.stderr, done.stderr
