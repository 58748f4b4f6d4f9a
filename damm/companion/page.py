"""The companion page's files, and the `preload.js` that shows one device at once.

A page opened from disk cannot read the files next to it (file:// fetches are blocked, and its
Content-Security-Policy forbids connections anyway), so a device's profile reaches it as a
script: `preload.js` sets one global that `app.js` reads. The bundle writes it next to the page;
`damm device companion` serves it. The page shipped in the package has no preload at all.
"""

from __future__ import annotations

import base64
from importlib import resources
from typing import Any

import msgspec

PRELOAD_MARKER = "<!-- damm:preload -->"
PRELOAD_NAME = "preload.js"
PRELOAD_TAG = f'<script src="{PRELOAD_NAME}"></script>'


class Preload(msgspec.Struct, frozen=True, kw_only=True):
    """What the page shows on opening. Only `config` holds a secret (its PrivateKey line)."""

    name: str
    source: str
    config: str
    device: dict[str, Any] | None = None
    catalog: bytes | None = None
    diagnostics: dict[str, Any] | None = None


def static_files() -> dict[str, bytes]:
    """Every file of the page (relative path -> bytes), index.html without a preload."""
    root = resources.files("damm.companion").joinpath("static")
    out: dict[str, bytes] = {}

    def walk(node: Any, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif not child.name.startswith("."):
                out[f"{prefix}{child.name}"] = child.read_bytes()

    walk(root, "")
    return out


def index_html(*, preload: bool) -> bytes:
    text = resources.files("damm.companion").joinpath("static/index.html").read_text("utf-8")
    if PRELOAD_MARKER not in text:  # pragma: no cover - guarded by the tests
        raise RuntimeError("index.html lost its preload marker")
    return text.replace(PRELOAD_MARKER, PRELOAD_TAG if preload else "").encode()


def preload_js(data: Preload) -> bytes:
    """A script assigning the preload as JSON (JSON is valid JavaScript; the catalog travels as
    base64 because JSON has no bytes)."""
    body = {
        "name": data.name,
        "source": data.source,
        "config": data.config,
        "device": data.device,
        "catalog": base64.b64encode(data.catalog).decode() if data.catalog is not None else None,
        "diagnostics": data.diagnostics,
    }
    return b"window.DAMM_PRELOAD = " + msgspec.json.encode(body) + b";\n"


def page_files(data: Preload | None) -> dict[str, bytes]:
    """The page as a set of files, preloaded with `data` when given."""
    files = static_files()
    files["index.html"] = index_html(preload=data is not None)
    if data is not None:
        files[PRELOAD_NAME] = preload_js(data)
    return files
