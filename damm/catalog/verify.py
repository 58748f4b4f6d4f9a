"""The device's side of catalogs: decide whether to believe one, and what it changes.

The order of checks is the TUF order and matters: the signature is checked over the raw payload
bytes before anything is decoded, so bytes from an untrusted network never reach the decoder
unless a pinned key vouched for them. Freshness and version are checked on the decoded content
only because they need it.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Iterable

import msgspec
import nacl.exceptions
import nacl.signing

from damm.catalog.canonical import (
    KNOWN_TRANSPORTS,
    check_front_door,
    check_gateway,
    decode,
    front_door_order,
    key_id_for,
)
from damm.catalog.document import (
    Catalog,
    CatalogFrontDoor,
    KeyAnnouncement,
    SignedCatalog,
    decode_signed,
)
from damm.catalog.signing import signing_message
from damm.errors import Code, DammError


class TrustState(msgspec.Struct, frozen=True):
    """What a device believes about catalogs, persisted in its state file between runs.

    `pinned` maps key id to base64 Ed25519 public key. `min_version` is the version of the last
    catalog accepted: anything older is a replay. Not forbid_unknown_fields: a newer CLI may add
    fields to the state file and an older one must still read it.
    """

    pinned: dict[str, str]
    min_version: int
    region: str


def initial_trust(
    region: str,
    key_id: str,
    public_key_b64: str,
    min_version: int = 0,
    next_keys: Iterable[KeyAnnouncement] = (),
) -> TrustState:
    """The trust a device starts from at enrollment: the signing key and any announced next key.
    Each key id must be the one its key implies, so a tampered enrollment reply cannot pin a key
    under another key's name."""
    pinned: dict[str, str] = {}
    for kid, key in ((key_id, public_key_b64), *((k.key_id, k.public_key) for k in next_keys)):
        if key_id_for(_public_key_bytes(key, Code.INVALID_ARGUMENT)) != kid:
            raise DammError(Code.INVALID_ARGUMENT, f"key id {kid} does not match the public key")
        pinned[kid] = key
    return TrustState(pinned=pinned, min_version=min_version, region=region)


def verify(
    signed: SignedCatalog | bytes,
    trust: TrustState,
    *,
    now: int,
    skew_seconds: int = 60,
) -> tuple[Catalog, TrustState]:
    """Accept a catalog or raise; on success return it with the trust state it implies.

    The returned state pins every key the catalog announces: rotation is key 1 vouching for key 2
    inside a catalog key 1 signed, so a device only trusts key 2 after seeing that. A key is
    pinned as soon as it is announced, whatever its `not_before` (which tells operators when the
    signer switches): a device that was offline across the switch must still accept key 2. The
    input state is never modified; the caller persists the returned one (atomically) or nothing.
    """
    if isinstance(signed, bytes):
        signed = decode_signed(signed)

    public_key_b64 = trust.pinned.get(signed.key_id)
    if public_key_b64 is None:
        raise DammError(
            Code.CATALOG_UNKNOWN_KEY,
            f"key {signed.key_id} is not pinned (pinned: {', '.join(sorted(trust.pinned)) or '-'})",
        )
    try:
        _verify_key(public_key_b64).verify(signing_message(signed.payload), signed.signature)
    except nacl.exceptions.BadSignatureError:
        raise DammError(
            Code.CATALOG_BAD_SIGNATURE, f"signature by key {signed.key_id} does not verify"
        ) from None

    catalog = decode(signed.payload)
    if catalog.region != trust.region:
        # A validly signed catalog for another region would point the device at gateways it was
        # never placed on; refuse rather than follow it.
        raise DammError(
            Code.INVALID_ARGUMENT,
            f"catalog is for region {catalog.region!r}, device is in {trust.region!r}",
        )
    if catalog.expires_at + skew_seconds < now:
        raise DammError(
            Code.CATALOG_STALE,
            f"version {catalog.version} expired at {catalog.expires_at}, now is {now}",
        )
    if catalog.issued_at - skew_seconds > now:
        raise DammError(
            Code.CATALOG_STALE,
            f"version {catalog.version} is issued at {catalog.issued_at}, in the future "
            f"(now is {now}); check the device clock",
        )
    if catalog.version < trust.min_version:
        raise DammError(
            Code.CATALOG_ROLLBACK,
            f"version {catalog.version} is older than accepted version {trust.min_version}",
        )

    pinned = dict(trust.pinned)
    for announcement in catalog.next_keys:
        pinned.setdefault(announcement.key_id, announcement.public_key)
    return catalog, msgspec.structs.replace(trust, pinned=pinned, min_version=catalog.version)


def choose_failover(catalog: Catalog, gateway_id: str, current_endpoint: str) -> CatalogFrontDoor:
    """The front door to move to when the current one stops answering.

    The next one after the current in priority order, wrapping around, so repeated failovers
    cycle through every door rather than bouncing between the top two. If the current endpoint
    is no longer listed, start from the most preferred door. Doors with a transport this client
    cannot speak are skipped, and the chosen door is checked character by character because its
    endpoint is about to be written into a wg-quick file.
    """
    gateway = next((g for g in catalog.gateways if g.id == gateway_id), None)
    if gateway is None:
        raise DammError(Code.CATALOG_NO_GATEWAY, f"gateway {gateway_id} is not in the catalog")
    check_gateway(gateway)

    current = current_endpoint.strip()
    usable = (fd for fd in gateway.front_doors if fd.transport in KNOWN_TRANSPORTS)
    doors = sorted(usable, key=front_door_order)
    positions = [i for i, fd in enumerate(doors) if fd.endpoint == current]
    start = positions[-1] + 1 if positions else 0
    for offset in range(len(doors)):
        candidate = doors[(start + offset) % len(doors)]
        if candidate.endpoint != current:
            check_front_door(candidate)
            return candidate
    raise DammError(
        Code.NO_ALTERNATE_FRONT_DOOR,
        f"gateway {gateway_id} has no front door other than {current or '-'}",
    )


@functools.lru_cache(maxsize=16)
def _verify_key(public_key_b64: str) -> nacl.signing.VerifyKey:
    return nacl.signing.VerifyKey(_public_key_bytes(public_key_b64, Code.CATALOG_UNKNOWN_KEY))


def _public_key_bytes(public_key_b64: str, code: Code) -> bytes:
    try:
        public_key = base64.b64decode(public_key_b64, validate=True)
    except (binascii.Error, ValueError):
        public_key = b""
    if len(public_key) != 32:
        raise DammError(code, "the catalog key is not a base64 Ed25519 public key")
    return public_key
