"""The companion page in Debian's Chromium: what it shows, what it keeps, what it refuses.

Every page test ends with `watch.assert_clean()`: the page asked only for its own files and the
console logged no error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from playwright.async_api import Browser, BrowserContext, Page, expect

from damm.catalog.document import SignedCatalog, decode_signed, encode_signed
from damm.catalog.signing import CatalogSigner, signing_message
from damm.catalog.verify import initial_trust
from damm.companion.page import PRELOAD_MARKER, PRELOAD_NAME, Preload, page_files
from damm.device import files
from damm.device.diagnose import diagnose, export
from damm.device.failover import CLOCK_SKEW_S, verify_for_device
from damm.errors import DammError
from tests.browser import Watch, artifact, decode_qr, launch, needs_chromium, open_page
from tests.test_failover import KEY1, KEY2, NOW, make_device, signed_catalog

pytestmark = needs_chromium

WHAT_IT_IS = "It is not a VPN and cannot connect"
EXPIRES = "2027-03-01T00:00:00+00:00"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async for b in launch():
        yield b


def device(state: Path) -> Path:
    make_device(state)
    dev = files.load(state)
    dev.key_expires_at = EXPIRES
    dev.address6 = None
    files.save(state, dev)
    return state


def write_page(folder: Path, preload: Preload | None) -> Path:
    for name, data in page_files(preload).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder / "index.html"


def preload_for(state: Path, catalog: bytes | None = None) -> Preload:
    return Preload(
        name="damm-wg0",
        source="a test device",
        config=(state / files.CONFIG).read_text(),
        device=msgspec.json.decode((state / files.STATE).read_bytes()),
        catalog=catalog,
    )


def fingerprint(key_b64: str) -> str:
    digest = hashlib.sha256(base64.b64decode(key_b64)).hexdigest()[:16]
    return " ".join(digest[i : i + 4] for i in range(0, 16, 4))


async def open_folder(
    browser: Browser, folder: Path, **size: int
) -> tuple[BrowserContext, Page, Watch]:
    return await open_page(browser, (folder / "index.html").as_uri(), folder.as_uri() + "/", **size)


async def fields(page: Page) -> dict[str, str]:
    out: dict[str, str] = await page.eval_on_selector_all(
        "#fields dd",
        "els => Object.fromEntries(els.map(e => [e.dataset.field, e.innerText.trim()]))",
    )
    return out


async def load_files(page: Page, *paths: Path) -> None:
    await page.set_input_files("#file-input", [str(p) for p in paths])


def now() -> int:
    return int(time.time())


async def test_import_profile_shows_every_field(browser: Browser, tmp_path: Path) -> None:
    state = device(tmp_path / "dev")
    write_page(tmp_path / "page", None)
    context, page, watch = await open_folder(browser, tmp_path / "page")
    try:
        assert await page.locator("#profile").is_hidden()
        await load_files(page, state / files.CONFIG, state / files.STATE)
        await page.wait_for_selector("#profile:not([hidden])")
        got = await fields(page)
        dev = files.load(state)
        assert dev.trust is not None
        assert got["device-id"] == "dev-1"
        assert got["address"] == "10.44.0.10/32"
        assert got["dns"] == "10.44.0.1"
        assert got["gateway"] == "gw1 (front door fd1)"
        assert got["endpoint"] == "192.0.2.1:51820"
        assert got["allowed-ips"] == "0.0.0.0/0"
        assert got["tunnel-mode"].startswith("full tunnel for IPv4")
        assert got["device-key"] == files.public_key(state)  # derived in the page (X25519)
        assert got["device-fingerprint"] == fingerprint(files.public_key(state))
        assert got["gateway-key"] == dev.gateway_public_key
        assert got["gateway-fingerprint"] == fingerprint(dev.gateway_public_key)
        assert got["catalog-keys"] == f"{KEY1.key_id} = {KEY1.public_key_b64}"
        assert got["catalog-version"] == "accepts version 0 or newer"
        assert got["catalog-region"] == "eu"
        assert got["key-expiry"].startswith("2027-03-01T00:00:00Z (in ")
        got_first = got
        # the private key stays hidden until asked for
        private = files.private_key(state)
        assert private not in await page.inner_text("body")
        await page.click("#reveal-key")
        assert await page.inner_text("#private-key") == private
        await page.click("#reveal-key")
        assert private not in await page.inner_text("body")
        # no device.json: the page says what it cannot know instead of guessing
        split = tmp_path / "split.conf"
        split.write_text(
            (state / files.CONFIG).read_text().replace("0.0.0.0/0", "10.0.0.0/8, 192.168.0.0/16")
        )
        await load_files(page, split)
        await expect(page.locator("[data-field=device-id]")).to_contain_text("no device.json")
        got = await fields(page)
        assert got["tunnel-mode"].startswith("split tunnel")
        assert got["allowed-ips"].splitlines() == ["10.0.0.0/8", "192.168.0.0/16"]
        assert got["catalog-keys"] == "none pinned"
        assert "Load device.json" in await page.inner_text("#profile-warnings")
        # drag and drop takes the same files as the picker
        transfer = await page.evaluate_handle(
            """(items) => {
                const dt = new DataTransfer();
                for (const [name, text] of items) dt.items.add(new File([text], name));
                return dt;
            }""",
            [[p.name, p.read_text()] for p in (state / files.CONFIG, state / files.STATE)],
        )
        await page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
        await expect(page.locator("[data-field=device-id]")).to_have_text("dev-1")
        assert await fields(page) == got_first
    finally:
        await context.close()
    watch.assert_clean()


async def test_qr_code_decodes_to_the_profile_byte_for_byte(
    browser: Browser, tmp_path: Path
) -> None:
    state = device(tmp_path / "dev")
    write_page(tmp_path / "page", preload_for(state))
    context, page, watch = await open_folder(browser, tmp_path / "page")
    try:
        assert "private key" in await page.inner_text("#qr .warning")
        assert await page.locator("#qr-canvas").is_hidden()
        await page.click("#show-qr")
        png = await page.locator("#qr-canvas").screenshot()
        artifact("companion/qr.png").write_bytes(png)
        assert decode_qr(png) == (state / files.CONFIG).read_bytes()
    finally:
        await context.close()
    watch.assert_clean()


async def test_a_stored_copy_survives_a_reload(browser: Browser, tmp_path: Path) -> None:
    state = device(tmp_path / "dev")
    write_page(tmp_path / "page", None)
    context, page, watch = await open_folder(browser, tmp_path / "page")
    try:
        await load_files(page, state / files.CONFIG, state / files.STATE)
        await page.click("#save-copy")
        await page.wait_for_selector("#copy-list li[data-copy=wg0]")
        await page.reload()
        await page.wait_for_selector("body[data-ready=true]", state="attached")
        assert await page.locator("#profile").is_hidden()  # a fresh page, nothing loaded
        item = page.locator("#copy-list li[data-copy=wg0]")
        assert await item.count() == 1
        await item.locator("input").fill("laptop")
        await item.get_by_role("button", name="Rename").click()
        item = page.locator("#copy-list li[data-copy=laptop]")
        await item.wait_for()
        await item.get_by_role("button", name="Open").click()
        await page.wait_for_selector("#profile:not([hidden])")
        assert (await fields(page))["device-id"] == "dev-1"  # device.json was kept too
        async with page.expect_download() as info:
            await item.get_by_role("button", name="Export").click()
        download = await info.value
        assert download.suggested_filename == "laptop.conf"
        exported = await download.path()
        assert exported.read_bytes() == (state / files.CONFIG).read_bytes()
        await item.get_by_role("button", name="Delete").click()
        await page.wait_for_selector("#copy-list li", state="detached")
        await page.reload()
        await page.wait_for_selector("body[data-ready=true]", state="attached")
        assert await page.locator("#copy-list li").count() == 0
    finally:
        await context.close()
    watch.assert_clean()


async def test_support_export_holds_no_private_key(browser: Browser, tmp_path: Path) -> None:
    state = device(tmp_path / "dev")
    report = await diagnose(state, probe_endpoint=False)  # real checks; no NATS, so catalog skips
    diag = tmp_path / "diagnostics.json"
    export(report, diag)
    private = files.private_key(state)
    write_page(tmp_path / "page", None)
    context, page, watch = await open_folder(browser, tmp_path / "page")
    try:
        await load_files(page, state / files.CONFIG, state / files.STATE, diag)
        await page.wait_for_selector("#checks li[data-check=files]")
        for check in report.checks:
            text = await page.inner_text(f"#checks li[data-check={check.name}]")
            assert text.startswith(check.status.upper()) and check.reason in text
        async with page.expect_download() as info:
            await page.click("#export-support")
        download = await info.value
        text = (await download.path()).read_text()
        artifact("companion/support.json").write_text(text)
        raw = base64.b64decode(private)
        for form in (
            private,
            private.rstrip("="),
            raw.hex(),
            base64.urlsafe_b64encode(raw).decode(),
        ):
            assert form not in text
        data = json.loads(text)
        assert data["device"]["device_id"] == "dev-1"
        assert data["profile"]["device_public_key"] == files.public_key(state)
        assert [c["name"] for c in data["diagnostics"]["checks"]] == [c.name for c in report.checks]
        # another device's profile starts clean: its support file carries none of the above
        other = device(tmp_path / "other")
        await load_files(page, other / files.CONFIG)
        await expect(page.locator("#checks li")).to_have_count(0)
        async with page.expect_download() as info:
            await page.click("#export-support")
        data = json.loads((await (await info.value).path()).read_text())
        assert set(data) == {"kind", "written_at", "note", "profile"}
        assert data["profile"]["device_public_key"] == files.public_key(other)
    finally:
        await context.close()
    watch.assert_clean()


async def test_a_failed_check_says_what_to_do(browser: Browser, tmp_path: Path) -> None:
    state = device(tmp_path / "dev")
    (state / files.PRIVATE_KEY).chmod(0o644)
    report = await diagnose(state, probe_endpoint=False)
    diag = tmp_path / "diag.json"
    export(report, diag)
    write_page(tmp_path / "page", None)
    context, page, watch = await open_folder(browser, tmp_path / "page")
    try:
        await page.set_input_files("#diagnostics-input", str(diag))
        li = page.locator("#checks li[data-check=files]")
        await li.wait_for()
        text = await li.inner_text()
        assert text.startswith("FAIL") and "private.key has mode 0644" in text
        assert "What to do: Run: chmod 700" in text
        assert "1 check failed" in await page.inner_text("#diagnostics-summary")
        # a JSON file that is no export is refused with a reason, not shown half
        wrong = tmp_path / "wrong.json"
        wrong.write_text('{"checks": [{"name": "x", "status": "maybe", "reason": ""}], "ok": true}')
        await page.set_input_files("#diagnostics-input", str(wrong))
        await page.wait_for_selector("#import-error:not([hidden])")
        assert "check 1 is not" in await page.inner_text("#import-error")
    finally:
        await context.close()
    watch.assert_clean()


# (line number, its new text or None to insert before, what the page must say)
MALFORMED: list[tuple[int, str, bool, str]] = [
    (2, "PrivateKey = not-a-key", True, "line 2: PrivateKey is not a base64"),
    (3, "Adress = 10.44.0.10/32", True, "line 3: unknown key \u201cAdress\u201d in [Interface]"),
    (3, "Address = 10.44.0.300/32", True, "line 3: Address \u201c10.44.0.300/32\u201d is not"),
    (8, "Endpoint = 192.0.2.1", True, "line 8: Endpoint \u201c192.0.2.1\u201d is not host:port"),
    (7, "PublicKey", True, "line 7: expected \u201cKey = value\u201d"),
    (1, "[Interfaces]", True, "line 1: unknown section [Interfaces]"),
    (12, "[Peer]\nEndpoint = 192.0.2.9:1", False, "line 12: [Peer] has no PublicKey"),
    (4, "DNS = 10.44.0.1; rm -rf /", True, "line 4: DNS entry \u201c10.44.0.1; rm -rf /\u201d"),
    (1, "Address = 10.44.0.10/32", False, "line 1: Address appears before any"),
]


def edited(lines: list[str], number: int, text: str, replace: bool) -> str:
    out = list(lines)
    out[number - 1 : number - 1 + replace] = text.splitlines()
    return "\n".join(out) + "\n"


async def test_a_malformed_profile_names_its_line(browser: Browser, tmp_path: Path) -> None:
    state = device(tmp_path / "dev")
    lines = (state / files.CONFIG).read_text().splitlines()
    assert lines[1].startswith("PrivateKey") and lines[7].startswith("Endpoint")
    assert lines[6].startswith("PublicKey") and len(lines) == 11
    write_page(tmp_path / "page", preload_for(state))
    context, page, watch = await open_folder(browser, tmp_path / "page")
    try:
        for i, (number, text, replace, message) in enumerate(MALFORMED):
            bad = tmp_path / f"bad{i}.conf"
            bad.write_text(edited(lines, number, text, replace))
            await page.set_input_files("#file-input", str(bad))
            await expect(page.locator("#import-error")).to_contain_text(f"bad{i}.conf, ")
            shown = await page.inner_text("#import-error")
            assert shown.startswith(f"bad{i}.conf, {message}"), shown
            # the profile that was showing is still there: a bad file replaces nothing
            assert (await fields(page))["device-id"] == "dev-1"
        binary = tmp_path / "photo.jpg"
        binary.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)))
        await page.set_input_files("#file-input", str(binary))
        await expect(page.locator("#import-error")).to_contain_text("photo.jpg is none of")
        # bytes that claim to be a catalog are judged as one, and refused with the reason
        packed = tmp_path / "catalog.signed"
        packed.write_bytes(b"\x83\xa7payload")
        await page.set_input_files("#file-input", str(packed))
        await expect(page.locator("#catalog-verdict")).to_contain_text("Refused")
        assert "malformed_request" in await page.inner_text("#catalog-verdict")
        assert "truncated" in await page.inner_text("#catalog-verdict")
        assert (await fields(page))["device-id"] == "dev-1"
    finally:
        await context.close()
    watch.assert_clean()


def tampered_payload(signed: bytes) -> bytes:
    env = decode_signed(signed)
    payload = bytearray(env.payload)
    payload[-1] ^= 0x01
    return encode_signed(SignedCatalog(bytes(payload), env.key_id, env.signature))


ADVICE = {  # the plain-words meaning the page adds to each refusal
    "catalog_bad_signature": "changed after it was signed",
    "catalog_unknown_key": "never pinned",
    "catalog_stale": "past its expiry",
    "catalog_wrong_region": "another region",
    "catalog_rollback": "replaying an old catalog",
}
CATALOG_CASES = [
    ("tampered", lambda: tampered_payload(signed_catalog(now=now())), "catalog_bad_signature"),
    ("other-key", lambda: signed_catalog(signer=KEY2, now=now()), "catalog_unknown_key"),
    ("expired", lambda: signed_catalog(now=now() - 7200, ttl=3600), "catalog_stale"),
    ("future", lambda: signed_catalog(now=now() + 3600), "catalog_stale"),
    ("wrong-region", lambda: signed_catalog(now=now(), region="us"), "catalog_wrong_region"),
    ("rollback", lambda: signed_catalog(now=now(), version=4), "catalog_rollback"),
]


async def test_a_tampered_catalog_is_refused_with_its_reason(
    browser: Browser, tmp_path: Path
) -> None:
    state = device(tmp_path / "dev")
    dev = files.load(state)
    assert dev.trust is not None
    dev.trust = msgspec.structs.replace(dev.trust, min_version=5)
    files.save(state, dev)
    good = signed_catalog(now=now(), version=7)
    write_page(tmp_path / "page", preload_for(state, good))
    context, page, watch = await open_folder(browser, tmp_path / "page")
    try:
        verdict = await page.inner_text("#catalog-verdict")
        assert verdict.startswith("Verified: version 7 for region eu"), verdict
        doors = await page.inner_text("#catalog-doors")
        assert "fd1: 192.0.2.1:51820 udp, priority 10 (current)" in doors
        for name, make, code in CATALOG_CASES:
            signed = make()
            with pytest.raises(DammError) as err:  # the CLI refuses it the same way
                verify_for_device(signed, dev.trust, now=now())
            assert err.value.code.slug == code
            path = tmp_path / f"{name}.signed"
            path.write_bytes(signed)
            await page.set_input_files("#catalog-input", str(path))
            await expect(page.locator("#catalog-verdict")).to_contain_text(code)
            shown = await page.inner_text("#catalog-verdict")
            assert shown.startswith(f"Refused: {code}: {err.value.code.message}: "), shown
            assert err.value.detail.split(",")[0].split(" (")[0] in shown
            assert ADVICE[code] in await page.inner_text("#catalog-doors .advice")
        # without device.json there is no pinned key to check against, and the page says so
        await page.set_input_files("#file-input", [str(state / files.CONFIG), str(path)])
        await expect(page.locator("#catalog-verdict")).to_contain_text("state_missing")
        assert "load device.json with the catalog" in await page.inner_text("#catalog-verdict")
    finally:
        await context.close()
    watch.assert_clean()


def mutants(signed: bytes, count: int, seed: int) -> list[bytes]:
    """Byte flips, truncations and extensions of a signed catalog (seeded, so reproducible)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(signed)
        kind = rng.random()
        if kind < 0.7:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind < 0.85:
            del data[rng.randrange(len(data)) :]
        else:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        out.append(bytes(data))
    return out


