"""WireGuard over the cross-platform userspace API socket (wireguard-go, boringtun).

The protocol is line-oriented ``key=value`` text over a unix socket: a request is ``get=1`` or
``set=1`` followed by lines and a blank line; every reply ends with ``errno=N`` and a blank line.
Keys are hex, not base64. A whole diff goes out as one ``set=1`` transaction, because the
daemon applies a transaction under one lock: 10,000 peers in one write take well under a second
where 10,000 round trips would take many.

Private keys pass through this module (``set_identity`` writes one, ``get=1`` returns one) and
are never logged, never kept, never echoed in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
from pathlib import Path

import structlog
from nacl.bindings import crypto_scalarmult_base

from damm.keys.wireguard import KEY_BYTES, validate_public_key
from damm.wireguard.base import InterfaceState, PeerStats, WireGuardError
from damm.wireguard.peer_diff import PeerDiff

DEFAULT_SOCKET_DIR = Path("/var/run/wireguard")
# A 10k-peer dump is about 3.5 MB; the limit only bounds a runaway reply.
_READ_LIMIT = 1 << 28
_END = b"\n\n"

log = structlog.get_logger(__name__)


def socket_path_for(ifname: str, socket_dir: Path = DEFAULT_SOCKET_DIR) -> Path:
    """Where wireguard-go puts the socket: named after the interface, not the namespace.

    The directory is shared by every network namespace that shares the mount namespace, so
    two interfaces with the same name in two namespaces would fight over one socket.
    """
    return socket_dir / f"{ifname}.sock"


class UapiBackend:
    """One interface's UAPI socket; a fresh connection per transaction keeps no state to lose."""

    def __init__(
        self,
        ifname: str,
        socket_path: str | Path | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        self.ifname = ifname
        self.socket_path = Path(socket_path) if socket_path else socket_path_for(ifname)
        self.timeout = timeout

    async def read(self) -> InterfaceState:
        return parse_get_reply(await self._transact(b"get=1\n\n"))

    async def apply(self, diff: PeerDiff) -> None:
        if diff.is_empty:
            return
        _check_errno(await self._transact(build_set_request(diff)))
        log.debug("wg.uapi.applied", ifname=self.ifname, diff=diff.summary())

    async def set_identity(self, private_key_b64: str, listen_port: int) -> None:
        if not 0 <= listen_port <= 65535:
            raise WireGuardError(f"listen port {listen_port} is outside 0..65535")
        private_hex = _b64_to_hex(private_key_b64, what="private key")
        request = f"set=1\nprivate_key={private_hex}\nlisten_port={listen_port}\n\n"
        _check_errno(await self._transact(request.encode("ascii")))

    async def set_peer_endpoint(self, public_key: str, endpoint: str) -> None:
        if not endpoint or any(c in endpoint for c in "\n="):
            raise WireGuardError(f"bad endpoint {endpoint!r}")
        request = (
            f"set=1\npublic_key={_b64_to_hex(public_key)}\nupdate_only=true\n"
            f"endpoint={endpoint}\n\n"
        )
        _check_errno(await self._transact(request.encode("ascii")))

    async def close(self) -> None:
        """Nothing is held open between transactions; present for the protocol."""

    async def _transact(self, request: bytes) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(
                    str(self.socket_path), limit=_READ_LIMIT
                )
                try:
                    writer.write(request)
                    await writer.drain()
                    return await reader.readuntil(_END)
                finally:
                    writer.close()
                    # The daemon may already have hung up after an invalid request.
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise WireGuardError(
                f"no UAPI listener at {self.socket_path} (is the daemon running for {self.ifname}?)"
            ) from exc
        except asyncio.IncompleteReadError as exc:
            # wireguard-go hangs up without an errno line on a request it cannot parse.
            raise WireGuardError(
                f"{self.ifname}: daemon closed the connection without a reply "
                "(request rejected as malformed)"
            ) from exc
        except TimeoutError as exc:
            raise WireGuardError(f"{self.ifname}: no reply within {self.timeout}s") from exc
        except (OSError, asyncio.LimitOverrunError) as exc:
            raise WireGuardError(f"{self.ifname}: socket error: {exc}") from exc


def build_set_request(diff: PeerDiff) -> bytes:
    """One ``set=1`` transaction for a whole diff: removals, then updates, then additions.

    Removals go first so allowed IPs they held are free before another peer claims them.
    Updates say ``update_only`` so a peer removed behind our back is not resurrected with a
    stale config, and ``replace_allowed_ips`` so the listed IPs are the whole set rather than
    an addition to it. Additions also replace, which makes re-adding an existing peer harmless.
    """
    parts: list[str] = ["set=1\n"]
    for key in diff.remove:
        parts.append(f"public_key={_b64_to_hex(key)}\nremove=true\n")
    for peer in diff.update:
        parts.append(
            f"public_key={_b64_to_hex(peer.public_key)}\nupdate_only=true\n"
            f"replace_allowed_ips=true\n"
            f"persistent_keepalive_interval={peer.persistent_keepalive}\n"
        )
        parts.extend(f"allowed_ip={cidr}\n" for cidr in peer.allowed_ips)
    for peer in diff.add:
        parts.append(f"public_key={_b64_to_hex(peer.public_key)}\nreplace_allowed_ips=true\n")
        if peer.persistent_keepalive:
            parts.append(f"persistent_keepalive_interval={peer.persistent_keepalive}\n")
        parts.extend(f"allowed_ip={cidr}\n" for cidr in peer.allowed_ips)
    parts.append("\n")
    return "".join(parts).encode("ascii")


def parse_get_reply(reply: bytes) -> InterfaceState:
    """Parse a full ``get=1`` reply; raise on a non-zero or missing errno.

    wireguard-go reports the private key, not the public one, so the public key is derived
    here and the private key dropped. Allowed IPs come back in canonical masked form, so they
    are only sorted, not re-parsed: that keeps a 10k-peer read cheap.
    """
    text = reply.decode("ascii", errors="replace")
    lines = text.split("\n")
    # A reply ends "errno=N\n\n": the last two split items are empty.
    while lines and not lines[-1]:
        lines.pop()
    if not lines or not lines[-1].startswith("errno="):
        raise WireGuardError("get=1 reply is incomplete (no errno line)")
    _raise_for_errno(lines.pop(), "get=1")

    public_key: str | None = None
    listen_port: int | None = None
    peers: dict[str, PeerStats] = {}

    key: str | None = None
    allowed: list[str] = []
    endpoint: str | None = None
    hs_sec = hs_nsec = rx = tx = keepalive = 0

    def flush() -> None:
        assert key is not None
        handshake = None if hs_sec == 0 and hs_nsec == 0 else hs_sec + hs_nsec / 1e9
        allowed.sort()
        peers[key] = PeerStats(key, tuple(allowed), endpoint, handshake, rx, tx, keepalive)

    try:
        for line in lines:
            name, sep, value = line.partition("=")
            if not sep:
                raise WireGuardError(f"get=1 reply has a line without '=' ({name[:20]!r})")
            if name == "allowed_ip":
                allowed.append(value)
            elif name == "public_key":
                if key is not None:
                    flush()
                key = _hex_to_b64(value)
                allowed = []
                endpoint = None
                hs_sec = hs_nsec = rx = tx = keepalive = 0
            elif key is None:
                if name == "private_key":
                    public_key = _public_from_private_hex(value)
                elif name == "listen_port":
                    listen_port = int(value)
            elif name == "endpoint":
                endpoint = value
            elif name == "rx_bytes":
                rx = int(value)
            elif name == "tx_bytes":
                tx = int(value)
            elif name == "last_handshake_time_sec":
                hs_sec = int(value)
            elif name == "last_handshake_time_nsec":
                hs_nsec = int(value)
            elif name == "persistent_keepalive_interval":
                keepalive = int(value)
            # preshared_key, protocol_version, fwmark and future keys carry nothing we use.
    except ValueError as exc:
        raise WireGuardError(f"get=1 reply has a malformed value: {exc}") from exc
    if key is not None:
        flush()
    return InterfaceState(public_key, listen_port, peers)


def _check_errno(reply: bytes) -> None:
    text = reply.decode("ascii", errors="replace").strip()
    last = text.rsplit("\n", 1)[-1]
    if not last.startswith("errno="):
        raise WireGuardError("set=1 reply is incomplete (no errno line)")
    _raise_for_errno(last, "set=1")


def _raise_for_errno(line: str, op: str) -> None:
    try:
        code = int(line.removeprefix("errno="))
    except ValueError as exc:
        raise WireGuardError(f"{op}: unparseable {line!r}") from exc
    if code:
        # wireguard-go answers negative errnos (-22), the kernel-style tools positive ones.
        raise WireGuardError(f"{op} failed: errno={code} ({os.strerror(abs(code))})")


def _b64_to_hex(key: str, *, what: str = "public key") -> str:
    """Fast path for keys already validated as Peers; still refuses anything not 32 bytes."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raw = b""
    if len(raw) != KEY_BYTES:
        if what == "public key":
            validate_public_key(key)  # raises MALFORMED_KEY with the specific reason
        raise WireGuardError(f"{what} is not base64 of {KEY_BYTES} bytes")
    return raw.hex()


def _hex_to_b64(hex_key: str) -> str:
    raw = bytes.fromhex(hex_key)
    if len(raw) != KEY_BYTES:
        raise ValueError(f"key of {len(raw)} bytes")
    return base64.b64encode(raw).decode("ascii")


def _public_from_private_hex(hex_key: str) -> str | None:
    raw = bytes.fromhex(hex_key)
    if not any(raw):
        return None  # all-zero means "no private key set"
    return base64.b64encode(crypto_scalarmult_base(raw)).decode("ascii")
