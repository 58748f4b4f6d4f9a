"""Peer sets as values, and the diff between what an interface has and what it must carry.

The reconciler decides with data, not with side effects: ``diff`` turns two peer sets into a
``PeerDiff`` that can be logged, tested and applied by any backend. Keeping this module pure
(no I/O) lets the property tests prove that applying a diff always lands on the desired set.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from damm.errors import Code, DammError
from damm.keys.wireguard import validate_public_key


class Peer(msgspec.Struct, frozen=True):
    """One peer as the control plane wants it.

    Equality is the whole comparison the diff needs, so ``allowed_ips`` must already be
    normalised and sorted: build peers from untrusted input with ``Peer.build``. Backends that
    read canonical output from WireGuard construct it directly to stay fast on 10k-peer dumps.
    """

    public_key: str
    allowed_ips: tuple[str, ...]
    persistent_keepalive: int = 0

    @classmethod
    def build(
        cls,
        public_key: str,
        allowed_ips: Iterable[str],
        persistent_keepalive: int = 0,
    ) -> Peer:
        """Validate and normalise, so two spellings of one peer compare equal."""
        if not 0 <= persistent_keepalive <= 65535:
            raise DammError(
                Code.INVALID_ARGUMENT,
                f"persistent keepalive {persistent_keepalive} is outside 0..65535",
            )
        return cls(
            validate_public_key(public_key),
            normalise_allowed_ips(allowed_ips),
            persistent_keepalive,
        )


def normalise_allowed_ips(allowed_ips: Iterable[str]) -> tuple[str, ...]:
    """Mask host bits, drop duplicates and sort as strings.

    WireGuard stores prefixes masked (``10.0.0.5/24`` reads back as ``10.0.0.0/24``), so the
    desired side must be masked too or every resync would see a change. Plain string order is
    used because it is cheap on both sides and only needs to be the same on both sides.
    """
    out: set[str] = set()
    for cidr in allowed_ips:
        if _canonical_host_v4(cidr):
            out.add(cidr)
            continue
        try:
            out.add(str(ipaddress.ip_network(cidr.strip(), strict=False)))
        except ValueError as exc:
            raise DammError(Code.INVALID_ARGUMENT, f"bad allowed IP {cidr!r}") from exc
    return tuple(sorted(out))


def _canonical_host_v4(cidr: str) -> bool:
    """``a.b.c.d/32`` spelled exactly as ``ipaddress`` would spell it.

    Nearly every peer is one such host route; recognising it without ``ipaddress`` makes a
    50k-peer snapshot cost milliseconds where parsing every prefix cost more than a second.
    """
    return _HOST_V4.fullmatch(cidr) is not None


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_HOST_V4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}/32", re.ASCII)


class PeerDiff(msgspec.Struct, frozen=True):
    """What must change on an interface; empty when it already matches."""

    add: tuple[Peer, ...] = ()
    remove: tuple[str, ...] = ()
    update: tuple[Peer, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.add or self.remove or self.update)

    def __len__(self) -> int:
        return len(self.add) + len(self.remove) + len(self.update)

    def summary(self) -> str:
        """A short, key-free line for logs; counts are what an operator scans for."""
        return f"add={len(self.add)} remove={len(self.remove)} update={len(self.update)}"


def diff(actual: Mapping[str, Peer], desired: Mapping[str, Peer]) -> PeerDiff:
    """The minimal change from ``actual`` to ``desired``.

    A peer whose key stays is updated in place, never removed and re-added: removing it would
    drop its session and zero its transfer counters, which metering would then have to explain.
    Output is sorted by key so the same inputs always give the same diff (and the same log).
    """
    add: list[Peer] = []
    update: list[Peer] = []
    for key, want in desired.items():
        have = actual.get(key)
        if have is None:
            add.append(want)
        elif have != want:
            update.append(want)
    remove = sorted(key for key in actual if key not in desired)
    add.sort(key=_by_key)
    update.sort(key=_by_key)
    return PeerDiff(add=tuple(add), remove=tuple(remove), update=tuple(update))


def apply(actual: Mapping[str, Peer], change: PeerDiff) -> dict[str, Peer]:
    """Reference semantics of a diff: what every backend must end up with."""
    result = dict(actual)
    for key in change.remove:
        result.pop(key, None)
    for peer in change.update:
        result[peer.public_key] = peer
    for peer in change.add:
        result[peer.public_key] = peer
    return result


def _by_key(peer: Peer) -> str:
    return peer.public_key


def change_diff(
    applied: Mapping[str, Peer], desired: Mapping[str, Peer], touched: Iterable[str]
) -> PeerDiff:
    """The change for the ``touched`` keys only, from what was applied: no read of the interface.

    A peer leaving the set is not removed but cleared (no allowed IPs), which stops its
    traffic at once while keeping its counters, so the bytes it moved up to that moment can
    still be metered; ``settle`` removes it after that read.
    """
    add: list[Peer] = []
    update: list[Peer] = []
    for key in sorted(set(touched)):
        want = desired.get(key)
        have = applied.get(key)
        if want is None:
            if have is not None and have.allowed_ips:
                update.append(Peer(key, (), have.persistent_keepalive))
        elif have is None:
            add.append(want)
        elif have != want:
            update.append(want)
    return PeerDiff(add=tuple(add), update=tuple(update))


def settle(applied: Mapping[str, Peer], desired: Mapping[str, Peer]) -> PeerDiff:
    """Remove the cleared peers ``change_diff`` left behind (after their last metering read)."""
    return PeerDiff(remove=tuple(sorted(key for key in applied if key not in desired)))


_HOST_V4_LINES = re.compile(rf"(?:{_OCTET}(?:\.{_OCTET}){{3}}/32\n)*", re.ASCII)


def peers_from(entries: Sequence[tuple[str, Sequence[str]]]) -> dict[str, Peer]:
    """``Peer.build`` for a whole peer set, its allowed IPs checked in one pass over joined text.

    A set where every peer is one canonical IPv4 host route (the usual shape) needs no
    per-peer prefix parsing; keys are still checked one by one (spelling and curve point).
    Anything else goes through ``Peer.build``, which also names what is wrong.
    """
    ips_ok = all(len(ips) == 1 for _, ips in entries) and (
        _HOST_V4_LINES.fullmatch("".join(f"{ips[0]}\n" for _, ips in entries)) is not None
    )
    if ips_ok:
        return {key: Peer(validate_public_key(key), tuple(ips)) for key, ips in entries}
    return {key: Peer.build(key, ips) for key, ips in entries}
