"""`damm device bundle`: a real zip, unzipped and opened from disk in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from playwright.async_api import Browser, expect

from damm.cli.main import cli
from damm.device import files
from damm.device.bundle import (
    CATALOG_NAME,
    CONFIG_NAME,
    DIAGNOSTICS_NAME,
    INFO_NAME,
    QR_PNG_NAME,
    QR_SVG_NAME,
    README_NAME,
    build_bundle,
    read_contents,
)
from damm.device.diagnose import diagnose, export
from damm.device.failover import failover
from damm.errors import DammError
from tests.browser import artifact, decode_qr, launch, needs_chromium, open_page
from tests.test_failover import Server, make_device, server, signed_catalog

__all__ = ["server"]  # the catalog.get stand-in, used as a fixture below

PAGE = {"index.html", "preload.js", "app.js", "style.css", "vendor/qrcode.js"}


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async for b in launch():
        yield b


def bundle(state: Path, out: Path, *extra: str) -> zipfile.ZipFile:
    result = CliRunner().invoke(
        cli, ["device", "bundle", "--state-dir", str(state), "--out", str(out), *extra]
    )
    assert result.exit_code == 0, result.output
    assert "open index.html" in result.output
    return zipfile.ZipFile(out)


def test_bundle_holds_profile_qr_guidance_and_page(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    make_device(state)
    private = files.private_key(state)
    config = (state / files.CONFIG).read_bytes()
    out = tmp_path / "bundle.zip"
    with bundle(state, out) as zf:
        names = set(zf.namelist())
        assert {CONFIG_NAME, README_NAME, INFO_NAME, QR_SVG_NAME, QR_PNG_NAME} <= names
        assert names >= PAGE
        assert CATALOG_NAME not in names and DIAGNOSTICS_NAME not in names  # none held yet
        assert zf.read(CONFIG_NAME) == config
        assert decode_qr(zf.read(QR_PNG_NAME)) == config
        assert zf.read(QR_SVG_NAME).startswith(b"<?xml") and b"<svg" in zf.read(QR_SVG_NAME)
        readme = zf.read(README_NAME).decode()
        for platform in ("Linux (wg-quick)", "Linux (NetworkManager)", "macOS", "Windows", "iOS",
                         "Android", "index.html", "PRIVATE KEY", QR_PNG_NAME):  # fmt: skip
            assert platform in readme
        assert "qrencode" not in readme  # no longer sends people to a tool they do not have
        assert readme.count("Check:") == 5  # iOS and Android share one section
        # the private key travels in the config, its QR code and the page's preload, nowhere else
        holding = {n for n in names if private.encode() in zf.read(n)}
        assert holding == {CONFIG_NAME, "preload.js"}
        info = msgspec.json.decode(zf.read(INFO_NAME))
        assert info["public_key"] == files.public_key(state)
        assert info["trust"]["region"] == "eu" and info["dns"] == ["10.44.0.1"]
        assert all(i.external_attr >> 16 == 0o600 for i in zf.infolist())
    assert out.stat().st_mode & 0o777 == 0o600
    contents = read_contents(state)
    assert build_bundle(contents) == build_bundle(contents)  # deterministic


@pytest.mark.skipif(shutil.which("wg-quick") is None, reason="wg-quick not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="wg-quick re-executes itself through sudo")
def test_wg_quick_strip_accepts_the_bundled_profile(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    make_device(state)
    with bundle(state, tmp_path / "b.zip") as zf:
        zf.extractall(tmp_path / "out")
    path = tmp_path / "out" / CONFIG_NAME
    path.chmod(0o600)
    result = subprocess.run(
        ["wg-quick", "strip", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"PrivateKey = {files.private_key(state)}" in result.stdout
    assert "Endpoint = 192.0.2.1:51820" in result.stdout
    assert "Address" not in result.stdout and "DNS" not in result.stdout  # wg-quick's own keys


def test_bundle_refuses_a_file_that_is_no_diagnostics_export(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    make_device(state)
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": 1}')
    out = tmp_path / "b.zip"
    result = CliRunner().invoke(cli, ["device", "bundle", "--state-dir", str(state),
                                      "--out", str(out), "--diagnostics", str(bad)])  # fmt: skip
    assert result.exit_code == 2
    assert "invalid_argument" in result.output and "not a diagnostics export" in result.output
    assert not out.exists()


def test_bundle_without_enrollment_is_a_clean_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["device", "bundle", "--state-dir", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "state_missing" in result.output
    assert "Traceback" not in result.output


async def test_failover_keeps_the_catalog_it_accepted(
    server: Server, nc: object, tmp_path: Path
) -> None:
    from damm.protocol.bus import connect

    state = tmp_path / "dev"
    make_device(state)
    server.signed = signed_catalog(version=2, now=int(time.time()) - 5)
    assert files.load_catalog(state) is None
    stale = signed_catalog(version=3, now=int(time.time()) - 10_000)
    server.signed, accepted = stale, server.signed
    client = await connect(nc.connected_url.geturl())  # type: ignore[attr-defined]
    try:
        with pytest.raises(DammError):
            await failover(client, state)
        assert files.load_catalog(state) is None  # a refused catalog is not kept either
        server.signed = accepted
        await failover(client, state)
    finally:
        await client.close()
    assert files.load_catalog(state) == accepted
    assert read_contents(state).catalog == accepted


@needs_chromium
async def test_unzipped_bundle_opens_from_disk_showing_the_device(
    browser: Browser, tmp_path: Path
) -> None:
    state = tmp_path / "dev"
    make_device(state)
    files.save_catalog(state, signed_catalog(version=1, now=int(time.time())))
    (state / files.PRIVATE_KEY).chmod(0o640)  # one failing check for the page to explain
    diag = tmp_path / "diag.json"
    export(await diagnose(state, probe_endpoint=False), diag)
    (state / files.PRIVATE_KEY).chmod(0o600)
    folder = tmp_path / "unzipped"
    with bundle(state, tmp_path / "bundle.zip", "--diagnostics", str(diag)) as zf:
        zf.extractall(folder)
        assert {CATALOG_NAME, DIAGNOSTICS_NAME} <= set(zf.namelist())
    config = (folder / CONFIG_NAME).read_bytes()
    assert config == (state / files.CONFIG).read_bytes()
    context, page, watch = await open_page(
        browser, (folder / "index.html").as_uri(), folder.as_uri() + "/"
    )
    try:
        # shown at once: no click, no file picker
        await expect(page.locator("[data-field=device-id]")).to_have_text("dev-1")
        assert await page.inner_text("[data-field=endpoint]") == "192.0.2.1:51820"
        assert await page.inner_text("[data-field=device-key]") == files.public_key(state)
        assert "the bundle of device dev-1" in await page.inner_text("#import-status")
        verdict = await page.inner_text("#catalog-verdict")
        assert verdict.startswith("Verified: version 1 for region eu"), verdict
        files_check = await page.inner_text("#checks li[data-check=files]")
        assert files_check.startswith("FAIL") and "0640" in files_check
        await page.click("#show-qr")
        png = await page.locator("#qr-canvas").screenshot()
        assert decode_qr(png) == config
        shot = artifact("bundle/index.png")
        await page.screenshot(path=str(shot), full_page=True)
        print(f"bundle page screenshot: {shot}")
        # the bundle's own SVG, drawn by the browser, decodes to the same bytes
        await page.goto((folder / QR_SVG_NAME).as_uri())
        assert decode_qr(await page.screenshot()) == config
    finally:
        await context.close()
    watch.assert_clean()
    info = json.loads((folder / INFO_NAME).read_text())
    assert info["device_id"] == "dev-1"


@pytest.mark.parametrize(
    ("address", "dns", "probe"),
    [
        ("10.44.0.10", ("10.44.0.1",), "10.44.0.1"),  # DAMM's default: the gateway is the DNS
        ("10.44.0.10", ("1.1.1.1",), "10.44.0.1"),  # DNS outside the tunnel: the first host
        ("10.44.3.7/16", ("9.9.9.9", "10.44.0.53"), "10.44.0.53"),
        ("10.44.0.10", (), "10.44.0.1"),
    ],
)
def test_the_readme_pings_what_the_page_pings(
    address: str, dns: tuple[str, ...], probe: str
) -> None:
    from damm.device.bundle import PublicInfo, probe_address

    info = PublicInfo(
        device_id="d", public_key="k", address=address, address6=None, gateway_id="g",
        gateway_public_key="k", front_door_id="f", endpoint="e:1", region=None, dns=dns,
    )  # fmt: skip
    assert probe_address(info) == probe