def signed_raw(payload: bytes, signer: CatalogSigner = KEY1) -> bytes:
    """Sign any bytes as a catalog payload: the page must refuse what the decoder refuses."""
    sig = signer._key.sign(signing_message(payload)).signature
    return encode_signed(SignedCatalog(payload, signer.key_id, sig))


def catalog_payload(t: int, **fields: Any) -> bytes:
    base: dict[str, Any] = {"region": "eu", "version": 3, "issued_at": t, "expires_at": t + 60}
    base.update(fields)
    return msgspec.msgpack.encode({k: v for k, v in base.items() if v is not None})


def edge_cases(t: int) -> list[bytes]:
    gw = {"id": "gw1", "region": "eu", "public_key": base64.b64encode(bytes(32)).decode()}
    fd = {"id": "f", "endpoint": "a:1"}
    ann = KEY2.announcement()
    cases = [
        catalog_payload(
            t,
        ),
        catalog_payload(t, version=2**64 - 1, expires_at=2**64 - 1),
        catalog_payload(t, version=1.0),
        catalog_payload(t, version=True),
        catalog_payload(t, version=-1),
        catalog_payload(t, region=""),
        catalog_payload(t, region="\u00e9" * 128),
        catalog_payload(t, region="\u00e9" * 129),
        catalog_payload(t, region=b"eu"),
        catalog_payload(t, extra=1),
        catalog_payload(t, gateways=None),
        catalog_payload(t, gateways=[gw, gw]),
        catalog_payload(t, gateways=[{**gw, "x": 1}]),
        catalog_payload(t, gateways=[{**gw, "egress_countries": ["\u00e91"]}]),
        catalog_payload(t, gateways=[{**gw, "front_doors": [{"id": "f", "endpoint": "ab"}]}]),
        catalog_payload(t, gateways=[{**gw, "front_doors": [{**fd, "priority": 65536}]}]),
        catalog_payload(t, gateways=[{**gw, "front_doors": [{**fd, "priority": 65535}]}]),
        catalog_payload(t, gateways=[{**gw, "front_doors": [{**fd, "transport": ""}]}]),
        catalog_payload(t, issued_at=t + 10, expires_at=t),
        catalog_payload(t, issued_at=t - 100, expires_at=t - 61),
        catalog_payload(t, issued_at=t - 100, expires_at=t - 59),
        catalog_payload(t, issued_at=t + 59, expires_at=t + 100),
        catalog_payload(t, issued_at=t + 61, expires_at=t + 100),
        catalog_payload(t, version=4),
        catalog_payload(t, version=5),
        catalog_payload(t, next_keys=[msgspec.to_builtins(ann)]),
        catalog_payload(t, next_keys=[{**msgspec.to_builtins(ann), "key_id": KEY1.key_id}]),
        catalog_payload(t, next_keys=[{**msgspec.to_builtins(ann), "key_id": KEY2.key_id + "\n"}]),
        catalog_payload(
            t,
        )
        + b"\x00",
        msgspec.msgpack.encode([1, 2]),
        b"\x84\xa6region\xa2\xff\xfe\xa7version\x01\xa9issued_at\x01\xaaexpires_at\x02",
        b"\x85\xa6region\xa2eu\xa7version\xcb"
        + bytes(8)
        + b"\xa7version\x05\xa9issued_at\x01\xaaexpires_at\x02",
        b"\x85\xa6region\xa2eu\xa7version\x05\xa7version\x06\xa9issued_at"
        + msgspec.msgpack.encode(t)
        + b"\xaaexpires_at"
        + msgspec.msgpack.encode(t + 9),
    ]
    out = [signed_raw(p) for p in cases]
    env = {
        "payload": catalog_payload(
            t,
        ),
        "key_id": KEY1.key_id,
        "signature": bytes(64),
    }
    out += [
        msgspec.msgpack.encode({**env, "extra": {"nested": [1, msgspec.msgpack.Ext(1, b"a")]}}),
        msgspec.msgpack.encode({**env, "payload": "text"}),
        msgspec.msgpack.encode({**env, "signature": bytes(63)}),
        msgspec.msgpack.encode({**env, "key_id": KEY1.key_id + "\n"}),
        msgspec.msgpack.encode({**env, "key_id": KEY1.key_id.upper()}),
        msgspec.msgpack.encode({k: v for k, v in env.items() if k != "key_id"}),
        b"",
        b"\xc1",
    ]
    return out


