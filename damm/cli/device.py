"""`damm device …`: what runs on the device. The private key is made here and never leaves."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import click
import msgspec
from nats.aio.client import Client as NATS

from damm import settings
from damm.cli.common import (
    Target,
    emit,
    fail,
    json_option,
    resolve_token,
    run,
    target,
    token_options,
    with_nats,
)
from damm.companion.page import Preload, page_files
from damm.device import files
from damm.device.bundle import (
    CONFIG_NAME,
    Contents,
    build_bundle,
    read_contents,
    write_bundle,
)
from damm.device.profile import save_enrollment
from damm.device.profile import write_config as write_config  # re-exported (tests)
from damm.errors import Code, DammError
from damm.keys.rotation import prove
from damm.protocol import messages as p
from damm.protocol.client import call

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=settings.device_state_dir,
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


@device.command()
@token_options("DAMM_TOKEN", "enrollment token")
@click.option("--region", help="preferred region")
@click.option("--exit-country", help="where traffic should leave (ISO code)")
@state_dir_option
@click.pass_context
@run
async def enroll(
    ctx: click.Context,
    token: str | None,
    token_file: Path | None,
    region: str | None,
    exit_country: str | None,
    state_dir: Path,
) -> None:
    """Enroll with a token and write a wg-quick config (importable by the WireGuard apps)."""
    t = target(ctx)
    secret = resolve_token(token, token_file, "DAMM_TOKEN", "enrollment token")
    public = files.generate_key(state_dir)
    request_id = uuid.uuid4().hex

    async def body(nc: NATS) -> p.Enrolled:
        req = p.Enroll(
            token=secret,
            public_key=public,
            region=region,
            exit_country=exit_country,
            request_id=request_id,
        )
        return await call(nc, "enroll", req, p.Enrolled, timeout=10.0)

    identity = files.identity_seed(state_dir, create=True)
    res = await with_nats(t, None, body, identity)
    _dev, config = save_enrollment(state_dir, res, public, t.nats())
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
    # The key file, not device.json, says which key is current: a crash between the steps below
    # then heals on the next run instead of leaving a key the control plane does not know.
    old_public = files.public_key(state_dir)
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
                old_public_key=old_public,
                new_public_key=new_public,
                proof=proof,
                request_id=request_id,
            ),
            p.KeyRotated,
        )

    res = await with_nats(t, None, body, files.identity_seed(state_dir))
    os.replace(pending, state_dir / files.PRIVATE_KEY)
    dev.public_key = res.public_key
    dev.key_expires_at = res.key_expires_at
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


def _device_target(t: Target, dev: files.DeviceFile | None) -> Target:
    """--nats / DAMM_NATS_URL first, then the URL the device enrolled through, then the stack."""
    if t.nats_url or dev is None or not dev.nats_url:
        return t
    return Target(dev.nats_url, t.database_url, t.json)


@device.command()
@state_dir_option
@click.option("--interface", help="live WireGuard (UAPI) interface to move too, e.g. wg0")
@json_option
@click.pass_context
@run
async def failover(
    ctx: click.Context, state_dir: Path, interface: str | None, as_json: bool
) -> None:
    """Verify the signed catalog and move to the gateway's next front door."""
    from damm.device.failover import FailoverResult
    from damm.device.failover import failover as do_failover

    t = target(ctx)
    dt = _device_target(t, files.load(state_dir))

    async def body(nc: NATS) -> FailoverResult:
        return await do_failover(nc, state_dir, live_interface=interface)

    res = await with_nats(dt, None, body, files.identity_seed(state_dir))

    def text() -> None:
        click.echo(
            f"failed over {res.gateway_id}: {res.old_endpoint} -> {res.new_endpoint} "
            f"(front door {res.front_door_id}, catalog v{res.catalog_version})"
            + (f"; {interface} updated" if res.live_updated else "")
        )
        if not res.reported:
            click.echo(f"warning: the control plane did not record the move: {res.report_error}",
                       err=True)  # fmt: skip

    emit(t, res, text)


