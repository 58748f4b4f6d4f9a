"""The control plane's side of catalogs: build one from healthy gateways, sign it.

The signing key is the root of trust for every device's failover, so it is handled like a device
private key: created with mode 0600 and never readable by anyone else even for an instant, never
loaded from a file others can read, never printed.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import nacl.signing

from damm.catalog.canonical import canonical, canonical_encode, check_catalog, decode, key_id_for
from damm.catalog.document import Catalog, CatalogGateway, KeyAnnouncement, SignedCatalog
from damm.errors import Code, DammError
from damm.private_files import SEED_BYTES, load_or_create_seed

# The key signs SIGNING_CONTEXT || SHA-512(payload), not the payload itself.
# - The context means a catalog signature can never pass as a signature over anything else the
#   same key might sign one day (and vice versa).
# - Hash-then-sign (as minisign does for large files) halves the device's verify cost on a
#   300 KiB catalog: OpenSSL's SHA-512 via hashlib is twice as fast as the one inside libsodium's
#   crypto_sign_open, which also copies the whole message twice. SHA-512 is Ed25519's own hash,
#   so security rests on the same assumption as before. A browser can check it with WebCrypto:
#   digest("SHA-512", payload), then Ed25519 verify over context || digest.
SIGNING_CONTEXT = b"damm.catalog.v1\x00"


def signing_message(payload: bytes) -> bytes:
    return SIGNING_CONTEXT + hashlib.sha512(payload).digest()


class CatalogSigner:
    __slots__ = ("_key", "key_id", "public_key_b64")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._key = signing_key
        public_key = bytes(signing_key.verify_key)
        self.key_id = key_id_for(public_key)
        self.public_key_b64 = base64.b64encode(public_key).decode("ascii")

    def __repr__(self) -> str:
        return f"CatalogSigner(key_id={self.key_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        # Pickling would copy the seed somewhere nobody decided it should go.
        raise TypeError("CatalogSigner holds a private key and cannot be pickled")

    @classmethod
    def generate(cls) -> CatalogSigner:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> CatalogSigner:
        if len(seed) != SEED_BYTES:
            raise DammError(Code.INVALID_ARGUMENT, f"signing seed must be {SEED_BYTES} bytes")
        return cls(nacl.signing.SigningKey(seed))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> CatalogSigner:
        """Load the seed at `path`, or create one there if there is none (race-safe)."""
        return cls.from_seed(load_or_create_seed(Path(path), "signing key"))

    def announcement(self, not_before: int = 0) -> KeyAnnouncement:
        """How another (current) key vouches for this one in a catalog's `next_keys`."""
        return KeyAnnouncement(
            key_id=self.key_id, public_key=self.public_key_b64, not_before=not_before
        )

    def sign(self, catalog: Catalog) -> SignedCatalog:
        """Sign the canonical encoding, after checking every client would accept its content:
        signing a catalog the devices then refuse would break failover for a whole region."""
        payload = canonical_encode(catalog)
        try:
            check_catalog(decode(payload))
        except DammError as exc:
            raise DammError(Code.INVALID_ARGUMENT, f"refusing to sign: {exc.detail}") from None
        signature = self._key.sign(signing_message(payload)).signature
        return SignedCatalog(payload=payload, key_id=self.key_id, signature=signature)


def build_catalog(
    region: str,
    gateways: Iterable[CatalogGateway],
    *,
    version: int,
    now: int,
    ttl_seconds: int,
    next_keys: Iterable[KeyAnnouncement] = (),
) -> Catalog:
    """Filters nothing (health is the caller's decision, from heartbeat evidence) but puts every
    collection in canonical order, so equal inputs give byte-equal signed payloads."""
    if ttl_seconds <= 0:
        raise DammError(Code.INVALID_ARGUMENT, f"catalog ttl must be positive, not {ttl_seconds}")
    if version < 0 or now < 0:
        raise DammError(Code.INVALID_ARGUMENT, "catalog version and time must not be negative")
    return canonical(
        Catalog(
            region=region,
            version=version,
            issued_at=now,
            expires_at=now + ttl_seconds,
            gateways=tuple(gateways),
            next_keys=tuple(next_keys),
        )
    )
