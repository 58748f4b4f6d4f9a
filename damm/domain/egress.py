"""Which address of an egress pool a device's traffic leaves from, and how full a pool is.

The choice is made once, at enrollment, and recorded in ``device.enrolled``: every replica then
reads the same address from the log instead of re-deriving it from a fleet that has moved on.
The rule is "fewest devices already on that address, then the lowest address", so a pool's
addresses fill evenly and two replicas given the same counts pick the same one.

A pool's load is its share of capacity in use, the larger of two measures, both from the log:
devices assigned over addresses times how many devices one address carries (one IPv4 source
address has about 64k ports to share out), and, when the operator declared a transfer allowance
per address for the usage period, the bytes its devices moved this period over that allowance.
Nobody types a load in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from damm.errors import Code, DammError

# A /22 of public addresses is already a large pool; past this an inventory is likely a typo
# (a /8 would be 16 million rules).
MAX_POOL_ADDRESSES = 1024
DEVICES_PER_ADDRESS = 128


def addresses(ips: Sequence[str]) -> tuple[str, ...]:
    """The pool's IPv4 source addresses, in address order: a host route as is, a network's hosts.

    IPv6 ranges are kept in the inventory but not used as SNAT sources yet.
    """
    out: set[ipaddress.IPv4Address] = set()
    for value in ips:
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise DammError(Code.INVALID_ARGUMENT, f"egress IP {value!r}") from None
        if not isinstance(net, ipaddress.IPv4Network):
            continue
        if net.num_addresses > MAX_POOL_ADDRESSES:
            raise DammError(
                Code.INVALID_ARGUMENT,
                f"egress range {net} has {net.num_addresses} addresses; at most "
                f"{MAX_POOL_ADDRESSES} per pool",
            )
        out.update(net.hosts() if net.prefixlen < 31 else net)
        if len(out) > MAX_POOL_ADDRESSES:
            raise DammError(
                Code.INVALID_ARGUMENT, f"egress pool has more than {MAX_POOL_ADDRESSES} addresses"
            )
    return tuple(str(a) for a in sorted(out))


def assign(pool_addresses: Sequence[str], in_use: Mapping[str, int]) -> str | None:
    """The address a new device gets: the least used, then the lowest. None for an empty pool."""
    best: tuple[int, int, str] | None = None
    for position, address in enumerate(pool_addresses):
        key = (in_use.get(address, 0), position, address)
        if best is None or key < best:
            best = key
    return best[2] if best else None


def orphaned(new_addresses: Sequence[str], in_use: Mapping[str, int]) -> tuple[str, ...]:
    """Addresses still carrying devices that a redefinition of the pool would drop."""
    keep = set(new_addresses)
    return tuple(sorted(a for a, n in in_use.items() if n > 0 and a not in keep))


def load(assigned: int, address_count: int, per_address: int = DEVICES_PER_ADDRESS) -> float:
    """Share of the pool's device capacity in use, 0..1; a pool without addresses is full."""
    if address_count <= 0 or per_address <= 0:
        return 1.0
    return min(1.0, max(0, assigned) / (address_count * per_address))


def traffic_load(moved: int, address_count: int, transfer_per_address: int | None) -> float:
    """Share of the period's transfer allowance used, 0..1; 0 when no allowance is declared."""
    if not transfer_per_address:
        return 0.0
    if address_count <= 0:
        return 1.0
    return min(1.0, max(0, moved) / (address_count * transfer_per_address))


def pool_load(
    assigned: int,
    moved: int,
    address_count: int,
    per_address: int = DEVICES_PER_ADDRESS,
    transfer_per_address: int | None = None,
) -> float:
    """The figure placement and the report use: whichever capacity is closer to running out."""
    return max(
        load(assigned, address_count, per_address),
        traffic_load(moved, address_count, transfer_per_address),
    )