async def page_verdicts(page: Page, corpus: list[bytes], trust: Any, at: int) -> list[str]:
    """The page's verdict on each signed catalog, in one round trip to the browser."""
    verdicts: list[str] = await page.evaluate(
        """async ([corpus, trust, at]) => {
            const out = [];
            for (const b64 of corpus) {
                const r = await Damm.verifyCatalog(Damm.b64bytes(b64) || new Uint8Array(0),
                                                   trust, at);
                out.push(r.ok ? "ok" : r.code);
            }
            return out;
        }""",
        [[base64.b64encode(c).decode() for c in corpus], msgspec.to_builtins(trust), at],
    )
    return verdicts


def python_verdict(signed: bytes, trust: Any, at: int) -> str:
    try:
        verify_for_device(signed, trust, now=at, skew_seconds=CLOCK_SKEW_S)
    except DammError as exc:
        return exc.code.slug
    return "ok"


async def test_the_page_refuses_exactly_what_the_cli_refuses(
    browser: Browser, tmp_path: Path
) -> None:
    """Differential: the same bytes through damm.catalog.verify and through the page's check."""
    state = device(tmp_path / "dev")
    dev = files.load(state)
    assert dev.trust is not None
    trust = msgspec.structs.replace(dev.trust, min_version=4)
    at = now()
    good = signed_catalog(now=at, version=4, announce=(KEY2,))
    corpus = [good, *mutants(good, 400, seed=15), *edge_cases(at)]
    write_page(tmp_path / "page", None)
    context, page, watch = await open_folder(browser, tmp_path / "page")
    try:
        verdicts = await page_verdicts(page, corpus, trust, at)
    finally:
        await context.close()
    expected = [python_verdict(c, trust, at) for c in corpus]
    mismatches = [(i, corpus[i].hex(), expected[i], verdicts[i]) for i in range(len(corpus))
                  if expected[i] != verdicts[i]]  # fmt: skip
    assert mismatches == []
    assert expected[0] == "ok"
    kinds = set(expected)
    assert {"ok", "malformed_request", "catalog_bad_signature", "catalog_stale"} <= kinds
    assert {"catalog_rollback", "catalog_unknown_key"} <= kinds
    watch.assert_clean()


