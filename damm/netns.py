"""A small network lab: namespaces, veth links and wireguard-go daemons for tests and the demo.

Everything here drives the real tools (``ip``, ``wireguard-go``, ``ping``) so a test that passes
in the lab exercised the same packet path an operator gets. ``Lab`` owns what it creates and
tears all of it down on exit, including after a failure halfway through a setup, because a
leaked namespace or daemon poisons every later run on the machine.

Names carry a random tag (``dmt-<6hex>-<role>``) so parallel runs never collide; wireguard-go
interface names must be unique machine-wide because the UAPI socket directory
(``/var/run/wireguard``) is shared by every namespace that shares the mount namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from damm.wireguard.uapi import DEFAULT_SOCKET_DIR, socket_path_for

IFNAMSIZ = 15  # usable characters in a Linux interface name


class LabError(RuntimeError):
    """A lab step failed; the message carries the command and what it printed."""


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def unique_tag() -> str:
    return secrets.token_hex(3)


async def run(
    *argv: str, check: bool = True, time_limit: float = 30.0, stdin: bytes | None = None
) -> CommandResult:
    """Run a command to completion; with ``check`` a failure raises with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(time_limit):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LabError(f"{' '.join(argv)}: timed out after {time_limit}s") from None
    result = CommandResult(
        tuple(argv),
        proc.returncode or 0,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )
    if check and not result.ok:
        raise LabError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


async def exec_in(
    ns: str, *argv: str, check: bool = True, time_limit: float = 30.0
) -> CommandResult:
    """Run a command inside a namespace (``ip netns exec``)."""
    return await run("ip", "netns", "exec", ns, *argv, check=check, time_limit=time_limit)


async def create_netns(name: str) -> None:
    await run("ip", "netns", "add", name)


async def delete_netns(name: str) -> None:
    """Delete a namespace; its veth ends and TUN devices go with it."""
    await run("ip", "netns", "del", name)


async def loopback_up(ns: str) -> None:
    await run("ip", "-n", ns, "link", "set", "lo", "up")


async def add_address(ns: str, ifname: str, cidr: str) -> None:
    await run("ip", "-n", ns, "addr", "add", cidr, "dev", ifname)


async def link_up(ns: str, ifname: str) -> None:
    await run("ip", "-n", ns, "link", "set", ifname, "up")


async def configure_interface(ns: str, ifname: str, cidr: str | None) -> None:
    """Give an interface its address (if any) and bring it up."""
    if cidr is not None:
        await add_address(ns, ifname, cidr)
    await link_up(ns, ifname)


async def create_veth(
    ns_a: str,
    if_a: str,
    ns_b: str,
    if_b: str,
    addr_a: str | None = None,
    addr_b: str | None = None,
) -> None:
    """A veth pair created directly inside both namespaces, so no name lands in the host."""
    await run(
        "ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
        "netns", ns_b,
    )  # fmt: skip
    await configure_interface(ns_a, if_a, addr_a)
    await configure_interface(ns_b, if_b, addr_b)


async def ping(ns: str, addr: str, count: int = 1, wait: float = 2.0) -> bool:
    """True if at least one echo reply came back within ``wait`` seconds overall."""
    deadline = max(1, round(wait))
    result = await exec_in(
        ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-w", str(deadline), addr,
        check=False, time_limit=wait + 5,
    )  # fmt: skip
    return result.ok


