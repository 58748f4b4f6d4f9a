"""Debian's Chromium under Playwright, with every request and console message recorded.

`Watch` routes every request through the test: a file:// request inside the page's own folder
(or an http request to the page's own loopback origin) is let through, anything else is aborted
and recorded, so "no network" is an assertion over what the browser actually tried.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Request, Route, async_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(
    os.environ.get("DAMM_TEST_ARTEFACTS", Path(__file__).parent.parent / "test-artefacts")
)

needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="chromium not installed at /usr/bin/chromium"
)


async def launch() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Watch:
    """What one page did: requests allowed, requests refused, console errors, page errors."""

    allowed_prefix: str
    requests: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def route(self, route: Route, request: Request) -> None:
        self.requests.append(request.url)
        if request.url.startswith(self.allowed_prefix) or request.url.startswith("blob:"):
            await route.continue_()
        else:
            self.refused.append(request.url)
            await route.abort()

    def on_request(self, request: Request) -> None:
        if request.url not in self.requests:
            self.requests.append(request.url)
            if not request.url.startswith((self.allowed_prefix, "blob:", "data:")):
                self.refused.append(request.url)

    def assert_clean(self) -> None:
        """Only the page's own files were requested and nothing was logged as an error."""
        assert self.refused == [], self.refused
        assert all(u.startswith((self.allowed_prefix, "blob:")) for u in self.requests), (
            self.requests
        )
        assert self.errors == [], self.errors


async def open_page(
    browser: Browser, url: str, allowed_prefix: str, *, width: int = 1280, height: int = 900
) -> tuple[BrowserContext, Page, Watch]:
    context = await browser.new_context(
        viewport={"width": width, "height": height}, accept_downloads=True
    )
    watch = Watch(allowed_prefix)
    await context.route("**/*", watch.route)
    context.set_default_timeout(10_000)
    page = await context.new_page()
    page.on("console", lambda m: watch.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: watch.errors.append(str(exc)))
    page.on("request", watch.on_request)
    await page.goto(url)
    await page.wait_for_selector("body[data-ready=true]", state="attached")
    return context, page, watch


def decode_qr(png: bytes) -> bytes:
    """The bytes the one QR code in a PNG carries (zxing-cpp, the library phone apps use).

    zxing-cpp may report one symbol twice (it also scans a downscaled copy of the image), so
    what must be unique is the payload: two different codes in one picture still fail.
    """
    import zxingcpp
    from PIL import Image

    results = zxingcpp.read_barcodes(
        Image.open(io.BytesIO(png)), formats=zxingcpp.BarcodeFormat.QRCode
    )
    payloads = {r.bytes for r in results}
    assert len(payloads) == 1, (
        f"{len(payloads)} QR codes found: {[str(r.position) for r in results]}"
    )
    return payloads.pop()


def artifact(name: str) -> Path:
    path = ARTIFACTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
