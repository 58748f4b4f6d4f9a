"""`damm control run`: the control plane against existing NATS and Postgres (production)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from damm import private_files, settings
from damm.cli.common import run, target
from damm.cli.metrics import metrics_endpoint, metrics_option
from damm.control.process import ControlPlane
from damm.settings import LOCAL_KEK, ControlSettings, home


@click.group()
def control() -> None:
    """The control plane process."""


@control.command("run")
@click.option(
    "--keys-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="DAMM_KEYS_DIR",
    default="/var/lib/damm/keys",
    show_default=True,
    help="keys of a deployment from before keys lived in the log: imported on first start",
)
@click.option("--no-projectors", is_flag=True, help="serve requests only")
@click.option(
    "--stream-replicas",
    type=click.IntRange(1, 5),
    envvar="DAMM_STREAM_REPLICAS",
    default=1,
    show_default=True,
    help="replicas of the event streams when this process creates them (3 on a cluster)",
)
@metrics_option
@click.pass_context
@run
async def control_run(
    ctx: click.Context,
    keys_dir: Path,
    no_projectors: bool,
    stream_replicas: int,
    metrics_listen: str | None,
) -> None:
    """Serve commands and project events until SIGTERM."""
    t = target(ctx)
    user, password = t.credentials("control")
    # Beside a local `damm up` stack, share its KEK as its NATS and Postgres are shared.
    local_kek = home() / LOCAL_KEK
    plane = ControlPlane(
        t.nats(),
        t.database(),
        ControlSettings.from_env(keys_dir, kek_file=local_kek if local_kek.exists() else None),
        user=user,
        password=password,
        run_projectors=not no_projectors,
        stream_replicas=stream_replicas,
        callout_seed=_callout_seed(),
    )
    # A SIGTERM that arrives while the control plane starts still means a clean stop.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Listen first, so a bad address fails before the control plane starts.
    async with metrics_endpoint(metrics_listen, plane.metrics.registry):
        try:
            await plane.start()
            await stop.wait()
        finally:
            await plane.stop()


def _callout_seed() -> bytes | None:
    path = settings.callout_seed_file()
    return private_files.read_secret(path, "callout seed").encode() if path else None
