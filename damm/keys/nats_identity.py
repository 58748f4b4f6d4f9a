"""NATS identities: nkeys (Ed25519) made at the edge, and the JWTs NATS auth callout exchanges.

A device's identity is an nkey user seed made on the device at enrollment; only its public key
ever leaves. A WireGuard key cannot sign, so it cannot prove who is connecting. The JWTs here
are the few claims the server's auth callout reads: the server's authorization request, our
answer, and the user claims (account and permissions) inside that answer.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import re
from typing import Any, TypeVar

import msgspec
import nacl.bindings
import nacl.exceptions
import nacl.signing
import nkeys  # type: ignore[import-untyped]

_HEADER_BYTES = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ed25519-nkey"}').rstrip(b"=")
_HEADER = _HEADER_BYTES.decode("ascii")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict[str, Any]).decode

_B32_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
# Two base32 characters per 10 bits: the standard library's base32 is a Python loop.
_B32_PAIRS = [a + b for a in _B32_ALPHABET for b in _B32_ALPHABET]
# RFC 4648's alphabet onto the digits int(…, 32) reads.
_B32_TO_DIGITS = str.maketrans(_B32_ALPHABET, "0123456789abcdefghijklmnopqrstuv")
_B32_KEY = re.compile(r"[A-Z2-7]{56}")
_B32_SEED = re.compile(rb"[A-Z2-7]{57}[AEIMQUY4]")  # the last 2 bits are zero
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")
_STD_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


T = TypeVar("T")


class IdentityError(Exception):
    """A key, signature or token that does not verify."""


def new_user_seed() -> bytes:
    """A fresh nkey user seed (``SU…``), made from the OS's randomness."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def new_account_seed() -> bytes:
    """A fresh nkey account seed (``SA…``): the auth callout's issuer signs with it."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT))


def _crc16(data: bytes) -> bytes:
    """nkeys' checksum (CRC-16/XMODEM, little-endian), in C rather than nkeys' Python loop."""
    return binascii.crc_hqx(data, 0).to_bytes(2, "little")


def b32encode(data: bytes) -> str:
    """Base32 (RFC 4648) without padding, as nkeys and NATS's ``jti`` spell bytes."""
    pad = -len(data) % 5
    bits = (len(data) + pad) * 8
    n = int.from_bytes(data + b"\0" * pad, "big")
    text = "".join([_B32_PAIRS[(n >> shift) & 1023] for shift in range(bits - 10, -1, -10)])
    return text[: (len(data) * 8 + 4) // 5]


def b32decode_key(text: str) -> bytes | None:
    """The 35 bytes of a 56-character nkey (prefix, key, checksum); None if it is not one."""
    if not _B32_KEY.fullmatch(text):
        return None
    return int(text.translate(_B32_TO_DIGITS), 32).to_bytes(35, "big")


def _keypair(seed: bytes) -> tuple[str, bytes]:
    """The public nkey of ``seed`` and its Ed25519 secret key, as ``nkeys`` derives them but
    without its pure-Python base32 and checksum: a device derives them at every connection."""
    text = bytes(seed).strip()
    if not _B32_SEED.fullmatch(text):
        raise IdentityError("not an nkey seed: not base32")
    # 58 characters carry 290 bits: the seed's 36 bytes and two zero bits.
    raw = (int(text.decode("ascii").translate(_B32_TO_DIGITS), 32) >> 2).to_bytes(36, "big")
    body = raw[:-2]
    if _crc16(body) != raw[-2:] or body[0] & 0xF8 != nkeys.PREFIX_BYTE_SEED:
        raise IdentityError("not an nkey seed")
    role = ((body[0] & 0x07) << 5) | ((body[1] & 0xF8) >> 3)
    verify_key, secret = nacl.bindings.crypto_sign_seed_keypair(body[2:])
    public = bytes([role]) + verify_key
    return b32encode(public + _crc16(public)), secret


def public_key(seed: bytes) -> str:
    """The public nkey of ``seed``, as ``nkeys`` derives it."""
    return _keypair(seed)[0]


def as_user_key(public: str) -> str:
    """The same Ed25519 key as an nkey *user* key (``U…``)."""
    raw = base64.b32decode(public)[1:-2]
    body = bytes([nkeys.PREFIX_BYTE_USER]) + raw
    return base64.b32encode(body + bytes(nkeys.crc16_checksum(body))).decode("ascii")


def is_user_key(value: str) -> bool:
    return _valid_public(value, "U")


def _valid_public(value: str, role: str) -> bool:
    raw = b32decode_key(value) if value.startswith(role) else None
    return raw is not None and raw[-2:] == _crc16(raw[:-2])


@functools.lru_cache(maxsize=4096)
def _verify_key(public: str) -> bytes | None:
    """The raw Ed25519 key of a user, server or account nkey (devices reconnect under the same
    key, so parsed once); None if ``public`` is not one."""
    if public[:1] not in ("U", "N", "A"):
        return None
    raw = b32decode_key(public)
    if raw is None or raw[-2:] != _crc16(raw[:-2]):
        return None
    return raw[1:-2]


def verify(public: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``data`` was made by the holder of ``public``'s seed."""
    key = _verify_key(public)
    if key is None or len(signature) != nacl.bindings.crypto_sign_BYTES:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + data, key)
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


def verify_nonce(public: str, nonce: str, signature_b64: str) -> bool:
    """The proof a client sends at CONNECT: its key's signature over the server's nonce."""
    try:
        signature = _unb64(signature_b64.encode("ascii").translate(_STD_TO_URLSAFE))
    except ValueError:
        return False
    return verify(public, nonce.encode(), signature)


def _b64(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False).translate(_STD_TO_URLSAFE).rstrip(b"=")


def _unb64(text: str | bytes) -> bytes:
    raw = text.encode("ascii") if isinstance(text, str) else text
    padded = raw.translate(_URLSAFE_TO_STD) + b"=" * (-len(raw) % 4)
    return binascii.a2b_base64(padded, strict_mode=True)


class Signer:
    """An nkey ready to sign: deriving it from the seed costs more than signing, so once."""

    def __init__(self, seed: bytes) -> None:
        self.public, self._secret = _keypair(seed)

    def sign(self, data: bytes) -> bytes:
        return nacl.bindings.crypto_sign(data, self._secret)[: nacl.bindings.crypto_sign_BYTES]


def encode_jwt(claims: dict[str, Any], signer: Signer | bytes) -> str:
    """Sign ``claims`` as NATS does: ``jti`` is the hash of the claims, ``iss`` the signer."""
    key = signer if isinstance(signer, Signer) else Signer(signer)
    unsigned = _encode({**claims, "iss": key.public, "jti": ""})
    # The claims end in "jti":""}: its hash goes between the quotes, not through a 2nd encode.
    jti = b32encode(hashlib.sha256(unsigned).digest()).encode("ascii")
    signed = _HEADER_BYTES + b"." + _b64(unsigned[:-2] + jti + b'"}')
    return (signed + b"." + _b64(key.sign(signed))).decode("ascii")


def unverified_claims(token: str | bytes, claims_type: type[T]) -> T:
    """A JWT's claims, typed, its signature not checked. Only for the server's authorization
    requests: they arrive on a subject only the server and DAMM's own users may publish to, and
    are signed by a per-server key nobody vouches for, so checking the signature against the
    token's own ``iss`` would prove nothing about who sent it (and cost an Ed25519 verify per
    connection). The client's own proof, its signature over the nonce, is checked."""
    try:
        parts = (token.encode("ascii") if isinstance(token, str) else token).split(b".")
    except UnicodeEncodeError:
        raise IdentityError("not a JWT") from None
    if len(parts) != 3:
        raise IdentityError("not a JWT")
    try:
        return msgspec.json.decode(_unb64(parts[1]), type=claims_type)
    except (ValueError, msgspec.DecodeError):
        raise IdentityError("not a JWT") from None


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT whose signature verifies against its own ``iss`` key."""
    parts = token.split(".")
    if len(parts) != 3:
        raise IdentityError("not a JWT")
    try:
        claims = _decode(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, msgspec.DecodeError):
        raise IdentityError("not a JWT") from None
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not verify(
        issuer, f"{parts[0]}.{parts[1]}".encode("ascii"), signature
    ):
        raise IdentityError("JWT signature does not verify")
    return claims
