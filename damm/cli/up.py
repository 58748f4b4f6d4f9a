"""`damm up`: the main job. Control plane on its own NATS and Postgres, plus a demo as root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import click

from damm import log, private_files
from damm import settings as settings_mod
from damm.cli.common import run, target
from damm.cli.metrics import metrics_endpoint, metrics_option
from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.keys.sealing import kek_from_env
from damm.metrics import ControlMetrics
from damm.private_files import private_dir, write_atomic
from damm.protocol.bus import connect
from damm.settings import LOCAL_KEK, ControlSettings
from damm.stack import processes
from damm.stack.control_process import spawn_control
from damm.stack.gateway_users import follow_gateways
from damm.stack.nats_cluster import NatsCluster, until_meta_leader
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres
from damm.stack.stackfile import StackFile, home

_log = log.get("damm.up")


def port_free(port: int) -> bool:
    """Could nats-server listen here? Probed the way it binds: with SO_REUSEADDR, so the
    TIME_WAIT connections a restart leaves behind do not count, a live listener does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _previous(directory: Path) -> dict[str, Any]:
    """The last run's port and passwords: agents and devices hold URLs with that port."""
    data: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        data = json.loads((directory / "nats" / "identity.json").read_text())
    stack = StackFile.read(directory)
    if stack is not None and stack.nats_port:
        data["port"] = stack.nats_port
    return data


def _start_nats(server: NatsServer, port: int) -> str:
    server.port = port if port > 0 and port_free(port) else -1
    if port > 0 and server.port != port:
        _log.warning("previous NATS port taken; agents and devices must be pointed anew", port=port)
    try:
        return server.start()
    except RuntimeError:
        if server.port == -1:
            raise
        _log.warning("nats-server could not listen on its previous port", port=port)
        server.port = -1
        return server.start()