async def test_install_guides_for_each_platform(browser: Browser, tmp_path: Path) -> None:
    state = device(tmp_path / "dev")
    write_page(tmp_path / "page", preload_for(state))
    context, page, watch = await open_folder(browser, tmp_path / "page")
    try:
        selected = page.locator("#platform-tabs [aria-selected=true]")
        assert await selected.get_attribute("data-platform") == "linux"  # headless Linux
        labels = await page.locator("#platform-tabs button").all_inner_texts()
        assert labels == ["Windows", "macOS", "iOS", "Android", "Linux (wg-quick)",
                          "Linux (NetworkManager)"]  # fmt: skip
        for platform in ("windows", "macos", "ios", "android", "linux", "networkmanager"):
            await page.click(f"#platform-tabs [data-platform={platform}]")
            assert await selected.get_attribute("data-platform") == platform
            guide = await page.inner_text("#guide")
            assert "Check that it works" in guide
            assert guide.rstrip().endswith("ping 10.44.0.1"), guide
            assert "damm-wg0" in guide
        detected = await page.evaluate(
            """(navs) => navs.map((n) => Damm.detectPlatform(n))""",
            [
                {"platform": "Win32", "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64)"},
                {"platform": "MacIntel", "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X)"},
                {"platform": "iPhone", "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)"},
                {"platform": "Linux armv8l", "userAgent": "Mozilla/5.0 (Linux; Android 14)"},
                {"platform": "Linux x86_64", "userAgent": "Mozilla/5.0 (X11; Linux x86_64)"},
                {"userAgentData": {"platform": "Windows"}, "platform": ""},
            ],
        )
        assert detected == ["windows", "macos", "ios", "android", "linux", "windows"]
        await page.click("#platform-tabs [data-platform=networkmanager]")
        guide = await page.inner_text("#guide")
        assert "nmcli connection import type wireguard file damm-wg0.conf" in guide
    finally:
        await context.close()
    watch.assert_clean()


