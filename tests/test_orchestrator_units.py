"""The systemd units' commands, run as written (in a namespace, with time limits), return.

The gateway unit used to hang before its main command: its ExecStartPre ran wireguard-go in the
foreground. Now the agent makes its interface itself; this runs every Exec line of both units
with the variables an EnvironmentFile would give, only the install path, the interface name and
the state directory swapped for test-local ones.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from damm import netns as netlab
from damm.control.process import ControlPlane
from damm.orchestrator.providers import relay
from damm.private_files import load_or_create_seed
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer

ROOT = Path(__file__).resolve().parent.parent
EXEC_PRE_LIMIT_S = 5.0
READY_LIMIT_S = 20.0
STOP_LIMIT_S = 20.0  # the units' TimeoutStopSec


def exec_lines(unit: Path) -> dict[str, list[str]]:
    """Exec* lines by key, and under "Environment" the unit's own KEY=VALUE settings."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and (key.startswith("Exec") or key == "Environment"):
            out.setdefault(key, []).append(value)
    return out


def unit_env(lines: dict[str, list[str]]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in lines.get("Environment", []))


def argv_of(line: str, env: dict[str, str], swaps: dict[str, str]) -> list[str]:
    line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line.lstrip("-+@!"))
    argv = [swaps.get(word, word) for word in shlex.split(line)]
    if argv[0] == "/opt/damm/venv/bin/damm":
        argv = [sys.executable, "-m", "damm.cli.main", *argv[1:]]
    return argv


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.1)


@pytest.mark.netns
async def test_gateway_unit_starts_registers_and_stops_cleanly(
    control: ControlPlane, admin_nc: NATS, nats_server: NatsServer, tmp_path: Path
) -> None:
    ok, why = netlab.can_run_netns()
    if not ok:
        pytest.skip(why)
    lines = exec_lines(ROOT / "ops" / "damm-gateway.service")
    added = await call(
        admin_nc,
        "admin.gateway.add",
        p.AddGateway(gateway_id="unit-gw", region="eu", front_door="192.0.2.1:51820"),
        p.GatewayAdded,
    )
    env = {
        "DAMM_NATS_URL": f"nats://127.0.0.1:{relay.target_of(nats_server.url)[1]}",
        "DAMM_GATEWAY_ID": "unit-gw",
        "DAMM_GATEWAY_TOKEN": added.token,
    }
    async with netlab.Lab() as lab:
        ns = await lab.netns("unit")
        ifname = lab.if_name("u")
        swaps = {"wg0": ifname, "/var/lib/damm/gateway": str(tmp_path / "gateway")}
        # The host's own loopback reaches NATS, as on a real gateway host.
        port = relay.target_of(nats_server.url)[1]
        server = await relay.serve(relay.listen_in(ns, port), "127.0.0.1", port)
        child_env = dict(os.environ, **env, **unit_env(lines))
        try:
            for line in lines.get("ExecStartPre", []):
                pre = await asyncio.create_subprocess_exec(
                    "ip", "netns", "exec", ns, *argv_of(line, env, swaps), env=child_env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
                try:
                    assert await asyncio.wait_for(pre.wait(), EXEC_PRE_LIMIT_S) == 0
                except TimeoutError:
                    os.killpg(pre.pid, signal.SIGTERM)  # the line's children too
                    await pre.wait()
                    raise AssertionError(f"ExecStartPre did not return: {line}") from None
            (main,) = lines["ExecStart"]
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns, *argv_of(main, env, swaps),
                env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                gw = control.ctx.state.gateways["unit-gw"]  # type: ignore[union-attr]
                await eventually(
                    lambda: _true(gw.last_heartbeat is not None), READY_LIMIT_S, "heartbeat"
                )
                shown = await netlab.exec_in(ns, "ip", "-o", "addr", "show", "dev", ifname)
                assert "10.44.0.1/24" in shown.stdout
                assert "UP" in (await netlab.exec_in(ns, "ip", "link", "show", ifname)).stdout
            finally:
                proc.terminate()
                code = await asyncio.wait_for(proc.wait(), STOP_LIMIT_S)
            assert code == 0, (await proc.stderr.read()).decode()[-2000:]  # type: ignore[union-attr]
            gone = await netlab.exec_in(ns, "ip", "link", "show", ifname, check=False)
            assert not gone.ok, "the agent left the interface it made behind"
            assert not os.path.lexists(f"/var/run/wireguard/{ifname}.sock")  # noqa: ASYNC240
        finally:
            server.close()
            await server.wait_closed()


async def _true(value: bool) -> bool:
    return value


async def test_control_unit_serves_and_stops(
    nats_server: NatsServer, dsn: str, tmp_path: Path, admin_nc: NATS
) -> None:
    lines = exec_lines(ROOT / "ops" / "damm-control.service")
    assert "ExecStartPre" not in lines
    (main,) = lines["ExecStart"]
    # What the unit's /etc/damm/control.env holds, the KEK file among it.
    load_or_create_seed(tmp_path / "kek", "key-encryption key")
    env = dict(
        os.environ,
        **unit_env(lines),
        DAMM_NATS_URL=nats_server.url,
        DAMM_DATABASE_URL=dsn,
        DAMM_CONTROL_PASSWORD=nats_server.passwords["control"],
        DAMM_KEK_FILE=str(tmp_path / "kek"),
        DAMM_KEYS_DIR=str(tmp_path / "keys"),
        DAMM_HOME=str(tmp_path / "home"),
    )
    proc = await asyncio.create_subprocess_exec(
        *argv_of(main, {}, {}), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:

        async def serving() -> bool:
            try:
                await call(admin_nc, "admin.tier.define", p.DefineTier(tier="unit"), p.Done)
            except Exception:
                return False
            return True

        await eventually(serving, READY_LIMIT_S, "control plane answering")
    finally:
        proc.terminate()
        code = await asyncio.wait_for(proc.wait(), STOP_LIMIT_S)
    assert code == 0, (await proc.stderr.read()).decode()[-2000:]  # type: ignore[union-attr]


@pytest.mark.netns
async def test_gateway_run_uses_a_live_interface_of_another_namespace_and_leaves_it() -> None:
    """An agent beside (not inside) the interface's namespace talks to its UAPI socket only."""
    ok, why = netlab.can_run_netns()
    if not ok:
        pytest.skip(why)
    from damm.agent import interface

    async with netlab.Lab() as lab:
        ns = await lab.netns("side")
        daemon = await lab.wireguard_go(ns, "s")
        for kind in ("auto", "uapi"):
            found = await interface.ensure(daemon.ifname, kind)  # type: ignore[arg-type]
            assert (found.backend, found.created, found.local) == ("uapi", False, False)
            await found.configure("10.44.0.1/24")
            await found.close()
        assert daemon.process.returncode is None, "the daemon someone else started still runs"
        shown = await netlab.exec_in(ns, "ip", "-o", "addr", "show", "dev", daemon.ifname)
        assert "10.44.0.1" not in shown.stdout, "not ours to address"
        assert not await interface.exists(daemon.ifname)  # and nothing appeared out here
