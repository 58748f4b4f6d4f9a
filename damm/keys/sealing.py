"""Secrets at rest in the event log, sealed under a key-encryption key (KEK) the operator holds.

Catalog signing seeds and the rotation key live in the log so that every control-plane replica
signs with the same key; the log is readable by anyone with stream access, so a seed is only
ever stored sealed. The KEK never enters the log: the operator provides it (``DAMM_KEK`` or
``DAMM_KEK_FILE``), or plugs in a KMS by passing any object with ``kek_id``, ``seal`` and
``unseal`` (``KeyEncryptionKey``) in the control plane's settings.

``kek_id`` is recorded next to every sealed value, so a replica started with another KEK is
refused with ``kek_mismatch`` before it signs anything, rather than inventing its own keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import nacl.exceptions
import nacl.secret

from damm.errors import Code, DammError

KEK_BYTES = nacl.secret.SecretBox.KEY_SIZE


class KeyEncryptionKey(Protocol):
    """The KMS hook: a local key (``LocalKek``) or a client of a key-management service."""

    @property
    def kek_id(self) -> str: ...

    def seal(self, plaintext: bytes) -> bytes: ...

    def unseal(self, sealed: bytes) -> bytes: ...


class LocalKek:
    """A 32-byte KEK held in this process; XSalsa20-Poly1305 (PyNaCl's SecretBox)."""

    __slots__ = ("_box", "kek_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEK_BYTES:
            raise DammError(
                Code.INVALID_ARGUMENT, f"the KEK must be {KEK_BYTES} bytes, not {len(key)}"
            )
        self._box = nacl.secret.SecretBox(key)
        # Names the KEK without revealing it: a keyed hash of a constant, not of the key's bytes.
        self.kek_id = hashlib.blake2b(b"damm-kek-id", key=key, digest_size=8).hexdigest()

    @classmethod
    def generate(cls) -> LocalKek:
        return cls(os.urandom(KEK_BYTES))

    def __repr__(self) -> str:
        return f"LocalKek(kek_id={self.kek_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("LocalKek holds a key-encryption key and cannot be pickled")

    def seal(self, plaintext: bytes) -> bytes:
        return bytes(self._box.encrypt(plaintext))

    def unseal(self, sealed: bytes) -> bytes:
        try:
            return bytes(self._box.decrypt(sealed))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise DammError(
                Code.KEK_MISMATCH, f"a sealed key does not open under KEK {self.kek_id}"
            ) from None


def kek_from_env(environ: Mapping[str, str]) -> LocalKek | None:
    """``DAMM_KEK`` (base64) or ``DAMM_KEK_FILE`` (a 0600 file: raw 32 bytes or base64)."""
    inline = environ.get("DAMM_KEK")
    if inline:
        return LocalKek(_decode(inline.strip().encode(), "DAMM_KEK"))
    path = environ.get("DAMM_KEK_FILE")
    if path:
        return LocalKek(_decode(_read_private(Path(path)), path))
    return None


def _decode(value: bytes, where: str) -> bytes:
    if len(value) == KEK_BYTES:
        return value
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise DammError(Code.INVALID_ARGUMENT, f"{where}: the KEK is not base64") from None
    if len(raw) != KEK_BYTES:
        raise DammError(
            Code.INVALID_ARGUMENT, f"{where}: the KEK must be {KEK_BYTES} bytes, not {len(raw)}"
        )
    return raw


def _read_private(path: Path) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DammError(Code.KEK_MISSING, f"DAMM_KEK_FILE {path} does not exist") from None
    except OSError as exc:
        raise DammError(Code.INVALID_ARGUMENT, f"cannot open KEK {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o077:
            raise DammError(
                Code.INVALID_ARGUMENT,
                f"KEK {path} has mode {stat.S_IMODE(mode):04o}, readable beyond its owner "
                f"(fix with: chmod 600 {path})",
            )
        return os.read(fd, 4096)
    finally:
        os.close(fd)