@click.command()
@click.option("--no-demo", is_flag=True, help="do not start the demo gateway and device")
@click.option("--exit-after-demo", is_flag=True, help="stop once the demo has shown the tunnel")
@click.option(
    "--cluster",
    "cluster_size",
    type=click.IntRange(3, 5),
    default=None,
    metavar="N",
    help="N nats-server nodes on loopback (streams with 3 replicas) and two control planes",
)
@metrics_option
@click.pass_context
@run
async def up(
    ctx: click.Context,
    no_demo: bool,
    exit_after_demo: bool,
    cluster_size: int | None,
    metrics_listen: str | None,
) -> None:
    """Start DAMM locally: NATS, Postgres, the control plane (and a demo tunnel as root)."""
    t = target(ctx)
    directory = home()
    existing = StackFile.read(directory)
    if existing is not None and existing.pid and existing.pid != os.getpid() and existing.alive():
        raise DammError(
            Code.ALREADY_EXISTS, f"a stack is already running (pid {existing.pid}) in {directory}"
        )
    private_dir(directory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with AsyncExitStack() as stack:
        # Listen before starting anything, so a bad address fails fast; the control plane's
        # series appear as it starts.
        metrics = ControlMetrics()
        await stack.enter_async_context(metrics_endpoint(metrics_listen, metrics.registry))
        nats_url = t.nats_url
        passwords: dict[str, str] = {}
        server: NatsServer | NatsCluster | None = None
        if nats_url is None and cluster_size is not None:
            prev = _previous(directory)
            server = NatsCluster(
                directory / "cluster",
                cluster_size,
                passwords=dict(prev.get("passwords", {})),
                callout=True,
            )
            nats_url = await asyncio.to_thread(server.start)
            stack.callback(server.stop)
            passwords = server.passwords
            await _meta_leader(nats_url, passwords["control"])
            private_dir(directory / "nats")
            write_atomic(
                directory / "nats" / "identity.json",
                json.dumps({"port": -1, "passwords": passwords}),
                mode=0o600,
            )
        elif nats_url is None:
            prev = _previous(directory)
            server = NatsServer(
                directory / "nats", passwords=dict(prev.get("passwords", {})), callout=True
            )
            nats_url = await asyncio.to_thread(_start_nats, server, int(prev.get("port", -1)))
            stack.callback(server.stop)
            passwords = server.passwords
            port_now = int(nats_url.rsplit(":", 1)[1])
            write_atomic(
                directory / "nats" / "identity.json",
                json.dumps({"port": port_now, "passwords": passwords}),
                mode=0o600,
            )
        database_url = t.database_url
        if database_url is None:
            pg = Postgres(directory / "pgdata")
            database_url = await asyncio.to_thread(pg.start)
            stack.callback(pg.stop)
        settings = ControlSettings.from_env(directory / "keys", kek_file=directory / LOCAL_KEK)
        user, password = (
            ("control", passwords["control"]) if passwords else t.credentials("control")
        )
        replicas = min(cluster_size, 3) if cluster_size else 1
        plane = ControlPlane(
            nats_url,
            database_url,
            settings,
            user=user,
            password=password,
            metrics=metrics,
            stream_replicas=replicas,
            callout_seed=server.callout_seed if server is not None else _callout_seed(),
        )
        await plane.start()
        stack.push_async_callback(plane.stop)
        if cluster_size:
            # The second control plane opens the signing keys sealed in the log (issue 11,
            # finding 1); the keys directory is only imported from, on a first start.
            second = spawn_control(
                nats_url,
                database_url,
                password or "",
                settings.keys_dir,
                directory / "control-2.log",
                stream_replicas=replicas,
                extra_env={"DAMM_CALLOUT_SEED_FILE": str(directory / "cluster" / "callout.seed")},
                # The same KEK as this process: the operator's, else the stack's own file.
                kek_file=None if kek_from_env(os.environ) else directory / LOCAL_KEK,
            )
            stack.callback(processes.stop, second)
        if server is not None and not server.callout:
            assert plane.ctx is not None
            users_stop = asyncio.Event()
            follower = asyncio.create_task(follow_gateways(server, plane.ctx.state, users_stop))

            async def stop_follower() -> None:
                users_stop.set()
                await follower

            stack.push_async_callback(stop_follower)
        stackfile = StackFile(
            nats_url=nats_url,
            database_url=database_url,
            passwords=passwords,
            pid=os.getpid(),
            nats_port=int(nats_url.rsplit(":", 1)[1]) if server is not None else 0,
        )
        path = stackfile.write(directory)
        # Kept, marked stopped: the next `damm up` takes the same port from it.
        stack.callback(lambda: _mark_stopped(stackfile, directory))

        click.echo("DAMM is up.")
        click.echo(f"  NATS       {nats_url}  (JetStream, sync_interval always, auth on)")
        if cluster_size:
            click.echo(
                f"  cluster    {cluster_size} nodes, streams R{replicas}, two control planes"
                f" (second logs to {directory / 'control-2.log'})"
            )
        click.echo(f"  Postgres   {database_url}")
        click.echo(f"  state      {directory}  (stack file {path})")
        click.echo(f"  overlay    {settings.overlay.network}  gateway {settings.overlay.gateway}")
        await _demo(stack, no_demo, nats_url, passwords, database_url, directory)
        if exit_after_demo:
            return
        click.echo(
            "Try: damm admin gateways · damm admin devices · damm admin report  (Ctrl-C stops)"
        )
        await stop.wait()
        click.echo("stopping…")


def _mark_stopped(stackfile: StackFile, directory: Path) -> None:
    stackfile.pid = 0
    stackfile.write(directory)


async def _meta_leader(nats_url: str, password: str) -> None:
    """Streams can only be created once the cluster has elected its JetStream meta leader."""
    nc = await connect(nats_url, user="control", password=password, name="damm-up")
    try:
        await until_meta_leader(nc.jetstream())
    finally:
        await nc.close()


def _callout_seed() -> bytes | None:
    """Against a server of its own choosing, the control plane answers the auth callout only
    when given the issuer's seed (DAMM_CALLOUT_SEED_FILE)."""
    path = settings_mod.callout_seed_file()
    return private_files.read_secret(path, "callout seed").encode() if path else None


async def _demo(
    stack: AsyncExitStack,
    no_demo: bool,
    nats_url: str,
    passwords: dict[str, str],
    database_url: str,
    directory: Path,
) -> None:
    if no_demo:
        click.echo("  demo       skipped (--no-demo)")
        return
    try:
        from damm.dev import demo
    except ImportError:
        click.echo("  demo       skipped: this build has no demo module")
        return
    possible, why = demo.demo_possible()
    if not possible:
        click.echo(f"  demo       skipped: {why}")
        return
    handle = await demo.run_demo(
        nats_url, passwords.get("admin", ""), database_url, directory / "demo"
    )
    stack.push_async_callback(handle.close)
    for line in handle.summary():
        click.echo(f"  demo       {line}")
