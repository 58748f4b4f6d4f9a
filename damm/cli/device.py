"""`damm device …`: what runs on the device. The private key is made here and never leaves."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import click
from nats.aio.client import Client as NATS

from damm.catalog.verify import initial_trust
from damm.cli.common import emit, run, target, with_nats
from damm.device import state as files
from damm.device.wgconfig import render_wg_quick, write_atomic
from damm.handlers import protocol as p
from damm.handlers.x25519 import prove
from damm.rpc import call

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get("DAMM_STATE_DIR", "damm-device"),
    show_default="damm-device",
    help="where the key, state and WireGuard config live",
)


@click.group()
def device() -> None:
    """Device side: keys, enrollment, config, failover, diagnostics."""


@device.command()
@state_dir_option
@click.option("--force", is_flag=True, help="replace an existing key")
@click.pass_context
def keygen(ctx: click.Context, state_dir: Path, force: bool) -> None:
    """Generate the device key locally (mode 0600); prints the public key."""
    pub = files.generate_key(state_dir, replace=force)
    emit(target(ctx), {"public_key": pub}, lambda: click.echo(pub))


def write_config(state_dir: Path, dev: files.DeviceFile) -> Path:
    text = render_wg_quick(
        files.private_key(state_dir),
        dev.address,
        dev.address6,
        dev.dns,
        dev.gateway_public_key,
        dev.endpoint,
        dev.allowed_ips,
    )
    path = state_dir / files.CONFIG
    write_atomic(path, text, mode=0o600)
    return path


@device.command()
@click.option("--token", required=True, envvar="DAMM_TOKEN", help="enrollment token")
@click.option("--region", help="preferred region")
@click.option("--exit-country", help="where traffic should leave (ISO code)")
@state_dir_option
@click.pass_context
@run
async def enroll(
    ctx: click.Context, token: str, region: str | None, exit_country: str | None, state_dir: Path
) -> None:
    """Enroll with TOKEN and write a wg-quick config (importable by the WireGuard apps)."""
    t = target(ctx)
    public = files.generate_key(state_dir)
    request_id = uuid.uuid4().hex

    async def body(nc: NATS) -> p.Enrolled:
        req = p.Enroll(
            token=token,
            public_key=public,
            region=region,
            exit_country=exit_country,
            request_id=request_id,
        )
        return await call(nc, "enroll", req, p.Enrolled, timeout=10.0)

    res = await with_nats(t, None, body)
    trust = None
    if res.catalog is not None:
        trust = initial_trust(
            res.catalog.region, res.catalog.key_id, res.catalog.public_key, res.catalog.min_version
        )
    dev = files.DeviceFile(
        device_id=res.device_id,
        public_key=public,
        gateway_id=res.gateway_id,
        gateway_public_key=res.gateway_public_key,
        front_door_id=res.front_door_id,
        endpoint=res.endpoint,
        address=res.address,
        address6=res.address6,
        allowed_ips=res.allowed_ips,
        dns=res.dns,
        nats_url=t.nats(),
        rotation_key=res.rotation_key,
        trust=trust,
        key_expires_at=res.key_expires_at.isoformat() if res.key_expires_at else None,
    )
    config = write_config(state_dir, dev)
    files.save(state_dir, dev)
    emit(
        t,
        res,
        lambda: click.echo(
            f"enrolled {res.device_id}: {res.address} via {res.gateway_id} ({res.endpoint})\n"
            f"config: {config}  (bring it up with: wg-quick up {config.absolute()})"
        ),
    )


@device.command("rotate-key")
@state_dir_option
@click.pass_context
@run
async def rotate_key(ctx: click.Context, state_dir: Path) -> None:
    """Make a new keypair, prove the old one, keep the address; the old key stops working."""
    t = target(ctx)
    dev = files.load(state_dir)
    old_private = files.private_key(state_dir)
    pending = state_dir / "private.key.next"
    if not pending.exists():
        files.generate_key(state_dir / "next", replace=True)
        os.replace(state_dir / "next" / files.PRIVATE_KEY, pending)
        (state_dir / "next").rmdir()
    new_public = files.public_key_of_file(pending)
    request_id = uuid.uuid5(uuid.NAMESPACE_OID, f"{dev.device_id}/{new_public}").hex
    proof = prove(old_private, dev.rotation_key, dev.device_id, new_public, request_id)

    async def body(nc: NATS) -> p.KeyRotated:
        return await call(
            nc,
            "device.rotate_key",
            p.RotateKey(
                device_id=dev.device_id,
                old_public_key=dev.public_key,
                new_public_key=new_public,
                proof=proof,
                request_id=request_id,
            ),
            p.KeyRotated,
        )

    res = await with_nats(t, None, body)
    os.replace(pending, state_dir / files.PRIVATE_KEY)
    dev.public_key = res.public_key
    dev.key_expires_at = res.key_expires_at.isoformat() if res.key_expires_at else None
    files.save(state_dir, dev)
    write_config(state_dir, dev)
    emit(t, res, lambda: click.echo(f"rotated key of {dev.device_id}: {res.public_key}"))


@device.command()
@state_dir_option
@click.pass_context
def show(ctx: click.Context, state_dir: Path) -> None:
    """Show the device's enrollment (never the private key)."""
    dev = files.load(state_dir)
    emit(
        target(ctx),
        dev,
        lambda: click.echo(
            f"device {dev.device_id}\n  address  {dev.address}\n  gateway  {dev.gateway_id} "
            f"({dev.endpoint}, front door {dev.front_door_id})\n  key      {dev.public_key}"
        ),
    )
