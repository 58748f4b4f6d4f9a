"""WireGuard backends behind one small interface (``base.WireGuardBackend``).

``uapi`` talks to userspace implementations (wireguard-go, boringtun) over their socket,
``kernel`` to the Linux module over generic netlink, ``memory`` stands in for both in unit tests.
"""

from damm.wireguard.base import (
    InterfaceState,
    PeerStats,
    WireGuardBackend,
    WireGuardError,
    reconcile,
)

__all__ = ["InterfaceState", "PeerStats", "WireGuardBackend", "WireGuardError", "reconcile"]