@device.command()
@state_dir_option
@click.option("--interface", help="live WireGuard (UAPI) interface to inspect, e.g. wg0")
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write a diagnostics JSON file (holds no private key)",
)
@click.option("--no-probe", is_flag=True, help="do not send a UDP probe to the endpoint")
@click.option("--timeout", default=5.0, show_default=True, help="seconds to reach NATS")
@json_option
@click.pass_context
@run
async def diagnose(
    ctx: click.Context,
    state_dir: Path,
    interface: str | None,
    export_path: Path | None,
    no_probe: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Check files, config, interface, handshake, endpoint and catalog; one line each."""
    import sys

    from damm.device import diagnose as diag
    from damm.errors import DammError

    t = target(ctx)
    try:
        dev: files.DeviceFile | None = files.load(state_dir)
    except DammError:
        dev = None
    dt = _device_target(t, dev)
    connect = None
    try:
        dt.nats()
    except DammError:
        pass
    else:

        async def connect() -> NATS:
            return await dt.connect(None, files.identity_seed(state_dir))

    report = await diag.diagnose(
        state_dir,
        interface=interface,
        connect=connect,
        probe_endpoint=not no_probe,
        timeout=timeout,
    )
    if export_path is not None:
        diag.export(report, export_path)

    def text() -> None:
        for line in diag.render_lines(report):
            click.echo(line)
        if export_path is not None:
            click.echo(f"diagnostics written to {export_path}")

    emit(t, report, text)
    if not report.ok:
        sys.exit(1)


diagnostics_option = click.option(
    "--diagnostics",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="a `damm device diagnose --export` file for the page to show too",
)


def _preload(contents: Contents, source: str) -> Preload:
    return Preload(
        name=CONFIG_NAME.removesuffix(".conf"),
        source=source,
        config=contents.config,
        device=msgspec.to_builtins(contents.info),
        catalog=contents.catalog,
        diagnostics=msgspec.to_builtins(contents.diagnostics) if contents.diagnostics else None,
    )


@device.command()
@state_dir_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="zip to write (default: <state-dir>/damm-bundle.zip)",
)
@diagnostics_option
@click.pass_context
def bundle(ctx: click.Context, state_dir: Path, out: Path | None, diagnostics: Path | None) -> None:
    """Write a zip: config, its QR code, install steps and the companion page preloaded with it."""
    t = target(ctx)
    path = out or state_dir / "damm-bundle.zip"
    try:
        contents = read_contents(state_dir, diagnostics)
        source = f"the bundle of device {contents.info.device_id}"
        write_bundle(path, build_bundle(contents, page_files(_preload(contents, source))))
    except DammError as err:
        fail(err)
    emit(
        t,
        {"bundle": str(path)},
        lambda: click.echo(
            f"bundle: {path} (mode 0600; the config, QR code and page hold the private key)\n"
            "unzip it and open index.html to inspect the profile"
        ),
    )


@device.command()
@state_dir_option
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default="any free port",
    help="the 127.0.0.1 port to serve the page on",
)
@click.option("--open", "open_browser", is_flag=True, help="open the page in the default browser")
@diagnostics_option
@click.pass_context
def companion(
    ctx: click.Context, state_dir: Path, port: int, open_browser: bool, diagnostics: Path | None
) -> None:
    """Serve the companion page with this device's profile on 127.0.0.1 until Ctrl-C."""
    from damm.companion.server import CompanionServer

    t = target(ctx)

    def load() -> Preload:
        # read on every page load, so a reload shows what a failover just changed
        return _preload(read_contents(state_dir, diagnostics), f"the files in {state_dir}")

    try:
        server = CompanionServer(load, port=port)  # loads once: fail now, not in the browser
    except DammError as err:
        fail(err)
    except OSError as exc:
        fail(DammError(Code.INVALID_ARGUMENT, f"cannot listen on port {port}: {exc.strerror}"))
    try:  # from here on, Ctrl-C at any moment is a clean stop
        emit(
            t,
            {"url": server.url},
            lambda: click.echo(
                f"companion: {server.url}\n"
                "serving on 127.0.0.1 only; the page holds the private key, so keep the URL to "
                "yourself. Ctrl-C stops."
            ),
        )
        sys.stdout.flush()
        if open_browser:
            import webbrowser

            webbrowser.open(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
