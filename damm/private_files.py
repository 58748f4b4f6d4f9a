"""Private files, the one way DAMM writes them: mode 0600 from the first byte, whole or absent.

``write_atomic`` writes any of them (configs, state, ledgers). Two key shapes live here too:
- raw 32-byte seeds (the catalog signing key, the rotation key), created race-safe: written to
  a private temporary file and linked into place, so two processes starting at once end up
  with the same key and a crash never leaves a short one;
- base64 WireGuard keys (a device's, a gateway's), as ``wg genkey`` writes them.

A file readable by group or others is refused rather than used: it may already have leaked.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import stat
from pathlib import Path

from nacl.public import PrivateKey

from damm.errors import Code, DammError

SEED_BYTES = 32


def write_atomic(path: str | os.PathLike[str], text: str | bytes, mode: int = 0o600) -> None:
    """Readers see the old file or the new one, never a mix, even across a crash; and the new
    file never exists with a wider mode than `mode`, even for an instant."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; the caller asked for exactly this
            data = text.encode("utf-8") if isinstance(text, str) else text
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- directories and logs ------------------------------------------------------------------------


def private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory only its owner may enter: created 0700 with any missing parents,
    and narrowed to 0700 if it already existed wider (an older DAMM left 0755 behind).

    ``mkdir(mode=0o700)`` alone is not enough: parents come out 0777 minus the umask, and an
    existing directory keeps whatever mode it had.
    """
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def open_private_log(path: str | os.PathLike[str]) -> int:
    """An append-only descriptor on a log file of mode 0600, narrowed if it was wider.

    Logs carry request details and error texts an outsider should not read.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.fchmod(fd, 0o600)
    return fd


def read_secret(path: Path, what: str) -> str:
    """A one-line secret (a token) from a file only its owner may read; never echoed."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DammError(
            Code.INVALID_ARGUMENT, f"cannot open {what} file {path}: {exc.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise DammError(
                Code.INVALID_ARGUMENT,
                f"{what} file {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable beyond "
                f"its owner; refusing to use it (chmod 600 {path}, then replace the {what})",
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    value = data.decode("utf-8", "replace").strip()
    if not value or "\n" in value:
        raise DammError(Code.INVALID_ARGUMENT, f"{what} file {path} must hold one line")
    return value


# --- raw seeds ---------------------------------------------------------------------------------


def load_or_create_seed(path: Path, what: str) -> bytes:
    """The seed at ``path``, created there first if there is none. ``what`` names it in errors."""
    try:
        return read_seed(path, what)
    except FileNotFoundError:
        pass
    seed = os.urandom(SEED_BYTES)
    try:
        _create_private_file(path, seed, what)
    except FileExistsError:
        return read_seed(path, what)
    return seed


def read_seed(path: Path, what: str) -> bytes:
    # O_NOFOLLOW: a symlink planted at the key path must not redirect us to another file.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        reason = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise DammError(Code.INVALID_ARGUMENT, f"cannot open {what} {path}: {reason}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DammError(Code.INVALID_ARGUMENT, f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise DammError(
                Code.INVALID_ARGUMENT,
                f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable beyond its "
                f"owner; refusing to use it (fix with: chmod 600 {path}, then rotate the key)",
            )
        seed = os.read(fd, SEED_BYTES + 1)
    finally:
        os.close(fd)
    if len(seed) != SEED_BYTES:
        raise DammError(
            Code.INVALID_ARGUMENT,
            f"{what} {path} holds {len(seed)} bytes, expected a {SEED_BYTES}-byte seed",
        )
    return seed


def _create_private_file(path: Path, data: bytes, what: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise DammError(
            Code.INVALID_ARGUMENT, f"cannot create {what} {path}: {exc.strerror}"
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


# --- WireGuard keys ----------------------------------------------------------------------------


def create_wg_key(path: Path) -> str:
    """Write a new WireGuard private key (base64, mode 0600); return its public key."""
    key = PrivateKey.generate()
    write_atomic(path, base64.b64encode(bytes(key)).decode() + "\n", mode=0o600)
    return base64.b64encode(bytes(key.public_key)).decode()


def read_wg_key(path: Path, missing_hint: str = "") -> str:
    """The base64 private key at ``path``, after checking it is private and well formed.

    Errors never echo the file's content: it is (meant to be) a private key.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DammError(Code.STATE_MISSING, f"no key at {path}{missing_hint}") from None
    if mode & 0o077:
        raise DammError(Code.STATE_MISSING, f"{path} is readable by others: chmod 600 it")
    value = path.read_text().strip()
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise DammError(Code.MALFORMED_KEY, f"{path} is not a base64 key") from None
    if len(raw) != 32:
        raise DammError(Code.MALFORMED_KEY, f"{path} does not hold a 32-byte key")
    return value


def wg_public_key(private_b64: str) -> str:
    return base64.b64encode(bytes(PrivateKey(base64.b64decode(private_b64)).public_key)).decode()
