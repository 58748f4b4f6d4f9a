"""`damm device diagnose`: honest checks, no private key in exports (bundles: test_bundle.py)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from nats.aio.client import Client as NATS

from damm.cli.main import cli
from damm.device import files
from damm.device.diagnose import FAIL, PASS, SKIP, diagnose, export
from damm.protocol.bus import connect
from damm.stack.nats_server import NatsServer
from tests.test_failover import NOW, Server, make_device, signed_catalog


@pytest.fixture
async def server(nc: NATS) -> AsyncIterator[Server]:
    srv = Server()
    subs = await srv.subscribe(nc)
    yield srv
    for sub in subs:
        await sub.unsubscribe()  # type: ignore[attr-defined]


def statuses(report: object) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}  # type: ignore[attr-defined]


async def test_diagnose_healthy_device(
    server: Server, nats_server: NatsServer, tmp_path: Path
) -> None:
    make_device(tmp_path)
    server.signed = signed_catalog(version=3)
    before = (tmp_path / files.STATE).read_bytes()

    async def dial() -> NATS:
        return await connect(nats_server.url)

    report = await diagnose(tmp_path, connect=dial, now=NOW + 5)
    got = statuses(report)
    assert got["files"] == PASS and got["state"] == PASS and got["config"] == PASS
    assert got["interface"] == SKIP and got["handshake"] == SKIP
    assert got["endpoint"] in (PASS, FAIL)  # 192.0.2.1 is TEST-NET: may be unroutable here
    assert got["catalog"] == PASS, report.checks
    # diagnosing verifies without accepting: the trust state is not advanced
    assert (tmp_path / files.STATE).read_bytes() == before


async def test_diagnose_reports_each_problem(
    server: Server, nats_server: NatsServer, tmp_path: Path
) -> None:
    make_device(tmp_path)
    os.chmod(tmp_path / files.PRIVATE_KEY, 0o644)
    config = tmp_path / files.CONFIG
    config.write_text(config.read_text().replace("Endpoint", "Endpoinx"))
    server.signed = signed_catalog(version=3, now=NOW - 10_000)  # expired

    async def dial() -> NATS:
        return await connect(nats_server.url)

    report = await diagnose(tmp_path, connect=dial, probe_endpoint=False, now=NOW,
                            interface="dmtnosuchif")  # fmt: skip
    checks = {c.name: c for c in report.checks}
    assert not report.ok
    assert checks["files"].status == FAIL and "private.key has mode 0644" in checks["files"].reason
    assert checks["config"].status == FAIL and "Endpoint" in checks["config"].reason
    assert checks["interface"].status == FAIL and "dmtnosuchif" in checks["interface"].reason
    assert checks["catalog"].status == FAIL and "catalog_stale" in checks["catalog"].reason
    assert checks["endpoint"].status == SKIP


async def test_export_holds_no_private_key(
    server: Server, nats_server: NatsServer, tmp_path: Path
) -> None:
    state = tmp_path / "dev"
    make_device(state)
    server.signed = signed_catalog()
    private = files.private_key(state)

    async def dial() -> NATS:
        return await connect(nats_server.url)

    report = await diagnose(state, connect=dial, probe_endpoint=False, now=NOW)
    out = tmp_path / "diag.json"
    export(report, out)
    text = out.read_text()
    assert private not in text
    assert private.rstrip("=") not in text
    data = json.loads(text)
    assert data["device"]["device_id"] == "dev-1"
    assert {c["name"] for c in data["checks"]} >= {"files", "config", "catalog", "handshake"}


def test_cli_diagnose_json_and_export(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    make_device(state)
    private = files.private_key(state)
    out = tmp_path / "diag.json"
    # No NATS reachable at that URL: the catalog check fails, so the exit status is non-zero.
    result = CliRunner().invoke(cli, [
        "--nats", "nats://127.0.0.1:1", "device", "diagnose", "--state-dir", str(state),
        "--no-probe", "--timeout", "1", "--json", "--export", str(out),
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert private not in result.output and private not in out.read_text()
    report = json.loads(result.output)
    assert report["ok"] is False
    catalog = next(c for c in report["checks"] if c["name"] == "catalog")
    assert catalog["status"] == "fail" and "unavailable" in catalog["reason"]

    text = CliRunner().invoke(cli, [
        "--nats", "nats://127.0.0.1:1", "device", "diagnose", "--state-dir", str(state),
        "--no-probe", "--timeout", "1",
    ])  # fmt: skip
    lines = text.output.strip().splitlines()
    assert lines[0].startswith("pass  files")
    assert any(line.startswith("fail  catalog") for line in lines)