async def test_says_once_what_it_is_and_never_offers_to_connect(
    browser: Browser, tmp_path: Path
) -> None:
    state = device(tmp_path / "dev")
    write_page(tmp_path / "page", preload_for(state, signed_catalog(now=now())))
    context, page, watch = await open_folder(browser, tmp_path / "page")
    try:
        await page.click("#show-qr")
        body = await page.inner_text("body")
        assert body.count(WHAT_IT_IS) == 1
        assert body.count("not a VPN") == 1
        controls = await page.eval_on_selector_all(
            "button, a, input, [role=button], [role=tab]",
            "els => els.map(e => (e.innerText || e.value || e.getAttribute('aria-label') || ''))",
        )
        assert controls and not [c for c in controls if "connect" in c.lower()], controls
        for platform in ("windows", "macos", "ios", "android", "linux", "networkmanager"):
            await page.click(f"#platform-tabs [data-platform={platform}]")
            assert "connect" not in (await page.inner_text("#platform-tabs")).lower()
    finally:
        await context.close()
    watch.assert_clean()


async def test_no_horizontal_scrolling_at_360_pixels(browser: Browser, tmp_path: Path) -> None:
    state = device(tmp_path / "dev")
    report = await diagnose(state, probe_endpoint=False)
    diag = tmp_path / "diagnostics.json"
    export(report, diag)
    write_page(tmp_path / "page", preload_for(state, signed_catalog(now=now())))
    context, page, watch = await open_folder(browser, tmp_path / "page", width=360, height=740)
    try:
        await page.set_input_files("#diagnostics-input", str(diag))
        await page.wait_for_selector("#checks li")
        await page.click("#show-qr")
        await page.click("#reveal-key")
        await page.click("#save-copy")
        await page.wait_for_selector("#copy-list li")
        widths = await page.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.clientWidth,"
            " document.body.scrollWidth]"
        )
        shot = artifact("companion/page-360px.png")
        await page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot at 360 px: {shot}")
        assert widths[1] == 360 and widths[0] <= 360 and widths[2] <= 360, widths
        overflowing = await page.evaluate(
            "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right"
            " > 360.5).map(e => e.tagName + '#' + e.id)"
        )
        assert overflowing == []
    finally:
        await context.close()
    watch.assert_clean()


