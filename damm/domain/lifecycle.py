"""A device's lifecycle: one transition function for every reader of the log.

The decision fold, the audit's "device as of" view and the read-model SQL must agree on what an
event does to a device's status; they all follow ``transition`` (the SQL is tested against it).
A revoked device stays revoked with its original reason: history is not rewritten by a second
revoke, and a suspend or resume after a revoke changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from damm.events import model as m

DeviceStatus = Literal["active", "suspended", "revoked"]

# Reasons the control plane itself gives; an operator's reason is free text.
OVER_QUOTA: Final = "over_quota"
KEY_EXPIRED: Final = "key_expired"
KEY_ROTATED: Final = "key_rotated"

LIFECYCLE_EVENTS = (
    m.DeviceEnrolled,
    m.DeviceSuspended,
    m.DeviceResumed,
    m.DeviceRevoked,
    m.DeviceKeyRotated,
)


@dataclass(frozen=True, slots=True)
class Lifecycle:
    status: DeviceStatus
    reason: str = ""


def transition(current: Lifecycle | None, event: m.Event) -> Lifecycle | None:
    """The device's lifecycle after ``event``; ``None`` while it has not enrolled."""
    match event:
        case m.DeviceEnrolled():
            return current or Lifecycle("active")
        case _ if current is None or current.status == "revoked":
            return current
        case m.DeviceRevoked():
            return Lifecycle("revoked", event.reason)
        case m.DeviceSuspended():
            return Lifecycle("suspended", event.reason)
        case m.DeviceResumed():
            return Lifecycle("active", event.reason)
        case m.DeviceKeyRotated() if current == Lifecycle("suspended", KEY_EXPIRED):
            return Lifecycle("active", KEY_ROTATED)
        case _:
            return current