@dataclass
class WireGuardGo:
    """A wireguard-go daemon we started in the foreground and therefore must stop."""

    ns: str
    ifname: str
    socket_path: Path
    log_path: Path
    process: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(
        cls,
        ns: str,
        ifname: str,
        *,
        socket_dir: Path = DEFAULT_SOCKET_DIR,
        ready_timeout: float = 10.0,
    ) -> WireGuardGo:
        """Start ``wireguard-go -f IFNAME`` inside ``ns`` and wait for its UAPI socket.

        The socket appears only after the TUN exists and the listener is bound, so waiting for
        it is waiting for "ready". A socket already there means another daemon owns that name.
        """
        if len(ifname) > IFNAMSIZ:
            raise LabError(f"interface name {ifname!r} is longer than {IFNAMSIZ} characters")
        sock = socket_path_for(ifname, socket_dir)
        if sock.exists():
            raise LabError(f"{sock} already exists: another wireguard-go uses {ifname!r}")
        log_fd, log_name = tempfile.mkstemp(prefix=f"wggo-{ifname}-", suffix=".log")
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
        try:
            process = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns, "wireguard-go", "-f", ifname,
                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=env,
            )  # fmt: skip
        finally:
            os.close(log_fd)
        daemon = cls(ns, ifname, sock, Path(log_name), process)
        try:
            async with asyncio.timeout(ready_timeout):
                while not sock.exists():
                    if process.returncode is not None:
                        raise LabError(
                            f"wireguard-go {ifname} in {ns} exited {process.returncode}: "
                            f"{daemon.log_tail()}"
                        )
                    await asyncio.sleep(0.02)
        except BaseException:
            await daemon.stop()
            raise
        return daemon

    def log_tail(self, lines: int = 10) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM (which makes wireguard-go remove its TUN and socket), then SIGKILL."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        # A killed daemon leaves its socket behind; it would block the name for the next run.
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()
        return self.process.returncode or 0


@dataclass
class Lab:
    """Tracks every namespace and daemon it creates; ``async with`` guarantees teardown.

    Roles are short words ("gw", "dev"); the lab turns them into collision-free names.
    """

    tag: str = field(default_factory=unique_tag)
    namespaces: list[str] = field(default_factory=list)
    daemons: list[WireGuardGo] = field(default_factory=list)
    links: int = 0

    def ns_name(self, role: str) -> str:
        return f"dmt-{self.tag}-{role}"

    def if_name(self, role: str, prefix: str = "wg") -> str:
        name = f"{prefix}{self.tag}{role}"
        if len(name) > IFNAMSIZ:
            raise LabError(f"role {role!r} makes interface name {name!r} too long")
        return name

    async def netns(self, role: str) -> str:
        """Create a namespace with loopback up; returns its name."""
        name = self.ns_name(role)
        await create_netns(name)
        self.namespaces.append(name)
        await loopback_up(name)
        return name

    async def veth(
        self, ns_a: str, ns_b: str, addr_a: str | None = None, addr_b: str | None = None
    ) -> tuple[str, str]:
        """Link two of our namespaces; returns the interface names on each side."""
        n = self.links = self.links + 1
        if_a, if_b = self.if_name(f"a{n}", "ve"), self.if_name(f"b{n}", "ve")
        await create_veth(ns_a, if_a, ns_b, if_b, addr_a, addr_b)
        return if_a, if_b

    async def wireguard_go(self, ns: str, role: str) -> WireGuardGo:
        daemon = await WireGuardGo.start(ns, self.if_name(role))
        self.daemons.append(daemon)
        return daemon

    async def close(self) -> None:
        """Tear down in reverse order; keep going past failures and report them together."""
        errors: list[str] = []
        while self.daemons:
            daemon = self.daemons.pop()
            try:
                await daemon.stop()
            except Exception as exc:
                errors.append(f"stop {daemon.ifname}: {exc}")
        while self.namespaces:
            ns = self.namespaces.pop()
            try:
                await delete_netns(ns)
            except Exception as exc:
                errors.append(f"delete {ns}: {exc}")
        if errors:
            raise LabError("lab teardown incomplete: " + "; ".join(errors))

    async def __aenter__(self) -> Lab:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.close()
        except LabError:
            if exc is None:
                raise  # a failure inside the block is the more useful error to surface


@functools.cache
def can_run_netns() -> tuple[bool, str]:
    """Whether this machine can run the lab, and if not, a reason fit for ``pytest.skip``."""
    if os.geteuid() != 0:
        return False, "needs root (ip netns, TUN devices)"
    for tool in ("ip", "wireguard-go", "wg", "ping"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not on PATH"
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun is missing (wireguard-go needs TUN)"
    probe = f"dmt-{unique_tag()}-probe"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return False, f"ip netns add failed: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, "root, ip netns, wireguard-go and /dev/net/tun available"
