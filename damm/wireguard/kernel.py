"""Kernel WireGuard over generic netlink (pyroute2's ``WireGuard``), for production Linux.

The dangerous part is reading. The kernel answers a device dump in as many netlink messages as
it needs: the first carries the device attributes, later ones only peers, and a peer with many
allowed IPs is split so its continuation (same public key, remaining IPs, no stats) opens the
next message. Reading only the first message, or not merging continuations, yields a partial
peer set, and the reconciler would "fix" the missing peers by re-adding or removing them. So
every part is merged, and anything that smells incomplete raises instead of returning.

pyroute2's sync socket runs its own event loop and is bound to the thread that made it, so all
netlink calls go through one dedicated worker thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypedDict, TypeVar

import structlog

from damm.keys.wireguard import validate_key_spelling, validate_public_key
from damm.wireguard.base import InterfaceState, PeerStats, WireGuardError
from damm.wireguard.netlink_batch import set_device_messages
from damm.wireguard.peer_diff import PeerDiff

NLM_F_DUMP_INTR = 0x10  # the kernel's "dump was inconsistent due to sequence change"

log = structlog.get_logger(__name__)
T = TypeVar("T")


class DumpPeer(TypedDict, total=False):
    """One peer entry of one dump message; continuation entries carry only key and IPs."""

    public_key: str
    allowed_ips: list[str]
    endpoint: str | None
    last_handshake: tuple[int, int] | None
    rx_bytes: int | None
    tx_bytes: int | None
    persistent_keepalive: int | None


class DumpPart(TypedDict, total=False):
    """One netlink message of a device dump, reduced to plain values."""

    flags: int
    error: int | None
    ifindex: int | None
    public_key: str | None
    listen_port: int | None
    peers: list[DumpPeer]


def merge_dump(parts: Sequence[DumpPart]) -> InterfaceState:
    """Merge every message of one dump into a complete state, or raise.

    A peer continues the previous peer when its key repeats (the kernel split its allowed
    IPs); a key that reappears later, non-adjacent, means the dump is inconsistent.
    """
    if not parts:
        raise WireGuardError("kernel dump returned no messages")
    public_key: str | None = None
    listen_port: int | None = None
    seen_device = False
    merged: dict[str, dict[str, Any]] = {}
    last_key: str | None = None
    for index, part in enumerate(parts):
        if part.get("error"):
            raise WireGuardError(f"kernel dump part {index} carries error {part.get('error')}")
        if part.get("flags", 0) & NLM_F_DUMP_INTR:
            raise WireGuardError("kernel dump was interrupted by a concurrent change; retry")
        if part.get("ifindex") is not None:
            seen_device = True
            public_key = part.get("public_key") or public_key
            if part.get("listen_port") is not None:
                listen_port = part.get("listen_port")
        for peer in part.get("peers", []):
            key = peer.get("public_key")
            if not key:
                raise WireGuardError(f"kernel dump part {index} has a peer without a key")
            entry = merged.get(key)
            if entry is None:
                merged[key] = {**peer, "allowed_ips": list(peer.get("allowed_ips", []))}
            elif key == last_key:
                entry["allowed_ips"].extend(peer.get("allowed_ips", []))
                for name, value in peer.items():
                    if name != "allowed_ips" and entry.get(name) is None:
                        entry[name] = value
            else:
                raise WireGuardError(f"kernel dump lists peer {key[:8]}… twice, non-adjacent")
            last_key = key
    if not seen_device:
        raise WireGuardError("kernel dump has no device attributes (incomplete read)")
    peers = {key: _stats(key, entry) for key, entry in merged.items()}
    return InterfaceState(public_key, listen_port, peers)


def _stats(key: str, entry: dict[str, Any]) -> PeerStats:
    handshake = entry.get("last_handshake")
    when = None
    if handshake and (handshake[0] or handshake[1]):
        when = handshake[0] + handshake[1] / 1e9
    return PeerStats(
        key,
        tuple(sorted(set(entry.get("allowed_ips", [])))),
        entry.get("endpoint"),
        when,
        entry.get("rx_bytes") or 0,
        entry.get("tx_bytes") or 0,
        entry.get("persistent_keepalive") or 0,
    )


def part_from_message(msg: Any) -> DumpPart:
    """Reduce one decoded pyroute2 ``wgmsg`` to a ``DumpPart`` (plain values only)."""
    header = msg["header"]
    part: DumpPart = {
        "flags": int(header.get("flags", 0)),
        "error": _error_code(header.get("error")),
        "ifindex": msg.get_attr("WGDEVICE_A_IFINDEX"),
        "public_key": _key(msg.get_attr("WGDEVICE_A_PUBLIC_KEY")),
        "listen_port": msg.get_attr("WGDEVICE_A_LISTEN_PORT"),
        "peers": [],
    }
    for group in msg.get_attrs("WGDEVICE_A_PEERS"):
        for peer in group:
            part["peers"].append(_peer_from_nla(peer))
    return part


def _peer_from_nla(peer: Any) -> DumpPeer:
    endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
    handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
    allowed = peer.get_attr("WGPEER_A_ALLOWEDIPS") or []
    return {
        "public_key": _key(peer.get_attr("WGPEER_A_PUBLIC_KEY")) or "",
        "allowed_ips": [str(ipaddress.ip_network(ip["addr"], strict=False)) for ip in allowed],
        "endpoint": _endpoint(endpoint),
        "last_handshake": (
            (int(handshake["tv_sec"]), int(handshake["tv_nsec"])) if handshake else None
        ),
        "rx_bytes": peer.get_attr("WGPEER_A_RX_BYTES"),
        "tx_bytes": peer.get_attr("WGPEER_A_TX_BYTES"),
        "persistent_keepalive": peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"),
    }


def _key(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _endpoint(value: Any) -> str | None:
    if not value or not value.get("addr"):
        return None
    addr, port = value["addr"], value["port"]
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _error_code(value: Any) -> int | None:
    if value is None:
        return None
    return int(getattr(value, "code", value) or 0) or None


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``1.2.3.4:51820`` or ``[fd00::1]:51820`` to (address, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise WireGuardError(f"bad endpoint {endpoint!r}")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise WireGuardError(f"endpoint host {host!r} is not an IP literal") from exc
    return host, int(port)


class KernelBackend:
    """One kernel WireGuard interface.

    Reads go through pyroute2's dump; a diff goes out as batched ``WG_CMD_SET_DEVICE``
    messages (``netlink_batch``), many peers per message, instead of pyroute2's one peer per
    request.
    """

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wg-{ifname}")
        self._wg: Any = None
        self._closed = False

    async def read(self) -> InterfaceState:
        def dump() -> list[DumpPart]:
            return [part_from_message(msg) for msg in self._socket().info(self.ifname)]

        return merge_dump(await self._call(dump, "read"))

    async def apply(self, diff: PeerDiff) -> None:
        if diff.is_empty:
            return

        def send() -> None:
            wg = self._socket()
            core = wg.asyncore
            messages = set_device_messages(self.ifname, diff, family_id=wg.prid, pid=core.pid)

            async def exchange() -> None:
                # pyroute2's own set() sends one peer this same way: sendto, then its ack.
                for data in messages:
                    core.sendto(data, (0, 0))
                    async for ack in core.get():
                        error = ack["header"].get("error")
                        if error is not None:
                            raise error

            wg._run_with_cleanup(exchange)

        await self._call(send, "apply")
        log.debug("wg.kernel.applied", ifname=self.ifname, diff=diff.summary())

    async def set_identity(self, private_key_b64: str, listen_port: int) -> None:
        try:
            validate_key_spelling(private_key_b64)
        except Exception:
            raise WireGuardError("private key is not base64 of 32 bytes") from None

        def send() -> None:
            self._socket().set(self.ifname, private_key=private_key_b64, listen_port=listen_port)

        await self._call(send, "set identity")

    async def set_peer_endpoint(self, public_key: str, endpoint: str) -> None:
        addr, port = split_endpoint(endpoint)
        request = {
            "public_key": validate_public_key(public_key),
            "update_only": True,
            "endpoint_addr": addr,
            "endpoint_port": port,
        }
        await self._call(lambda: self._socket().set(self.ifname, peer=request), "set endpoint")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._wg is not None:
                self._wg.close()
                self._wg = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)

    def _socket(self) -> Any:
        if self._wg is None:
            from pyroute2 import WireGuard

            self._wg = WireGuard()
        return self._wg

    async def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except WireGuardError:
            raise
        except Exception as exc:
            # Never include request payloads: identity requests carry the private key.
            raise WireGuardError(
                f"{self.ifname}: netlink {what} failed: {type(exc).__name__}: {exc}"
            ) from exc
