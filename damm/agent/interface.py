"""The gateway host makes its own WireGuard interface: create, address, bring up, clean up.

``damm gateway run`` used to need the interface prepared by hand (and the systemd unit's way of
doing it never returned: ``wireguard-go`` with ``WG_PROCESS_FOREGROUND=1`` stays in the
foreground). Now the agent owns it: an interface that already exists is used as it is and left
alone on exit; a missing one is created with the kernel module when there is one, else by a
``wireguard-go`` child the agent supervises. The tunnel address comes from registration, so it
is set only once the control plane has answered. On stop, only what the agent created goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from damm import log
from damm.errors import Code, DammError
from damm.wireguard.uapi import DEFAULT_SOCKET_DIR, socket_path_for

_log = log.get("damm.agent.interface")

Kind = Literal["auto", "kernel", "uapi"]
READY_S = 10.0


async def _ip(*args: str, check: bool = True) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    code = proc.returncode or 0
    if check and code != 0:
        raise DammError(Code.WG_BACKEND, f"ip {' '.join(args)}: {err.decode().strip()}")
    return code, out.decode()


@dataclass
class Interface:
    """The interface the agent works on, and whether (and how) the agent made it."""

    ifname: str
    backend: Literal["kernel", "uapi"]
    socket_path: Path
    created: bool = False
    local: bool = True  # visible in this network namespace, so its addresses are ours to set
    wireguard_go: asyncio.subprocess.Process | None = None
    addresses: list[str] = field(default_factory=list)

    async def configure(self, *cidrs: str) -> None:
        """Give the interface the tunnel address(es) the control plane assigned, and bring it up.

        ``replace`` makes it idempotent: a restarted agent finds the address already there.
        """
        if not self.local:
            return
        for cidr in cidrs:
            await _ip("address", "replace", cidr, "dev", self.ifname)
            self.addresses.append(cidr)
        await _ip("link", "set", self.ifname, "up")
        _log.info("interface configured", interface=self.ifname, addresses=list(cidrs))

    async def close(self) -> None:
        """Remove what the agent created; an interface found on start stays as it was."""
        if not self.created:
            return
        if self.wireguard_go is not None:
            proc = self.wireguard_go
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)  # wireguard-go removes its TUN on SIGTERM
                try:
                    await asyncio.wait_for(proc.wait(), 5.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        else:
            await _ip("link", "del", self.ifname, check=False)
        _log.info("interface removed", interface=self.ifname)


async def exists(ifname: str) -> bool:
    code, _ = await _ip("link", "show", "dev", ifname, check=False)
    return code == 0


async def listening(sock: Path) -> bool:
    """Whether a UAPI daemon answers on ``sock`` (a leftover socket file refuses)."""
    try:
        _, writer = await asyncio.open_unix_connection(sock)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def ensure(
    ifname: str, kind: Kind = "auto", socket_dir: Path = DEFAULT_SOCKET_DIR
) -> Interface:
    """The interface named ``ifname``, created when it is missing.

    A live UAPI socket means the interface exists, possibly in another network namespace (the
    socket directory is shared): the agent then only talks to it, and leaves its addresses and
    its daemon to whoever made it.
    """
    sock = socket_path_for(ifname, socket_dir)
    if kind != "kernel" and await listening(sock):
        local = await exists(ifname)
        _log.info("interface found", interface=ifname, backend="uapi", local=local)
        return Interface(ifname, "uapi", sock, local=local)
    if await exists(ifname):
        backend: Literal["kernel", "uapi"] = "kernel" if kind == "auto" else kind
        _log.info("interface found", interface=ifname, backend=backend)
        return Interface(ifname, backend, sock)
    if kind in ("auto", "kernel"):
        code, _ = await _ip("link", "add", ifname, "type", "wireguard", check=False)
        if code == 0:
            _log.info("interface created", interface=ifname, backend="kernel")
            return Interface(ifname, "kernel", sock, created=True)
        if kind == "kernel":
            raise DammError(Code.WG_BACKEND, f"cannot create kernel WireGuard interface {ifname}")
    return await _start_wireguard_go(ifname, sock)


async def _start_wireguard_go(ifname: str, sock: Path) -> Interface:
    # A socket nobody answers on: left by a killed daemon, it would block the name.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    log_fd, log_name = tempfile.mkstemp(prefix=f"wireguard-go-{ifname}-", suffix=".log")
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
    try:
        proc = await asyncio.create_subprocess_exec(
            "wireguard-go", "-f", ifname,
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=env,
        )  # fmt: skip
    except FileNotFoundError:
        raise DammError(
            Code.WG_BACKEND, "no kernel WireGuard and no wireguard-go on PATH"
        ) from None
    finally:
        os.close(log_fd)
    iface = Interface(ifname, "uapi", sock, created=True, wireguard_go=proc)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_S
    try:
        while not _present(sock):  # the socket appears once the TUN is up and listening
            if proc.returncode is not None or loop.time() > deadline:
                tail = _tail(log_name)
                raise DammError(Code.WG_BACKEND, f"wireguard-go {ifname} did not start: {tail}")
            await asyncio.sleep(0.02)
    except BaseException:
        await iface.close()
        raise
    finally:
        os.unlink(log_name)
    _log.info("interface created", interface=ifname, backend="uapi", pid=proc.pid)
    return iface


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read().strip()[-300:]


def _present(path: Path) -> bool:
    """A stat of a local socket path: cheap enough to poll from the loop."""
    return path.exists()
