"""Subject names: one per aggregate for events, one per command for requests.

Aggregate ids become subject tokens, so they are restricted to a safe alphabet here, once.
"""

from __future__ import annotations

import hashlib
import re

from damm.errors import Code, DammError

SNAPSHOT_BUCKET = "damm-snapshots"  # object store of decision-state snapshots
LEASE_BUCKET = "damm_leader"  # key-value bucket of the leader lease (control/leadership.py)
EVENTS_STREAM = "DAMM_EVENTS"
TELEMETRY_STREAM = "DAMM_TELEMETRY"
EVENT_PREFIX = "damm.evt"
TELEMETRY_PREFIX = "damm.tel"
REQUEST_PREFIX = "damm.req"
PEERS_PREFIX = "damm.peers"
GATEWAY_REPLY_PREFIX = "damm.gwr"  # answers to a gateway, on subjects only it may read

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_id(value: str, what: str = "id") -> str:
    if not _ID.fullmatch(value):
        raise DammError(Code.INVALID_ARGUMENT, f"{what} {value!r} must be 1-64 of A-Z a-z 0-9 _ -")
    return value


def aggregate(kind: str, ident: str) -> str:
    return f"{kind}/{ident}"


def event_subject(kind: str, ident: str) -> str:
    return f"{EVENT_PREFIX}.{kind}.{check_id(ident)}"


# Catalog signing keys and the rotation key: one subject each, so every change to a keyring is
# appended with the expectation of the one before it.
CATALOG_KEYRING = f"{EVENT_PREFIX}.keyring.catalog"
ROTATION_KEYRING = f"{EVENT_PREFIX}.keyring.rotation"
# Every catalog publication and every leader term marker: a publication expects the last
# sequence of the whole family, so a new term's marker fences out the previous leader.
CATALOG_FAMILY = f"{EVENT_PREFIX}.catalog.>"
LEADER_TERM_SUBJECT = f"{EVENT_PREFIX}.catalog.leader.term"  # two tokens: never a region's

DEFAULT_POOL = "default"  # the overlay's one address pool


def key_subject(public_key: str) -> str:
    """A key's binding to a device: hashed, since a base64 key is not a subject token."""
    return event_subject("key", hashlib.sha256(public_key.encode()).hexdigest()[:40])


def address_subject(index: int, pool: str = DEFAULT_POOL) -> str:
    """One subject per address, so two writers cannot both allocate it."""
    return event_subject("ipam", f"{pool}-{index}")


def usage_subject(gateway_id: str) -> str:
    return event_subject("usage", gateway_id)


def usage_reset_subject(device_id: str) -> str:
    return event_subject("usage", f"reset-{device_id}")


def heartbeat_subject(gateway_id: str) -> str:
    return f"{TELEMETRY_PREFIX}.heartbeat.{check_id(gateway_id)}"


def request_subject(command: str) -> str:
    return f"{REQUEST_PREFIX}.{command}"


def peers_subject(gateway_id: str) -> str:
    return f"{PEERS_PREFIX}.{check_id(gateway_id)}"


def inbox_prefix(user: str) -> str:
    """The reply inbox of an authenticated user; devices keep the shared ``_INBOX``."""
    return f"_INBOX_{user}"


GATEWAY_USER_PREFIX = "gw-"


def gateway_user(gateway_id: str) -> str:
    """A gateway's NATS user name."""
    return f"{GATEWAY_USER_PREFIX}{gateway_id}"


def gateway_reply_prefix(gateway_id: str) -> str:
    """Where the control plane answers a gateway's requests, whatever reply subject it named:
    ``<prefix>.<token>``, the token from the request's ``Damm-Reply-Token`` header."""
    return f"{GATEWAY_REPLY_PREFIX}.{check_id(gateway_id)}"
