"""`damm admin audit` and `damm admin report`: what happened, and how the fleet stands.

Registered in the admin group with ``admin.add_command(audit)`` and ``admin.add_command(report)``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import click
import msgspec
from nats.aio.client import Client as NATS

from damm import settings
from damm.cli.common import Target, json_option, run, target, with_nats
from damm.errors import Code, DammError
from damm.events import model as m
from damm.subjects import check_id

_AUDIT_COLUMNS = ("time", "seq", "type", "aggregate", "actor", "summary")


def _when(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    from damm.reports.audit import parse_when

    try:
        return parse_when(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None


def _print_row(t: Target, env: m.Envelope, device: str | None) -> None:
    from damm.reports.audit import row_of

    row = row_of(env, device)
    if t.json:
        click.echo(msgspec.json.encode(row).decode())
    else:
        click.echo(
            f"{row.occurred_at:%Y-%m-%d %H:%M:%S}  {row.seq:>7}  {row.type:<24} "
            f"{row.aggregate:<32} {row.actor:<22} {row.summary}"
        )


async def _full_ids(
    t: Target, device: str | None, gateway: str | None, token: str | None
) -> tuple[str | None, str | None, str | None]:
    """Prefixes become full ids through the read model. The log itself is filtered by exact
    subject, so without a reachable read model only full ids work."""
    from damm.cli.ids import Kind, resolve

    async def full(kind: Kind, given: str | None) -> str | None:
        if given is None:
            return None
        try:
            return await resolve(t, kind, given)
        except DammError as err:
            if err.code is Code.AMBIGUOUS_ID:
                raise
            return given

    return await full("device", device), await full("gateway", gateway), await full("token", token)


@click.command("audit")
@click.option("--device", help="events about this device (its own, usage, token, address, key)")
@click.option("--gateway", help="events about this gateway (incl. its usage reports, devices)")
@click.option("--token", help="events about this enrollment token")
@click.option("--actor", help="who caused it: KIND:ID (admin:alice, policy:quota) or KIND")
@click.option(
    "--type",
    "types",
    multiple=True,
    help="event type (device.suspended) or prefix (device); repeatable",
)
@click.option("--since", help="from this time: 1h, 30m, 7d ago, or ISO-8601")
@click.option("--until", help="up to this time: 1h, 30m, 7d ago, or ISO-8601")
@click.option("--as-of", "as_of", help="with --device: the device's state as of this time")
@click.option("--follow", "-f", is_flag=True, help="keep printing new events until Ctrl-C")
@json_option
@click.pass_context
@run
async def audit(
    ctx: click.Context,
    device: str | None,
    gateway: str | None,
    token: str | None,
    actor: str | None,
    types: tuple[str, ...],
    since: str | None,
    until: str | None,
    as_of: str | None,
    follow: bool,
    as_json: bool,
) -> None:
    """Read the event log itself: who did what to what, when (filters combine with AND)."""
    from damm.reports.audit import AuditFilter, AuditReader, device_as_of

    t = target(ctx)
    for value, what in ((device, "device id"), (gateway, "gateway id"), (token, "token id")):
        if value is not None:
            check_id(value, what)
    device, gateway, token = await _full_ids(t, device, gateway, token)
    if actor is not None and not actor.partition(":")[0]:
        raise DammError(Code.INVALID_ARGUMENT, f"actor {actor!r}: KIND:ID or KIND")
    if as_of is not None:
        if device is None:
            raise DammError(Code.INVALID_ARGUMENT, "--as-of needs --device")
        moment = _when(as_of, "--as-of")
        assert moment is not None

        async def fold(nc: NATS) -> None:
            state = await device_as_of(nc, device, moment)
            if t.json:
                click.echo(msgspec.json.encode(state).decode())
                return
            if not state.exists:
                click.echo(f"device {device}: not enrolled as of {moment.isoformat()}")
                return
            click.echo(f"device {device} as of {moment.isoformat()} ({state.events} events)")
            for key in (
                "status",
                "reason",
                "tier",
                "gateway_id",
                "front_door_id",
                "egress_pool_id",
                "address",
                "public_key",
                "enrolled_at",
                "changed_at",
                "changed_by",
            ):
                click.echo(f"  {key:<15} {getattr(state, key) or '-'}")
            for period, (rx, tx) in sorted(state.usage.items()):
                click.echo(f"  usage {period:<9} rx={rx} tx={tx} total={rx + tx}")

        await with_nats(t, "admin", fold)
        return
    flt = AuditFilter(
        device=device,
        gateway=gateway,
        token=token,
        actor=actor,
        types=types,
        since=_when(since, "--since"),
        until=_when(until, "--until"),
    )

    async def body(nc: NATS) -> None:
        if not t.json:
            click.echo("  ".join(_AUDIT_COLUMNS))
        async for env in AuditReader(nc).read(flt, follow=follow):
            _print_row(t, env, device)

    await with_nats(t, "admin", body)


@click.command("report")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "html"]),
    default=None,
    help="text tables (default), json, or a self-contained html file",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write to this file instead of stdout",
)
@click.option(
    "--heartbeat-ttl",
    type=float,
    default=None,
    help="seconds after which a gateway heartbeat is stale [default: DAMM_HEARTBEAT_TTL, 90]",
)
@json_option
@click.pass_context
@run
async def report(
    ctx: click.Context,
    fmt: str | None,
    out: Path | None,
    heartbeat_ttl: float | None,
    as_json: bool,
) -> None:
    """Fleet report from the read models: capacity, health, usage, quota, advice."""
    import asyncpg

    from damm.reports.render_html import render_html
    from damm.reports.render_text import render_text
    from damm.reports.report import generate, to_json

    t = target(ctx)
    fmt = fmt or ("json" if t.json else "text")
    try:
        ttl = heartbeat_ttl if heartbeat_ttl is not None else settings.heartbeat_ttl_s()
        rep = await generate(t.database(), ttl_s=ttl, now=datetime.now(UTC))
    except (OSError, asyncpg.PostgresError) as exc:
        raise DammError(Code.UNAVAILABLE, f"cannot read the read models: {exc}") from None
    if fmt == "json":
        text = to_json(rep).decode() + "\n"
    elif fmt == "html":
        text = render_html(rep)
    else:
        text = render_text(rep)
    if out is None:
        click.echo(text, nl=False)
    else:
        await asyncio.to_thread(out.write_text, text, encoding="utf-8")
        click.echo(f"report written to {out}", err=True)