def test_the_packaged_page_has_no_preload_and_a_strict_policy() -> None:
    pages = page_files(None)
    index = pages["index.html"].decode()
    assert PRELOAD_NAME not in pages and PRELOAD_MARKER not in index and PRELOAD_NAME not in index
    assert "default-src 'none'" in index and "connect-src 'none'" in index
    assert (
        "<script>" not in index
        and "unsafe-inline" not in index
        and "http" not in index.split("<body>")[1].replace("http-equiv", "")
    )
    for name, data in pages.items():
        if name.endswith(".js") and not name.startswith("vendor/"):
            text = data.decode()
            for api in ("fetch(", "XMLHttpRequest", "WebSocket", "sendBeacon", "EventSource"):
                assert api not in text, (name, api)
    assert {"vendor/qrcode.js", "vendor/README.md", "vendor/LICENSE-qrcode-generator.txt"} <= set(
        pages
    )


AT = NOW
KEY_B64 = st.sampled_from(
    [KEY2.public_key_b64, base64.b64encode(bytes(32)).decode(), "A" * 44, "short", "A" * 43 + "="]
)
IDENT = st.sampled_from(["gw1", "gw2", "eu", "us", "", "\u00e9" * 128, "x" * 129])
VALID_INT = st.integers(0, 9)
INTS = st.one_of(
    VALID_INT, VALID_INT, VALID_INT, st.integers(-2, 2**64 - 1), st.floats(), st.booleans()
)
OFFSET = st.sampled_from([-7200, -61, -60, -59, 0, 59, 60, 61, 3600])
FRONT_DOOR = st.fixed_dictionaries(
    {"id": IDENT, "endpoint": st.sampled_from(["192.0.2.1:51820", "192.0.2.2:51820", "ab"])},
    optional={"transport": st.sampled_from(["udp", "", "x" * 17]), "priority": INTS},
)
GATEWAY = st.fixed_dictionaries(
    {"id": st.sampled_from(["gw1", "gw2"]), "region": IDENT, "public_key": KEY_B64},
    optional={
        "front_doors": st.lists(FRONT_DOOR, max_size=3),
        "egress_countries": st.lists(st.sampled_from(["DE", "NL", "D", "DEU", "\u00e91"])),
        "surprise": st.integers(-(2**63), 2**64 - 1),
    },
)
ANNOUNCEMENT = st.one_of(
    st.just(msgspec.to_builtins(KEY2.announcement())),
    st.fixed_dictionaries(
        {
            "key_id": st.sampled_from([KEY1.key_id, KEY2.key_id, KEY2.key_id + "\n", "xyz"]),
            "public_key": KEY_B64,
        },
        optional={"not_before": INTS},
    ),
)
PAYLOAD = st.fixed_dictionaries(
    {
        "region": st.sampled_from(["eu", "eu", "eu", "us", "", "e" * 129]),
        "version": INTS,
        "issued_at": OFFSET.map(lambda o: AT + o),
        "expires_at": OFFSET.map(lambda o: AT + o),
    },
    optional={
        "gateways": st.lists(GATEWAY, max_size=3),
        "next_keys": st.lists(ANNOUNCEMENT, max_size=2),
        "surprise": st.text(max_size=3),
    },
)


