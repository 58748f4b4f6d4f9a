"""Source NAT for egress pools: each device's traffic leaves from the address its peer set names.

The gateway keeps one nftables table of its own, ``ip damm``: a ``postrouting`` chain at
``srcnat`` priority holding a single rule, ``ip daddr != OVERLAY snat to ip saddr map @egress``,
and the map from a device's tunnel address to its egress address. One rule and a map, not one
rule per device, so the packet path does one lookup however many devices there are, and a change
is a map element. Traffic between devices stays inside the overlay and keeps its real source.
The table stays when the agent stops: like the peers, the packet path does not need the agent.

Reconciling works like the peer set: read what the kernel has (``nft -j list table``), compute a
plan (``plan``: pure, printable, tested), apply it as one ``nft -j -f`` batch, which the kernel
commits atomically. Anything in the table that DAMM did not put there (an extra rule, chain, set,
or an element nobody asked for) is removed. Other tables are never touched.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from damm import log
from damm.errors import Code, DammError

_log = log.get("damm.agent.egress")

FAMILY = "ip"
TABLE = "damm"
CHAIN = "egress"
MAP = "egress"
SRCNAT_PRIORITY = 100

_CHAIN = {"type": "nat", "hook": "postrouting", "prio": SRCNAT_PRIORITY, "policy": "accept"}
_SNAT = [
    {
        "snat": {
            "addr": {
                "map": {
                    "key": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "data": f"@{MAP}",
                }
            }
        }
    }
]
_WHERE = {"family": FAMILY, "table": TABLE}


def rule_expr(overlay: str | None) -> list[dict[str, Any]]:
    """The one rule: source NAT through the map, for traffic that leaves the overlay."""
    if overlay is None:
        return _SNAT
    net = ipaddress.IPv4Network(overlay, strict=False)
    daddr = {"payload": {"protocol": "ip", "field": "daddr"}}
    prefix = {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
    return [{"match": {"op": "!=", "left": daddr, "right": prefix}}, *_SNAT]


@dataclass(frozen=True, slots=True)
class NatState:
    """The ``ip damm`` table as read back: whether it is exactly ours, and the map's elements."""

    exists: bool
    intact: bool
    elements: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NatPlan:
    """What to change. ``rebuild`` replaces the whole table (it was missing or tampered with) and
    then ``add`` holds every desired element; otherwise ``remove`` and ``add`` are map elements
    (a changed egress address is a remove and an add of the same source, in one batch)."""

    rebuild: bool = False
    remove: tuple[str, ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    overlay: str | None = None  # what the rule excludes, when rebuilding

    @property
    def is_empty(self) -> bool:
        return not (self.rebuild or self.remove or self.add)

    def summary(self) -> str:
        head = "rebuild " if self.rebuild else ""
        return f"{head}+{len(self.add)} -{len(self.remove)}"

    def commands(self) -> list[dict[str, Any]]:
        """The ``nft -j`` batch; the kernel applies all of it or none."""
        out: list[dict[str, Any]] = []
        if self.rebuild:
            table = {"family": FAMILY, "name": TABLE}
            out += [
                {"add": {"table": table}},  # so that the delete cannot fail on a missing table
                {"delete": {"table": table}},
                {"add": {"table": table}},
                {"add": {"chain": {**_WHERE, "name": CHAIN, **_CHAIN}}},
                {"add": {"map": {**_WHERE, "name": MAP, "type": "ipv4_addr", "map": "ipv4_addr"}}},
                {"add": {"rule": {**_WHERE, "chain": CHAIN, "expr": rule_expr(self.overlay)}}},
            ]
        if self.remove:
            out.append({"delete": {"element": {**_WHERE, "name": MAP, "elem": list(self.remove)}}})
        if self.add:
            elems = [[src, dst] for src, dst in self.add]
            out.append({"add": {"element": {**_WHERE, "name": MAP, "elem": elems}}})
        return out


def parse(listing: Mapping[str, Any] | None, overlay: str | None = None) -> NatState:
    """Read ``nft -j list table ip damm`` output (None: no such table); ``overlay`` is what
    our rule must exclude, so a rule written for another overlay counts as foreign."""
    if listing is None:
        return NatState(exists=False, intact=False)
    chains: list[dict[str, Any]] = []
    maps: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    other = 0
    for item in listing.get("nftables", []):
        if not isinstance(item, dict) or len(item) != 1:
            other += 1
            continue
        kind, body = next(iter(item.items()))
        if kind in ("metainfo", "table"):
            continue
        if kind == "chain":
            chains.append(body)
        elif kind == "map":
            maps.append(body)
        elif kind == "rule":
            rules.append(body)
        else:
            other += 1
    elements: dict[str, str] = {}
    intact = other == 0 and len(chains) == 1 and len(maps) == 1 and len(rules) == 1
    if intact:
        chain, nat_map, rule = chains[0], maps[0], rules[0]
        intact = (
            chain.get("name") == CHAIN
            and all(chain.get(k) == v for k, v in _CHAIN.items())
            and nat_map.get("name") == MAP
            and nat_map.get("type") == "ipv4_addr"
            and nat_map.get("map") == "ipv4_addr"
            and "flags" not in nat_map
            and rule.get("chain") == CHAIN
            and _without_family(rule.get("expr")) == rule_expr(overlay)
        )
    for nat_map in maps:
        if nat_map.get("name") != MAP:
            continue
        for elem in nat_map.get("elem", []):
            if (
                isinstance(elem, list)
                and len(elem) == 2
                and all(isinstance(x, str) for x in elem)
                and elem[0] not in elements
            ):
                elements[elem[0]] = elem[1]
            else:  # an element with a timeout, a comment or a range: not one of ours
                intact = False
    return NatState(exists=True, intact=intact, elements=elements)


def _without_family(expr: Any) -> Any:
    """nft echoes ``snat`` with or without its family, depending on version; compare without."""
    if isinstance(expr, dict):
        return {k: _without_family(v) for k, v in expr.items() if k != "family"}
    if isinstance(expr, list):
        return [_without_family(v) for v in expr]
    return expr


def plan(actual: NatState, desired: Mapping[str, str], overlay: str | None = None) -> NatPlan:
    """Full reconcile: from what the kernel holds to exactly ``desired`` (source → egress)."""
    if not actual.intact:
        return NatPlan(rebuild=True, add=tuple(sorted(desired.items())), overlay=overlay)
    return plan_change(actual.elements, desired, set(actual.elements) | set(desired))


def plan_change(
    have: Mapping[str, str], want: Mapping[str, str], touched: Iterable[str]
) -> NatPlan:
    """Incremental reconcile over the sources a peer-set change touched, given what was applied."""
    remove: list[str] = []
    add: list[tuple[str, str]] = []
    for src in sorted(set(touched)):
        old, new = have.get(src), want.get(src)
        if old == new:
            continue
        if old is not None:
            remove.append(src)
        if new is not None:
            add.append((src, new))
    return NatPlan(remove=tuple(remove), add=tuple(add))


def after(elements: Mapping[str, str], p: NatPlan) -> dict[str, str]:
    """The map's elements once ``p`` is applied: the model the tests check plans against."""
    out = {} if p.rebuild else dict(elements)
    for src in p.remove:
        out.pop(src, None)
    out.update(p.add)
    return out


def source_of(allowed_ips: Iterable[str]) -> str | None:
    """A peer's tunnel IPv4 address: the single host route among its allowed IPs."""
    for cidr in allowed_ips:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen == 32:
            return str(net.network_address)
    return None


def desired_map(peers: Mapping[str, tuple[tuple[str, ...], str | None]]) -> dict[str, str]:
    """Source → egress for every peer (public key → (allowed IPs, egress)) that has an egress."""
    return dict(NatIndex.of(peers))


class NatIndex(Mapping[str, str]):
    """Source → egress for the peers a gateway carries, kept peer by peer.

    The agent updates it with each peer-set change, so the change path costs what the change
    touches instead of rebuilding the map from every peer. Should several peers name one source
    (a consistent peer set never does), the smallest public key wins, whatever the order of
    changes: the incremental map and one built from scratch agree.
    """

    def __init__(self) -> None:
        self._holders: dict[str, dict[str, str]] = {}  # source -> {public key: egress}
        self._source: dict[str, str] = {}  # public key -> its source, for keys in the map

    @classmethod
    def of(cls, peers: Mapping[str, tuple[tuple[str, ...], str | None]]) -> NatIndex:
        index = cls()
        for key, (ips, egress) in peers.items():
            index.put(key, ips, egress)
        return index

    def put(self, key: str, allowed_ips: Iterable[str], egress: str | None) -> set[str]:
        """Set one peer; the sources whose mapping may have changed."""
        touched = self.drop(key)
        src = source_of(allowed_ips) if egress is not None else None
        if src is not None and egress is not None:
            self._holders.setdefault(src, {})[key] = egress
            self._source[key] = src
            touched.add(src)
        return touched

    def drop(self, key: str) -> set[str]:
        """Forget one peer; the sources whose mapping may have changed."""
        src = self._source.pop(key, None)
        if src is None:
            return set()
        holders = self._holders[src]
        del holders[key]
        if not holders:
            del self._holders[src]
        return {src}

    def __getitem__(self, src: str) -> str:
        holders = self._holders[src]
        return holders[min(holders)] if len(holders) > 1 else next(iter(holders.values()))

    def __iter__(self) -> Iterator[str]:
        return iter(self._holders)

    def __len__(self) -> int:
        return len(self._holders)


# --- the kernel ---------------------------------------------------------------------------------


class NatBackend(Protocol):
    async def read(self) -> dict[str, Any] | None: ...

    async def apply(self, commands: list[dict[str, Any]]) -> None: ...


class Nftables:
    """``nft`` in the agent's own network namespace, JSON in and out.

    ``wrapper`` runs it elsewhere, e.g. ``("ip", "netns", "exec", NS)`` for a lab namespace.
    """

    def __init__(
        self, nft: str = "nft", *, wrapper: tuple[str, ...] = (), time_limit: float = 30.0
    ) -> None:
        self.argv = (*wrapper, shutil.which(nft) or nft)
        self.time_limit = time_limit

    async def _run(self, *args: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                *args,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise DammError(Code.EGRESS_BACKEND, f"cannot run {self.argv[-1]}: {exc}") from None
        try:
            async with asyncio.timeout(self.time_limit):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DammError(
                Code.EGRESS_BACKEND, f"nft timed out after {self.time_limit}s"
            ) from None
        return proc.returncode or 0, out, err

    async def read(self) -> dict[str, Any] | None:
        code, out, err = await self._run("-j", "list", "table", FAMILY, TABLE)
        if code != 0:
            if b"No such file or directory" in err:
                return None
            raise DammError(Code.EGRESS_BACKEND, err.decode(errors="replace").strip()[:300])
        try:
            listing: dict[str, Any] = json.loads(out)
        except ValueError:
            raise DammError(Code.EGRESS_BACKEND, "nft printed something that is not JSON") from None
        return listing

    async def apply(self, commands: list[dict[str, Any]]) -> None:
        batch = json.dumps({"nftables": commands}).encode()
        code, _, err = await self._run("-j", "-f", "-", stdin=batch)
        if code != 0:
            raise DammError(Code.EGRESS_BACKEND, err.decode(errors="replace").strip()[:300])


class EgressReconciler:
    """Keeps the kernel's NAT map equal to the peer set's egress addresses.

    ``applied`` is what this process last wrote; a change is planned against it and touches only
    the sources it names. If the kernel disagrees (someone edited the table), the batch fails and
    a full reconcile from a fresh read repairs it; the agent also runs one periodically.
    """

    def __init__(self, backend: NatBackend, overlay: str | None = None) -> None:
        self.backend = backend
        self.overlay = overlay  # the agent sets it from its registration
        self.applied: dict[str, str] | None = None

    async def full(self, desired: Mapping[str, str]) -> NatPlan:
        actual = parse(await self.backend.read(), self.overlay)
        p = plan(actual, desired, self.overlay)
        if not p.is_empty:
            await self.backend.apply(p.commands())
        self.applied = dict(desired)
        return p

    async def change(self, desired: Mapping[str, str], touched: Iterable[str]) -> NatPlan:
        if self.applied is None:
            return await self.full(desired)
        p = plan_change(self.applied, desired, touched)
        if p.is_empty:
            return p
        try:
            await self.backend.apply(p.commands())
        except DammError as err:
            _log.warning("egress change refused; full reconcile", error=err.line())
            return await self.full(desired)
        for src in p.remove:  # in place: a copy would cost the whole map
            self.applied.pop(src, None)
        self.applied.update(p.add)
        return p


@dataclass
class _Table:
    chains: list[dict[str, Any]] = field(default_factory=list)
    maps: list[dict[str, Any]] = field(default_factory=list)
    rules: list[dict[str, Any]] = field(default_factory=list)
    elements: dict[str, str] = field(default_factory=dict)

    def copy(self) -> _Table:
        return _Table(list(self.chains), list(self.maps), list(self.rules), dict(self.elements))


class MemoryNat:
    """An in-memory ``ip damm`` table, for tests and benchmarks of the agent without root.

    It applies the batches the reconciler writes with the kernel's rules that matter here: a
    batch is atomic, deleting an element that is not there fails, and adding an element whose
    source maps elsewhere fails.
    """

    def __init__(self) -> None:
        self.table: _Table | None = None
        self.batches = 0

    async def read(self) -> dict[str, Any] | None:
        t = self.table
        if t is None:
            return None
        items: list[dict[str, Any]] = [{"table": {"family": FAMILY, "name": TABLE}}]
        items += [{"chain": chain} for chain in t.chains]
        elem = {"elem": [[k, v] for k, v in t.elements.items()]} if t.elements else {}
        items += [{"map": {**body, **elem}} for body in t.maps]
        items += [{"rule": rule} for rule in t.rules]
        return {"nftables": items}

    async def apply(self, commands: list[dict[str, Any]]) -> None:
        table = None if self.table is None else self.table.copy()
        for command in commands:
            ((verb, body),) = command.items()
            ((kind, spec),) = body.items()
            if kind == "table":
                if verb == "delete":
                    table = None
                elif table is None:
                    table = _Table()
                continue
            if table is None:
                raise DammError(Code.EGRESS_BACKEND, f"no table for {kind}")
            if kind == "chain":
                table.chains.append({k: v for k, v in spec.items() if k not in _WHERE})
            elif kind == "map":
                table.maps.append({k: v for k, v in spec.items() if k not in _WHERE})
            elif kind == "rule":
                table.rules.append({"chain": spec["chain"], "expr": spec["expr"]})
            elif verb == "delete":
                for src in spec["elem"]:
                    if table.elements.pop(src, None) is None:
                        raise DammError(Code.EGRESS_BACKEND, f"no element {src}")
            else:
                for src, dst in spec["elem"]:
                    if table.elements.get(src, dst) != dst:
                        raise DammError(Code.EGRESS_BACKEND, f"element {src} exists")
                    table.elements[src] = dst
        self.table = table
        self.batches += 1

    @property
    def elements(self) -> dict[str, str]:
        return {} if self.table is None else dict(self.table.elements)
