"""The control plane's side of catalogs: build one from healthy gateways, sign it.

The signing key is the root of trust for every device's failover, so it is handled like a device
private key: created with mode 0600 and never readable by anyone else even for an instant, never
loaded from a file others can read, never printed.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import nacl.signing

from damm.catalog.codec import canonical, canonical_encode, check_catalog, decode, key_id_for
from damm.catalog.model import Catalog, CatalogGateway, KeyAnnouncement, SignedCatalog
from damm.errors import Code, DammError

SEED_BYTES = 32

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
        """Load the seed at `path`, or create one there if there is none.

        Two processes racing to create both end up with the same key: the seed is written to a
        private temporary file and linked into place, which fails if another process won.
        """
        path = Path(path)
        try:
            return cls.from_seed(_read_private_seed(path))
        except FileNotFoundError:
            pass
        signer = cls.generate()
        try:
            _create_private_file(path, bytes(signer._key))
        except FileExistsError:
            return cls.from_seed(_read_private_seed(path))
        return signer

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


def _read_private_seed(path: Path) -> bytes:
    # O_NOFOLLOW: a symlink planted at the key path must not redirect us to another file.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        reason = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise DammError(
            Code.INVALID_ARGUMENT, f"cannot open signing key {path}: {reason}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DammError(Code.INVALID_ARGUMENT, f"signing key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise DammError(
                Code.INVALID_ARGUMENT,
                f"signing key {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable beyond its "
                f"owner; refusing to use it (fix with: chmod 600 {path}, then rotate the key)",
            )
        seed = os.read(fd, SEED_BYTES + 1)
    finally:
        os.close(fd)
    if len(seed) != SEED_BYTES:
        raise DammError(
            Code.INVALID_ARGUMENT,
            f"signing key {path} holds {len(seed)} bytes, expected a {SEED_BYTES}-byte seed",
        )
    return seed


def _create_private_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise DammError(
            Code.INVALID_ARGUMENT, f"cannot create signing key {path}: {exc.strerror}"
        ) from None
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only narrow the mode, but be explicit
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # atomic, and refuses to replace a key that appeared meanwhile
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