@st.composite
def signed_cases(draw: st.DrawFn) -> bytes:
    payload = dict(draw(PAYLOAD))
    dropped = draw(st.sampled_from([None, None, None, "region", "version", "expires_at"]))
    if dropped is not None:
        del payload[dropped]
    signed = signed_raw(msgspec.msgpack.encode(payload), draw(st.sampled_from([KEY1, KEY1, KEY2])))
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of them tampered
        data = bytearray(signed)
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        signed = bytes(data)
    return signed


@pytest.fixture(scope="module")
async def verifier(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Page]:
    folder = tmp_path_factory.mktemp("verifier")
    write_page(folder, None)
    context, page, watch = await open_folder(browser, folder)
    yield page
    await context.close()
    watch.assert_clean()


@settings(max_examples=30, deadline=None)
@given(corpus=st.lists(signed_cases(), min_size=10, max_size=10), min_version=st.integers(0, 6))
async def test_generated_catalogs_get_the_same_verdict_in_the_page(
    verifier: Page, corpus: list[bytes], min_version: int
) -> None:
    """Structured catalogs (types, ranges, lengths, duplicates, announcements, times around the
    skew, wrong keys, bit flips), each judged by damm.catalog.verify and by the page."""
    trust = initial_trust("eu", KEY1.key_id, KEY1.public_key_b64, min_version)
    verdicts = await page_verdicts(verifier, corpus, trust, AT)
    expected = [python_verdict(c, trust, AT) for c in corpus]
    for verdict in expected:
        event(verdict)  # --hypothesis-show-statistics shows how the verdicts spread
    mismatched = [c.hex() for c, v, e in zip(corpus, verdicts, expected, strict=True) if v != e]
    assert verdicts == expected, mismatched


