"""The embedded stack and the production NATS configuration."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats.errors
import pytest

from damm.bus import connect
from damm.stack.nats_config import production
from damm.stack.nats_server import NatsServer, binary

ROOT = Path(__file__).resolve().parent.parent
DAMM = str(Path(sys.executable).parent / "damm")


def test_ops_nats_conf_is_generated() -> None:
    assert (ROOT / "ops" / "nats.conf").read_text() == production()


def test_ops_nats_conf_is_valid(tmp_path: Path) -> None:
    conf = (ROOT / "ops" / "nats.conf").read_text().replace("/var/lib/damm", str(tmp_path))
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    env = {
        **os.environ,
        **{f"DAMM_{r}_PASSWORD": "x" * 12 for r in ("CONTROL", "ADMIN", "GATEWAY", "SYS")},
    }
    done = subprocess.run(
        [binary(), "-t", "-c", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_devices_and_gateways_get_narrow_permissions(nats_server: NatsServer) -> None:
    device = await connect(nats_server.url, reconnect=False)
    gateway = await connect(
        nats_server.url, user="gateway", password=nats_server.passwords["gateway"], reconnect=False
    )
    try:
        for client, subject in (
            (device, "damm.req.admin.tier.define"),
            (device, "damm.req.gateway.register"),
            (device, "$JS.API.STREAM.LIST"),
            (gateway, "damm.req.admin.token.create"),
            (gateway, "damm.evt.device.x"),
        ):
            with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
                await client.request(subject, b"{}", timeout=0.5)
    finally:
        await device.close()
        await gateway.close()
    with pytest.raises(Exception):  # noqa: B017 - any auth failure type is fine
        await connect(nats_server.url, user="control", password="wrong", reconnect=False)


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_damm_up_starts_stops_and_reuses_data(tmp_path: Path) -> None:
    env = {**os.environ, "DAMM_HOME": str(tmp_path / "home")}
    env.pop("DAMM_NATS_URL", None)
    env.pop("DAMM_DATABASE_URL", None)
    stack = tmp_path / "home" / "stack.json"
    for round_ in range(2):
        up = subprocess.Popen(
            [DAMM, "up", "--no-demo"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _wait_for(stack, 60)
            if round_ == 0:
                for args in (["admin", "tier", "create", "gold", "--regions", "eu"],):
                    done = subprocess.run(
                        [DAMM, *args],
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=60,
                        check=False,
                    )
                    assert done.returncode == 0, done.stderr
            time.sleep(1.0)
            listing = subprocess.run(
                [DAMM, "admin", "tiers", "--json"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert '"tier":"gold"' in listing.stdout, listing.stdout + listing.stderr
        finally:
            up.send_signal(signal.SIGTERM)
            out, _ = up.communicate(timeout=60)
        assert up.returncode == 0, out
        assert "DAMM is up." in out
        assert not stack.exists()
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "home")], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == "", "processes left behind"
