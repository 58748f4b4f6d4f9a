"""The device's wg-quick file: rendered for the official apps, edited in place on failover."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from damm.device.wgconfig import parse_endpoint, render_wg_quick, replace_endpoint
from damm.errors import Code, DammError
from damm.private_files import write_atomic

PRIVATE = base64.b64encode(bytes(range(1, 33))).decode()
PEER = base64.b64encode(bytes(range(101, 133))).decode()


def render(**overrides: object) -> str:
    args: dict[str, object] = {
        "private_key_b64": PRIVATE,
        "address_v4_cidr": "10.44.0.10/32",
        "address_v6_cidr": "fd44::a/128",
        "dns": ("10.44.0.1",),
        "peer_public_key": PEER,
        "endpoint": "203.0.113.7:51820",
        "allowed_ips": ("0.0.0.0/0", "::/0"),
    }
    args.update(overrides)
    return render_wg_quick(**args)  # type: ignore[arg-type]


def test_render_is_a_standard_wg_quick_file() -> None:
    assert render() == (
        "[Interface]\n"
        f"PrivateKey = {PRIVATE}\n"
        "Address = 10.44.0.10/32, fd44::a/128\n"
        "DNS = 10.44.0.1\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {PEER}\n"
        "Endpoint = 203.0.113.7:51820\n"
        "AllowedIPs = 0.0.0.0/0, ::/0\n"
        "PersistentKeepalive = 25\n"
    )


def test_render_without_ipv6_or_dns_or_keepalive() -> None:
    text = render(address_v6_cidr=None, dns=(), persistent_keepalive=0)
    assert "Address = 10.44.0.10/32\n" in text
    assert "DNS" not in text and "PersistentKeepalive" not in text


@pytest.mark.parametrize(
    "overrides",
    [
        {"dns": ("10.44.0.1\nPostUp = touch /tmp/pwned",)},
        {"endpoint": "203.0.113.7:51820\nPostUp = id"},
        {"endpoint": "203.0.113.7"},
        {"endpoint": "203.0.113.7:70000"},
        {"address_v4_cidr": "fd44::a/128"},
        {"address_v4_cidr": "10.44.0.10"},
        {"address_v6_cidr": "10.44.0.10/32"},
        {"allowed_ips": ()},
        {"allowed_ips": ("0.0.0.0/0, PostUp = id",)},
        {"peer_public_key": "not a key"},
        {"private_key_b64": PRIVATE[:-2]},
        {"persistent_keepalive": 70000},
    ],
)
def test_render_refuses_values_that_could_inject_lines(overrides: dict[str, object]) -> None:
    with pytest.raises(DammError) as excinfo:
        render(**overrides)
    assert excinfo.value.code is Code.INVALID_ARGUMENT


def test_bad_private_key_is_never_echoed() -> None:
    secret = PRIVATE[:-4] + "!!!="
    with pytest.raises(DammError) as excinfo:
        render(private_key_b64=secret)
    assert secret not in str(excinfo.value)


def test_parse_and_replace_endpoint_touch_only_that_line() -> None:
    original = render().replace("[Peer]\n", "[Peer]\n# primary front door\n") + "# user note\n"
    assert parse_endpoint(original) == "203.0.113.7:51820"
    changed = replace_endpoint(original, "[2001:db8::7]:443")
    assert parse_endpoint(changed) == "[2001:db8::7]:443"
    before, after = original.splitlines(), changed.splitlines()
    diff = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert diff == [("Endpoint = 203.0.113.7:51820", "Endpoint = [2001:db8::7]:443")]


def test_replace_endpoint_keeps_odd_formatting_and_line_endings() -> None:
    text = "[Interface]\r\nPrivateKey = x\r\n[peer]\r\n  endpoint=1.2.3.4:5   # old\r\n"
    assert parse_endpoint(text) == "1.2.3.4:5"
    assert replace_endpoint(text, "5.6.7.8:9") == (
        "[Interface]\r\nPrivateKey = x\r\n[peer]\r\n  endpoint=5.6.7.8:9   # old\r\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        "[Interface]\nPrivateKey = x\n",
        "[Interface]\n[Peer]\nPublicKey = y\n",
        "[Peer]\nEndpoint = 1.2.3.4:5\n[Peer]\nEndpoint = 1.2.3.5:5\n",
        "[Interface]\nEndpoint = 1.2.3.4:5\n",
    ],
)
def test_missing_or_ambiguous_endpoint_is_an_error(text: str) -> None:
    with pytest.raises(DammError) as excinfo:
        parse_endpoint(text)
    assert excinfo.value.code is Code.INVALID_ARGUMENT


def test_replace_endpoint_validates_the_new_value() -> None:
    with pytest.raises(DammError):
        replace_endpoint(render(), "1.2.3.4:5\nPostUp = id")


def test_write_atomic_creates_0600_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "wg0.conf"
    old_umask = os.umask(0)
    try:
        write_atomic(path, "one\n")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        write_atomic(path, "two\n")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["wg0.conf"]


def test_write_atomic_leaves_the_old_file_when_it_fails(tmp_path: Path) -> None:
    path = tmp_path / "wg0.conf"
    write_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "\udcff")  # cannot be encoded: fails after the temp file exists
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["wg0.conf"]


@pytest.mark.skipif(shutil.which("wg-quick") is None, reason="wg-quick (wireguard-tools) missing")
def test_rendered_config_passes_wg_quick_strip(tmp_path: Path) -> None:
    path = tmp_path / "wg0.conf"
    write_atomic(path, render(dns=("10.44.0.1", "corp.example")))
    result = subprocess.run(
        ["wg-quick", "strip", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    stripped = result.stdout
    # What wg(8) reads: only wg keys remain, wg-quick's own (Address, DNS) are stripped.
    assert f"PrivateKey = {PRIVATE}" in stripped
    assert f"PublicKey = {PEER}" in stripped
    assert "Endpoint = 203.0.113.7:51820" in stripped
    assert "AllowedIPs = 0.0.0.0/0, ::/0" in stripped
    assert "Address" not in stripped and "DNS" not in stripped


WG_KEYS = {
    "interface": {"privatekey", "listenport", "fwmark"},
    "peer": {"publickey", "presharedkey", "allowedips", "endpoint", "persistentkeepalive"},
}


@pytest.mark.skipif(
    shutil.which("wg") is None or shutil.which("wg-quick") is None,
    reason="wg / wg-quick (wireguard-tools) missing",
)
def test_stripped_config_parses_with_wg_semantics(tmp_path: Path) -> None:
    """Only keys `wg setconf` accepts remain, in the sections it accepts them in, and `wg` itself
    takes the private key (deriving its public key) the way setconf would read it."""
    path = tmp_path / "wg0.conf"
    write_atomic(path, render())
    stripped = subprocess.run(
        ["wg-quick", "strip", str(path)], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    section, seen = "", set()
    values: dict[str, str] = {}
    for raw in stripped.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            section = line.strip("[]").lower()
            assert section in WG_KEYS
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        assert key.lower() in WG_KEYS[section], f"{key} in [{section}]"
        seen.add(key)
        values[key] = value
    assert {"PrivateKey", "PublicKey", "Endpoint", "AllowedIPs"} <= seen
    public = subprocess.run(
        ["wg", "pubkey"],
        input=values["PrivateKey"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert len(base64.b64decode(public, validate=True)) == 32
