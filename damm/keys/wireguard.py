"""WireGuard keys: the one place that decides what a valid key is and how it is spelled.

DAMM speaks canonical base64 (what wg(8) prints); the userspace API speaks hex. Errors never echo
a key's value: it may be a private one.
"""

from __future__ import annotations

import base64
import binascii
import re

from nacl.bindings import crypto_scalarmult_base

from damm.errors import Code, DammError

KEY_BYTES = 32
KEY_B64_LEN = 44

_P = 2**255 - 19
# The X25519 points of small order (Bernstein, "Curve25519: new Diffie-Hellman speed records",
# and the list libsodium checks in has_small_order): 0 and 1, the two points of order 8, and
# p-1 (order 2). Their non-canonical spellings p, p+1 (and 2p-1.. above) are refused as u >= p.
# With such a "public key" every shared secret is the same known value, so WireGuard's handshake
# with it proves nothing; a gateway must never be handed one.
SMALL_ORDER_U = frozenset(
    {
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P - 1,
    }
)


def key_bytes(key_b64: str) -> bytes:
    """The 32 bytes of a base64 key, or MALFORMED_KEY."""
    try:
        raw = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise DammError(Code.MALFORMED_KEY, "not standard base64") from None
    if len(raw) != KEY_BYTES:
        raise DammError(Code.MALFORMED_KEY, f"decodes to {len(raw)} bytes, not {KEY_BYTES}")
    return raw


def public_key_of(private_b64: str) -> str:
    return base64.b64encode(crypto_scalarmult_base(key_bytes(private_b64))).decode("ascii")


# Canonical base64 of 32 bytes: 43 characters whose last carries 4 zero padding bits, then "=".
_CANONICAL_KEY = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=", re.ASCII)


def validate_public_key(key: str) -> str:
    """Return the key unchanged if it is the canonical base64 of a usable X25519 public key.

    Everywhere a public key enters from outside. Private keys are any 32 bytes: check those
    with ``validate_key_spelling``.
    """
    raw = base64.b64decode(validate_key_spelling(key))
    u = int.from_bytes(raw, "little")
    if u >= _P:  # the top bit (ignored by X25519) or u in [p, 2^255): a second spelling of a key
        raise DammError(Code.MALFORMED_KEY, "not a canonical curve25519 u-coordinate")
    if u in SMALL_ORDER_U:
        raise DammError(Code.MALFORMED_KEY, "a low-order curve25519 point")
    return key


def validate_key_spelling(key: str) -> str:
    """Return the key unchanged if it is the canonical base64 of 32 bytes.

    Non-canonical spellings (other padding bits, missing ``=``) are refused rather than
    normalised: two strings for one key would look like two peers to the diff.
    """
    if isinstance(key, str) and _CANONICAL_KEY.fullmatch(key):
        return key  # the common case, without decoding: a 50k-peer set validates in milliseconds
    if not isinstance(key, str) or len(key) != KEY_B64_LEN:
        raise DammError(Code.MALFORMED_KEY, f"expected {KEY_B64_LEN} base64 characters")
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DammError(Code.MALFORMED_KEY, "not standard base64") from exc
    if len(raw) != KEY_BYTES:
        raise DammError(Code.MALFORMED_KEY, f"decodes to {len(raw)} bytes, not {KEY_BYTES}")
    if base64.b64encode(raw).decode("ascii") != key:
        raise DammError(Code.MALFORMED_KEY, "non-canonical base64 encoding")
    return key


def key_to_hex(key: str) -> str:
    """The userspace API speaks hex keys; the rest of DAMM speaks base64."""
    return base64.b64decode(validate_key_spelling(key)).hex()


def hex_to_key(hex_key: str) -> str:
    """Inverse of ``key_to_hex``, for keys read back from the userspace API."""
    try:
        raw = bytes.fromhex(hex_key)
    except ValueError as exc:
        raise DammError(Code.MALFORMED_KEY, "not hex") from exc
    if len(raw) != KEY_BYTES:
        raise DammError(Code.MALFORMED_KEY, f"hex key is {len(raw)} bytes, not {KEY_BYTES}")
    return base64.b64encode(raw).decode("ascii")
