"""Tunnel address allocation, decided from values and nothing else.

A device gets one *host index* inside the overlay, not an address. The IPv4 address and, when the
overlay is dual stack, the IPv6 ULA address are both derived from that index, so the two can never
drift apart and an event only needs to record one integer.

The pool is folded from ``ipam`` events by whoever needs it (the enrollment handler, a projection,
a replay check); it never talks to the bus itself.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from damm.errors import Code, DammError

DEFAULT_OVERLAY = "10.44.0.0/24"
_ULA = IPv6Network("fc00::/7")


def _invalid(detail: str) -> DammError:
    return DammError(Code.INVALID_ARGUMENT, detail)


@dataclass(frozen=True, slots=True)
class Overlay:
    """The address plan of one deployment.

    The gateway must sit below ``first_client_offset`` so that clients form one contiguous block:
    that keeps the allocator a high-water mark plus a heap instead of a bitmap with holes.
    Construction validates, so an ``Overlay`` value is always usable.
    """

    network: IPv4Network = field(default_factory=lambda: IPv4Network(DEFAULT_OVERLAY))
    gateway_offset: int = 1
    first_client_offset: int = 10
    ula: IPv6Network | None = None

    def __post_init__(self) -> None:
        net = self.network
        if not isinstance(net, IPv4Network):
            raise _invalid(f"overlay network must be IPv4, got {net!r}")
        if self.gateway_offset < 1:
            raise _invalid(
                f"gateway offset {self.gateway_offset} must be at least 1 "
                f"(offset 0 is the network address {net.network_address})"
            )
        if self.first_client_offset <= self.gateway_offset:
            raise _invalid(
                f"first client offset {self.first_client_offset} must be above "
                f"gateway offset {self.gateway_offset}"
            )
        if self.first_client_offset > net.num_addresses - 2:
            raise _invalid(
                f"overlay {net} leaves no room for clients: first client offset "
                f"{self.first_client_offset} but the last host is offset {net.num_addresses - 2}"
            )
        ula = self.ula
        if ula is not None:
            if not isinstance(ula, IPv6Network):
                raise _invalid(f"ULA network must be IPv6, got {ula!r}")
            if not ula.subnet_of(_ULA):
                raise _invalid(f"ULA network {ula} is not inside fc00::/7")
            if ula.num_addresses < net.num_addresses:
                raise _invalid(
                    f"ULA network {ula} is smaller than the IPv4 overlay {net}; "
                    "every IPv4 offset needs an IPv6 twin"
                )

    @classmethod
    def parse(
        cls,
        cidr: str = DEFAULT_OVERLAY,
        *,
        gateway_offset: int = 1,
        first_client_offset: int = 10,
        ula: str | None = None,
    ) -> Overlay:
        """Build an overlay from operator input, turning every mistake into INVALID_ARGUMENT."""
        try:
            parsed = ipaddress.ip_network(cidr.strip(), strict=True)
        except ValueError as exc:
            raise _invalid(f"overlay {cidr!r} is not a network in CIDR form: {exc}") from None
        if not isinstance(parsed, IPv4Network):
            raise _invalid(f"overlay {cidr!r} must be IPv4; pass the IPv6 range as the ULA")
        ula_net: IPv6Network | None = None
        if ula is not None:
            try:
                parsed6 = ipaddress.ip_network(ula.strip(), strict=True)
            except ValueError as exc:
                raise _invalid(f"ULA {ula!r} is not a network in CIDR form: {exc}") from None
            if not isinstance(parsed6, IPv6Network):
                raise _invalid(f"ULA {ula!r} must be IPv6")
            ula_net = parsed6
        return cls(
            network=parsed,
            gateway_offset=gateway_offset,
            first_client_offset=first_client_offset,
            ula=ula_net,
        )

    @property
    def gateway(self) -> IPv4Address:
        return self.network[self.gateway_offset]

    @property
    def gateway6(self) -> IPv6Address | None:
        return None if self.ula is None else self.ula[self.gateway_offset]

    @property
    def client_indices(self) -> range:
        # The last offset is the broadcast address; it is never a client.
        return range(self.first_client_offset, self.network.num_addresses - 1)

    @property
    def capacity(self) -> int:
        return len(self.client_indices)

    def is_client_index(self, index: int) -> bool:
        return index in self.client_indices

    def _check_in_network(self, index: int) -> None:
        if not 0 <= index < self.network.num_addresses:
            raise _invalid(
                f"index {index} is outside overlay {self.network} "
                f"(0..{self.network.num_addresses - 1})"
            )

    def address(self, index: int) -> IPv4Address:
        self._check_in_network(index)
        return self.network[index]

    def address6(self, index: int) -> IPv6Address | None:
        self._check_in_network(index)
        return None if self.ula is None else self.ula[index]

    def index_of(self, addr: IPv4Address | IPv6Address | str) -> int:
        """Map an address back to its index, so events and configs can be cross-checked."""
        if isinstance(addr, str):
            try:
                addr = ipaddress.ip_address(addr.strip())
            except ValueError:
                raise _invalid(f"{addr!r} is not an IP address") from None
        if isinstance(addr, IPv4Address):
            if addr not in self.network:
                raise _invalid(f"{addr} is not inside overlay {self.network}")
            return int(addr) - int(self.network.network_address)
        if self.ula is None or addr not in self.ula:
            where = "the overlay has no ULA" if self.ula is None else f"not inside {self.ula}"
            raise _invalid(f"{addr}: {where}")
        index = int(addr) - int(self.ula.network_address)
        if index >= self.network.num_addresses:
            raise _invalid(f"{addr} has no IPv4 twin in overlay {self.network}")
        return index

    def describe(self, index: int) -> str:
        """How an index is named in error details: the address an operator recognises."""
        if 0 <= index < self.network.num_addresses:
            return f"{self.network[index]} (index {index})"
        return f"index {index}"


class AddressPool:
    """Which client indices are taken, with the lowest free one always found cheaply.

    Every free index below ``_high`` is in ``_released``, a min-heap; at or above it, indices
    are free unless claimed out of order. ``claim`` and ``allocate`` both push the mark past used
    indices, so after a replay of N claims the next allocation costs O(1), not a sweep over N.
    A direct ``claim`` of an index still in the heap leaves a stale entry there; stale entries
    are dropped when they surface, which keeps ``claim`` O(1) and ``allocate``/``release``
    O(log n) amortised.
    ``_in_heap`` stops an index that is released, claimed and released again from being pushed
    twice, so the heap never outgrows the capacity.
    """

    __slots__ = ("_high", "_in_heap", "_released", "_used", "overlay")

    def __init__(self, overlay: Overlay, used: Iterable[int] = ()) -> None:
        self.overlay = overlay
        self._used: set[int] = set()
        self._released: list[int] = []
        self._in_heap: set[int] = set()
        self._high = overlay.first_client_offset
        for index in used:
            self.claim(index)

    @classmethod
    def restore(cls, overlay: Overlay, used: Iterable[int]) -> AddressPool:
        """A pool holding ``used``, built in one pass (a snapshot rather than a replay).

        The mark goes above the highest used index and every hole below it into the heap, so
        no later allocation sweeps over the used block.
        """
        pool = cls(overlay)
        taken = set(used)
        if taken:  # client indices are one range: its ends decide for everything between
            pool._check_client(min(taken))
            pool._check_client(max(taken))
        pool._used = taken
        if taken:
            pool._high = max(taken) + 1
            pool._released = [
                i for i in range(overlay.first_client_offset, pool._high) if i not in taken
            ]
            pool._in_heap = set(pool._released)
        return pool

    @property
    def used(self) -> int:
        return len(self._used)

    @property
    def free_count(self) -> int:
        return self.overlay.capacity - len(self._used)

    @property
    def capacity(self) -> int:
        return self.overlay.capacity

    def used_indices(self) -> frozenset[int]:
        return frozenset(self._used)

    def is_free(self, index: int) -> bool:
        return self.overlay.is_client_index(index) and index not in self._used

    def _check_client(self, index: int) -> None:
        ov = self.overlay
        if index in ov.client_indices:
            return
        if index == ov.gateway_offset:
            raise _invalid(f"{ov.describe(index)} is the gateway address")
        if index == 0:
            raise _invalid(f"{ov.describe(index)} is the network address")
        if index == ov.network.num_addresses - 1:
            raise _invalid(f"{ov.describe(index)} is the broadcast address")
        if 0 < index < ov.first_client_offset:
            raise _invalid(
                f"{ov.describe(index)} is reserved (clients start at offset "
                f"{ov.first_client_offset})"
            )
        raise _invalid(f"{ov.describe(index)} is outside overlay {ov.network}")

    def _drop_stale(self) -> None:
        heap = self._released
        while heap and heap[0] in self._used:
            self._in_heap.discard(heapq.heappop(heap))

    def _advance_high(self) -> None:
        end = self.overlay.client_indices.stop
        while self._high < end and self._high in self._used:
            self._high += 1

    def allocate(self) -> int:
        """Take the lowest free index: deterministic, so a replay hands out the same addresses."""
        self._drop_stale()
        if self._released:
            index = heapq.heappop(self._released)
            self._in_heap.discard(index)
        else:
            self._advance_high()
            if self._high >= self.overlay.client_indices.stop:
                raise DammError(
                    Code.POOL_EXHAUSTED,
                    f"all {self.overlay.capacity} client addresses in {self.overlay.network} "
                    "are allocated",
                )
            index = self._high
            self._high += 1
        self._used.add(index)
        return index

    def claim(self, index: int) -> None:
        """Record an index chosen elsewhere (an event being folded, a reserved candidate)."""
        self._check_client(index)
        if index in self._used:
            raise DammError(
                Code.ALREADY_EXISTS, f"{self.overlay.describe(index)} is already allocated"
            )
        self._used.add(index)
        if index == self._high:
            # A replay claims in allocation order: keep the mark at the first unused index so
            # ``peek`` never sweeps the fleet. The mark only moves up, so this is O(1) amortised.
            self._advance_high()
        elif index in self._in_heap:
            # The fold claims the address a revoke released (enrollment takes the lowest free,
            # which is the heap's top): drop it now, or ``peek`` walks every such entry ever
            # released on every enrollment group (issue 12). Each entry is popped once.
            self._drop_stale()

    def release(self, index: int) -> None:
        self._check_client(index)
        if index not in self._used:
            raise _invalid(f"{self.overlay.describe(index)} is not allocated")
        self._used.remove(index)
        # At or above the high-water mark, the sweep in _advance_high will find it again.
        if index < self._high and index not in self._in_heap:
            heapq.heappush(self._released, index)
            self._in_heap.add(index)

    def peek(self, n: int) -> list[int]:
        """The next ``n`` indices ``allocate`` would return, without taking them.

        Fewer than ``n`` come back when the pool has fewer free; the caller decides whether a
        short batch is an error. Every heap entry is below the high-water mark, so the live heap
        entries in order come first, then the sweep upward from the mark.
        """
        if n < 0:
            raise _invalid(f"cannot peek {n} indices")
        self._drop_stale()
        out: list[int] = []
        heap = self._released
        frontier: list[tuple[int, int]] = [(heap[0], 0)] if heap else []
        while frontier and len(out) < n:
            value, pos = heapq.heappop(frontier)
            if value not in self._used:
                out.append(value)
            for child in (2 * pos + 1, 2 * pos + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
        candidate = self._high
        end = self.overlay.client_indices.stop
        while len(out) < n and candidate < end:
            if candidate not in self._used:
                out.append(candidate)
            candidate += 1
        return out
