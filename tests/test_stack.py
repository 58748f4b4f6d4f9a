"""The embedded stack and the production NATS configuration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm.control.process import ControlPlane
from damm.keys.tokens import gateway_password_hash
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.stack.nats_config import callout_env, production
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
        **callout_env(),
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


async def _received(
    client: NATS, subject: str, publish: Callable[[], Awaitable[None]], *, expect: bool = False
) -> list[bytes]:
    """What ``client`` receives on ``subject`` while ``publish`` is repeated for a while.

    Repeated because nats-server may not route to a brand-new connection's subscription for a
    moment after it was acknowledged (seen here with a bare ``nats-server -js`` too). With
    ``expect`` it stops at the first message; otherwise an empty result after 0.6 s of
    publishing means the server withheld every one.
    """
    got: list[bytes] = []
    arrived = asyncio.Event()

    async def keep(msg: Msg) -> None:
        got.append(msg.data)
        arrived.set()

    sub = await client.subscribe(subject, cb=keep)
    await client.flush()
    deadline = asyncio.get_running_loop().time() + (3.0 if expect else 0.6)
    while asyncio.get_running_loop().time() < deadline and not arrived.is_set():
        await publish()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), 0.1)
    await sub.unsubscribe()
    return got[:1] if expect else got


async def test_each_party_reads_only_its_own(nats_server: NatsServer) -> None:
    tokens = {"gw1": "dmg_token-one", "gw2": "dmg_token-two"}
    nats_server.set_gateways({g: gateway_password_hash(t) for g, t in tokens.items()})
    await asyncio.sleep(0.5)  # SIGHUP reload
    url = nats_server.url
    control = await connect(url, user="control", password=nats_server.passwords["control"])
    admin = await connect(url, user="admin", password=nats_server.passwords["admin"])

    async def answer(msg: Msg) -> None:
        await control.publish(msg.reply, b"dmt_freshly-issued-secret")

    await control.subscribe("damm.req.admin.token.create", cb=answer)
    await control.flush()

    async def admin_asks() -> None:
        await admin.request("damm.req.admin.token.create", b"{}", timeout=2)

    def peers(gateway: str) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            await control.publish(f"damm.peers.{gateway}", gateway.encode())
            await control.flush()

        return send

    async def as_party(
        who: str, subject: str, publish: Callable[[], Awaitable[None]], *, expect: bool = False
    ) -> list[bytes]:
        # a fresh connection per check: nats-py may drop the next subscription's messages after
        # a denied one, which would blur what the server itself allowed
        if who == "device":
            client = await connect(url, reconnect=False)
        else:
            client = await connect(url, user=f"gw-{who}", password=tokens[who], reconnect=False)
        try:
            return await _received(client, subject, publish, expect=expect)
        finally:
            await client.close()

    try:
        assert await as_party("gw1", "damm.peers.gw1", peers("gw1"), expect=True) == [b"gw1"]
        # nobody who may read _INBOX.> sees an admin's reply (it holds a new token)
        assert await as_party("device", "_INBOX.>", admin_asks) == []
        assert await as_party("gw1", "_INBOX.>", admin_asks) == []
        # a gateway reads its own peer set, not another's, not all of them
        assert await as_party("gw1", "damm.peers.gw2", peers("gw2")) == []
        assert await as_party("gw1", "damm.peers.>", peers("gw2")) == []
        device = await connect(url, reconnect=False)
        gw1 = await connect(url, user="gw-gw1", password=tokens["gw1"], reconnect=False)
        try:
            for client, subject in (
                (device, "damm.req.admin.tier.define"),
                (device, "damm.req.gateway.register"),
                (device, "$JS.API.STREAM.LIST"),
                (gw1, "damm.req.admin.token.create"),
                (gw1, "damm.evt.device.x"),
                (gw1, "$JS.API.STREAM.LIST"),
            ):
                with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
                    await client.request(subject, b"{}", timeout=0.5)
        finally:
            await device.close()
            await gw1.close()
    finally:
        await control.close()
        await admin.close()
    for user, password in (("control", "wrong"), ("gw-gw1", tokens["gw2"]), ("gateway", "x")):
        with pytest.raises(Exception):  # noqa: B017 - any auth failure type is fine
            await connect(url, user=user, password=password, reconnect=False)


def _wait_for(path: Path, seconds: float, proc: subprocess.Popen[str]) -> None:
    """Poll for this run's stack file (the last run's stays behind, marked stopped); when it
    does not come, say what the process printed."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(path.read_text())["pid"] == proc.pid:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            output = proc.communicate(timeout=30)[0]
            raise AssertionError(
                f"{path} did not name pid {proc.pid}; the process printed:\n{output}"
            )
        time.sleep(0.1)


@pytest.fixture
def stack_home() -> Iterator[Path]:
    """A DAMM_HOME outside pytest's own temporary root.

    Embedded Postgres runs as another user and needs to traverse every parent of its data
    directory; pytest resets /tmp/pytest-of-<user> to 0700 whenever a session starts, which
    made the server's checkpointer fail with "permission denied" mid-test.
    """
    root = Path(tempfile.mkdtemp(prefix="damm-test-home-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_damm_up_starts_stops_and_reuses_data(stack_home: Path) -> None:
    tmp_path = stack_home
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
            _wait_for(stack, 60, up)
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
        # Postgres stops cleanly: it can still reach its data through DAMM_HOME (execute-only).
        assert "Failed to stop server" not in out, out
        # The stack file stays, marked stopped, so the next start keeps its port.
        assert json.loads(stack.read_text())["pid"] == 0
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "home")], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == "", "processes left behind"


async def test_nats_config_needs_no_user_per_gateway(
    control: ControlPlane, admin_nc: NATS, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Gateways are decided by the auth callout: adding one leaves the file as it was, and the
    environment `admin callout-key` prints makes it valid."""
    added = await call(
        admin_nc, "admin.gateway.add", p.AddGateway(gateway_id="gw7", region="eu"), p.GatewayAdded
    )
    await control.wait_projected()
    env = {
        **os.environ,
        "DAMM_NATS_URL": nats_server.url,
        "DAMM_DATABASE_URL": control.database_url,
        "DAMM_HOME": str(tmp_path / "nohome"),
    }
    out = tmp_path / "damm.conf"
    seed = tmp_path / "callout.seed"
    done, keyed = [
        await asyncio.to_thread(
            subprocess.run, argv, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        for argv in (
            [DAMM, "admin", "nats-config", "--out", str(out)],
            [DAMM, "admin", "callout-key", str(seed)],
        )
    ]
    assert done.returncode == 0, done.stderr
    assert keyed.returncode == 0, keyed.stderr
    text = out.read_text()
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert oct(seed.stat().st_mode & 0o777) == "0o600"
    assert text == production()
    assert "gw7" not in text
    assert added.token not in text
    assert "auth_callout" in text
    printed = dict(line.split("=", 1) for line in keyed.stdout.split())
    assert printed == callout_env(seed.read_bytes().strip())
    conf = tmp_path / "check.conf"
    conf.write_text(text.replace("/var/lib/damm", str(tmp_path)))
    env.update({f"DAMM_{r}_PASSWORD": "x" * 12 for r in ("CONTROL", "ADMIN", "SYS")})
    env.update(printed)
    checked = await asyncio.to_thread(
        subprocess.run,
        [binary(), "-t", "-c", str(conf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
