"""A TCP relay that lets a lab gateway host reach NATS on the machine's loopback.

A gateway host in its own network namespace has its own loopback, and the local stack's
nats-server listens on the machine's 127.0.0.1 only. The relay opens a listening socket inside
the namespace (a socket belongs to the namespace it was made in, so it enters the namespace just
long enough to make one) and forwards each connection to the real server from outside. The
agent in the namespace then runs the very command an operator runs, ``--nats`` pointing at its
own loopback. Run as ``python -m damm.orchestrator.providers.relay NS PORT TARGET_URL [PIDFILE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_in(netns: str, port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:port inside ``netns``; this thread returns home."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(64)
            sock.setblocking(False)
        finally:
            _setns(home)
    finally:
        os.close(home)
        os.close(target)
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(sock: socket.socket, host: str, port: int) -> asyncio.Server:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    return await asyncio.start_server(on_client, sock=sock)


def target_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    return parts.hostname or "127.0.0.1", parts.port or 4222


def _wait_for_removal(path: str) -> None:
    while os.path.exists(path):
        time.sleep(1.0)


async def _main(netns: str, listen_port: int, url: str, pidfile: str | None) -> None:
    host, port = target_of(url)
    server = await serve(listen_in(netns, listen_port), host, port)
    if pidfile:  # written by the relay itself: found even if its starter died right after
        Path(pidfile).write_text(str(os.getpid()))  # noqa: ASYNC240 - once, tiny
    async with server:
        # The relay lives exactly as long as its host: once the namespace is gone, so is it.
        await asyncio.to_thread(_wait_for_removal, f"/run/netns/{netns}")


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], next(iter(sys.argv[4:]), None)))
