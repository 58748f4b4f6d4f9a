"""The operator's CLI against a real control plane: token ids shown, secrets never echoed, and
a unique id prefix accepted wherever an id is an argument."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.keys.tokens import token_hash
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from damm.subjects import EVENTS_STREAM
from tests.fleet import enroll, setup_fleet

DAMM = str(Path(sys.executable).parent / "damm")


async def damm(
    nats_server: NatsServer, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DAMM_NATS_URL": nats_server.url,
        "DAMM_ADMIN_PASSWORD": nats_server.passwords["admin"],
        "DAMM_HOME": str(tmp_path / "nohome"),
        "COLUMNS": "60",
    }
    # in a thread: the control plane answering it runs on this test's event loop
    return await asyncio.to_thread(
        subprocess.run, [DAMM, *args], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


async def test_token_create_shows_its_id_and_revoke_never_echoes_a_secret(
    control: ControlPlane, nats_server: NatsServer, admin_nc: NATS, gateway_nc: NATS, tmp_path: Path
) -> None:
    await setup_fleet(admin_nc, gateway_nc)
    done = await damm(nats_server, tmp_path, "admin", "token", "create", "--tier", "gold")
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip()
    assert secret.startswith("dmt_") and "\n" not in secret  # scripts capture stdout alone
    assert control.ctx is not None
    token_id = control.ctx.state.tokens_by_hash[token_hash(secret)].token_id
    assert f"token id {token_id}" in done.stderr

    wrong = await damm(nats_server, tmp_path, "admin", "token", "revoke", secret)
    assert wrong.returncode != 0
    assert secret not in wrong.stderr + wrong.stdout
    assert secret[4:] not in wrong.stderr + wrong.stdout
    assert wrong.stderr.startswith("error: ")

    ok = await damm(nats_server, tmp_path, "admin", "token", "revoke", token_id[:6])
    assert ok.returncode == 0, ok.stderr
    assert control.ctx.state.tokens[token_id].revoked
    assert token_id in ok.stdout


async def test_unique_prefix_names_a_device_and_an_ambiguous_one_is_refused(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    assert control.ctx is not None
    state = control.ctx.state
    fleet = await setup_fleet(admin_nc, gateway_nc)
    devices = [(await enroll(device_nc, fleet["token"])).device_id for _ in range(40)]
    target = devices[0]
    unique = next(target[:n] for n in range(4, 21)
                  if sum(d.startswith(target[:n]) for d in devices) == 1)  # fmt: skip
    await call(admin_nc, "admin.device.suspend", p.DeviceAction(device_id=unique), p.Done)
    assert state.devices[target].status == "suspended"
    await call(admin_nc, "admin.device.resume", p.DeviceAction(device_id=unique), p.Done)
    await call(admin_nc, "admin.usage.reset", p.ResetUsage(device_id=unique), p.Done)
    for gw in ("edge-fra1", "edge-fra2"):
        await call(admin_nc, "admin.gateway.add", p.AddGateway(gateway_id=gw, region="eu"),
                   p.GatewayAdded)  # fmt: skip
    js = admin_nc.jetstream()
    before = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    for command, request in (
        ("admin.gateway.status", p.SetGatewayStatus(gateway_id="edge-fra", active=False)),
        ("admin.gateway.front_door",
         p.SetFrontDoor(gateway_id="edge-fra", front_door_id="fd1", endpoint="192.0.2.9:1")),
    ):  # fmt: skip
        with pytest.raises(DammError) as info:
            await call(admin_nc, command, request, p.Done, correlation_id=f"refused-{command}")
        assert info.value.code is Code.AMBIGUOUS_ID
        assert "edge-fra1" in info.value.detail and "edge-fra2" in info.value.detail
    # Nothing recorded for the refused commands: no event carries their correlation ids. (The
    # global sequence is no measure: a reactor or the catalog publisher may append meanwhile on
    # a loaded machine, as it once did in a full run.)
    last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    appended = [(await js.get_msg(EVENTS_STREAM, seq)) for seq in range(before + 1, last + 1)]
    assert not [m.subject for m in appended if b"refused-admin.gateway" in m.data]
    await call(admin_nc, "admin.gateway.status",
               p.SetGatewayStatus(gateway_id="edge-fra2", active=False), p.Done)  # fmt: skip
    assert not state.gateways["edge-fra2"].active and state.gateways["edge-fra1"].active
    with pytest.raises(DammError) as info:
        await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=target[:3]), p.Done)
    assert info.value.code is Code.NOT_FOUND  # too short to guess from


async def test_admin_device_takes_a_prefix_and_lists_keep_whole_ids(
    control: ControlPlane,
    nats_server: NatsServer,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    dsn: str,
    tmp_path: Path,
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    ids = [(await enroll(device_nc, fleet["token"])).device_id for _ in range(3)]
    await control.wait_projected()
    shown = await damm(nats_server, tmp_path, "--database-url", dsn, "admin", "device", ids[0][:8])
    assert shown.returncode == 0, shown.stderr
    assert ids[0] in shown.stdout
    audit = await damm(
        nats_server, tmp_path, "--database-url", dsn, "admin", "audit", "--device", ids[1][:8],
        "--type", "device.enrolled", "--json",
    )  # fmt: skip
    assert audit.returncode == 0, audit.stderr
    assert [json.loads(line)["aggregate"] for line in audit.stdout.splitlines()] == [
        f"device/{ids[1]}"
    ]
    # Through a pipe, with a narrow COLUMNS: every id whole.
    listed = await damm(nats_server, tmp_path, "--database-url", dsn, "admin", "devices")
    assert listed.returncode == 0, listed.stderr
    for ident in ids:
        assert ident in listed.stdout