WG_KEY = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())
V4 = st.ip_addresses(v=4).map(str)
V6 = st.ip_addresses(v=6).map(str)
HOSTNAME = st.from_regex(r"\A[a-z0-9](?:[a-z0-9.-]{0,20}[a-z0-9])?\Z")
PORT = st.integers(1, 65535)
ENDPOINT = st.one_of(
    st.tuples(V4, PORT).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(V6, PORT).map(lambda t: f"[{t[0]}]:{t[1]}"),
    st.tuples(HOSTNAME, PORT).map(lambda t: f"{t[0]}:{t[1]}"),
)
NETWORK = st.one_of(
    st.tuples(V4, st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(V6, st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}"),
)


@st.composite
def rendered_profiles(draw: st.DrawFn) -> str:
    from damm.device.wgconfig import render_wg_quick

    return render_wg_quick(
        draw(WG_KEY),
        f"{draw(V4)}/{draw(st.integers(8, 32))}",
        draw(st.none() | V6.map(lambda a: f"{a}/128")),
        tuple(draw(st.lists(V4 | V6 | HOSTNAME, max_size=3))),
        draw(WG_KEY),
        draw(ENDPOINT),
        tuple(draw(st.lists(NETWORK, min_size=1, max_size=4))),
        draw(st.integers(0, 65535)),
    )


def python_reading(text: str) -> dict[str, Any]:
    """What the lines say, read naively: `Key = a, b` per line, sections in order."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            out[key] = value.split(", ") if key in ("Address", "DNS", "AllowedIPs") else value
    return out


@settings(max_examples=20, deadline=None)
@given(profiles=st.lists(rendered_profiles(), min_size=10, max_size=10))
async def test_the_page_reads_every_profile_damm_renders(
    verifier: Page, profiles: list[str]
) -> None:
    """Whatever render_wg_quick writes (IPv4/IPv6, names, split or full tunnels), the page
    accepts and reads back field for field."""
    readings = await verifier.evaluate(
        """(texts) => texts.map((text) => {
            try {
                const p = Damm.parseConfig(text);
                const peer = p.peers[0];
                const out = {PrivateKey: p.interface.PrivateKey, Address: p.interface.Address,
                             PublicKey: peer.PublicKey, Endpoint: peer.Endpoint,
                             AllowedIPs: peer.AllowedIPs,
                             PersistentKeepalive: peer.PersistentKeepalive};
                if (p.interface.DNS) out.DNS = p.interface.DNS;
                for (const k of Object.keys(out)) if (out[k] === undefined) delete out[k];
                return out;
            } catch (e) {
                return {error: e.message};
            }
        })""",
        profiles,
    )
    assert readings == [python_reading(text) for text in profiles]
