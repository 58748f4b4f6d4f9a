"""`damm device companion`: the real command, fetched over loopback and opened in Chromium."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from playwright.async_api import Browser, expect

from damm.cli.main import cli
from damm.device import files
from damm.device.diagnose import diagnose, export
from damm.device.wgconfig import replace_endpoint
from tests.browser import launch, needs_chromium, open_page
from tests.test_failover import make_device

DAMM = str(Path(sys.executable).parent / "damm")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async for b in launch():
        yield b


def get(url: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def start(state: Path, *args: str, env: dict[str, str] | None = None) -> tuple[
    asyncio.subprocess.Process, str
]:  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        DAMM, "device", "companion", "--state-dir", str(state), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    assert line.startswith("companion: http://127.0.0.1:"), line
    return proc, line.split()[1]


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGINT)
    return await asyncio.wait_for(proc.wait(), 10)


@needs_chromium
async def test_companion_serves_the_device_on_loopback_until_ctrl_c(
    browser: Browser, tmp_path: Path
) -> None:
    state = tmp_path / "dev"
    make_device(state)
    diag = tmp_path / "diag.json"
    export(await diagnose(state, probe_endpoint=False), diag)
    proc, url = await start(state, "--diagnostics", str(diag))
    try:
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1" and parts.port and parts.port > 0
        status, headers, body = await asyncio.to_thread(get, url)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"
        assert b'<script src="preload.js"></script>' in body
        status, _, preload = await asyncio.to_thread(get, url + "preload.js")
        assert status == 200 and b'"device_id":"dev-1"' in preload
        assert b'"checks":[{"name":"files","status":"pass"' in preload
        assert files.private_key(state).encode() in preload  # the page needs the profile
        # only under the per-run token, and only for its own Host
        root = f"http://127.0.0.1:{parts.port}/"
        assert (await asyncio.to_thread(get, root + "index.html"))[0] == 404
        assert (await asyncio.to_thread(get, root + "x" + parts.path[1:] + "index.html"))[0] == 404
        assert (await asyncio.to_thread(get, url, "evil.example:80"))[0] == 403
        assert (await asyncio.to_thread(get, url + "../../etc/passwd"))[0] == 404
        # read afresh on every load: a failover's new endpoint shows on reload
        config = state / files.CONFIG
        config.write_text(replace_endpoint(config.read_text(), "198.51.100.9:51820"))
        assert b"198.51.100.9:51820" in (await asyncio.to_thread(get, url + "preload.js"))[2]

        context, page, watch = await open_page(browser, url, url)
        try:
            await expect(page.locator("[data-field=device-id]")).to_have_text("dev-1")
            assert await page.inner_text("[data-field=endpoint]") == "198.51.100.9:51820"
            assert await page.locator("#checks li[data-check=files]").count() == 1
            await page.click("#show-qr")
            async with page.expect_download() as info:
                await page.click("#download-profile")
            download = await info.value
            assert download.suggested_filename == "damm-wg0.conf"
            assert (await download.path()).read_bytes() == config.read_bytes()
        finally:
            await context.close()
        watch.assert_clean()
        assert {u.removeprefix(url) for u in watch.requests} >= {"", "preload.js", "app.js"}
    finally:
        code = await stop(proc)
    assert code == 0
    assert proc.stderr is not None
    assert b"Traceback" not in await proc.stderr.read()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(urllib.request.urlopen, url, None, 2)


async def test_open_hands_the_url_to_the_browser(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    make_device(state)
    seen = tmp_path / "opened.txt"
    opener = tmp_path / "opener"
    opener.write_text(f'#!/bin/sh\nprintf %s "$1" > {seen}\n')
    opener.chmod(0o755)
    proc, url = await start(state, "--open", env={"BROWSER": str(opener)})
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not (seen.exists() and seen.read_text()):
            assert asyncio.get_running_loop().time() < deadline, "the browser was never opened"
            await asyncio.sleep(0.05)
        assert seen.read_text() == url
    finally:
        assert await stop(proc) == 0


def test_companion_without_enrollment_is_a_clean_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["device", "companion", "--state-dir", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "state_missing" in result.output and "Traceback" not in result.output


def test_a_port_in_use_is_a_clean_error(tmp_path: Path) -> None:
    import socket

    state = tmp_path / "dev"
    make_device(state)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            cli, ["device", "companion", "--state-dir", str(state), "--port", str(port)]
        )
    assert result.exit_code == 2
    assert f"invalid_argument: an argument is invalid: cannot listen on port {port}" in (
        result.output
    )
