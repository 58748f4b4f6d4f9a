"""`damm admin …`: operator commands. Writes go through the control plane; lists read Postgres."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import asyncpg
import click
import msgspec
from nats.aio.client import Client as NATS

from damm import settings
from damm.cli.common import Target, emit, json_option, run, table, target, with_nats
from damm.cli.ops import audit, report
from damm.errors import Code, DammError
from damm.protocol import messages as p
from damm.protocol.client import call

if TYPE_CHECKING:
    from damm.control.handlers.signing_keys import SigningKeyChanged

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
    "PI": 2**50,
}
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(value: str) -> int:
    match = _SIZE.match(value)
    if not match:
        raise click.BadParameter(f"{value!r} is not a size like 10GiB or 500MB")
    unit = (match.group(2) or "").upper().removesuffix("B")
    if unit not in _UNITS:
        raise click.BadParameter(f"unknown unit in {value!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_duration(value: str) -> int:
    match = _DURATION.match(value.strip())
    if not match:
        raise click.BadParameter(f"{value!r} is not a duration like 90s, 15m, 24h, 7d")
    return int(match.group(1)) * _SECONDS[match.group(2)]


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _actor() -> str:
    return settings.admin_name()


async def admin_call(t: Target, command: str, request: Any, result: type[Any]) -> Any:
    async def body(nc: NATS) -> Any:
        return await call(nc, command, request, result, timeout=10.0, actor=_actor())

    return await with_nats(t, "admin", body)


async def query(t: Target, sql: str, *args: Any) -> list[asyncpg.Record]:
    try:
        conn = await asyncpg.connect(t.database(), server_settings={"search_path": "damm"})
    except (OSError, asyncpg.PostgresError) as exc:
        raise DammError(Code.UNAVAILABLE, f"cannot reach Postgres: {exc}") from None
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


STREAM_PREFETCH = 1000
_row_encoder = msgspec.json.Encoder(enc_hook=str)


async def stream_json(t: Target, sql: str, out: BinaryIO) -> int:
    """A JSON array of the query's rows, written as they arrive from a server-side cursor.

    A listing of 100k devices never sits in memory whole, and the first rows are out before
    the last are read. The bytes are those ``emit`` would write for the whole list.
    """
    try:
        conn = await asyncpg.connect(t.database(), server_settings={"search_path": "damm"})
    except (OSError, asyncpg.PostgresError) as exc:
        raise DammError(Code.UNAVAILABLE, f"cannot reach Postgres: {exc}") from None
    count = 0
    try:
        async with conn.transaction(readonly=True):
            out.write(b"[")
            async for record in conn.cursor(sql, prefetch=STREAM_PREFETCH):
                out.write(b"," if count else b"")
                out.write(_row_encoder.encode(dict(record)))
                count += 1
            out.write(b"]\n")
            out.flush()
    finally:
        await conn.close()
    return count


def _records(rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


@click.group()
def admin() -> None:
    """Operate the fleet: tiers, tokens, gateways, egress pools, devices."""


# --- tiers ------------------------------------------------------------------------------------


@admin.group()
def tier() -> None:
    """Access tiers: where devices may go and how much they may use."""


@tier.command("create")
@click.argument("name")
@click.option("--regions", default="", help="comma-separated regions; empty means any")
@click.option("--exit-countries", default="", help="comma-separated ISO codes; empty means any")
@click.option("--session-limit", type=int, help="active devices per enrollment token")
@click.option("--byte-limit", help="per device per period, e.g. 10GiB")
@click.option("--key-lifetime", help="devices must rotate keys this often, e.g. 90d")
@click.option("--retired", is_flag=True, help="define the tier as retired (no new tokens)")
@click.pass_context
@run
async def tier_create(
    ctx: click.Context,
    name: str,
    regions: str,
    exit_countries: str,
    session_limit: int | None,
    byte_limit: str | None,
    key_lifetime: str | None,
    retired: bool,
) -> None:
    """Create or redefine tier NAME."""
    t = target(ctx)
    req = p.DefineTier(
        tier=name,
        regions=_csv(regions),
        exit_countries=_csv(exit_countries),
        session_limit=session_limit,
        byte_limit=parse_size(byte_limit) if byte_limit else None,
        key_lifetime_s=parse_duration(key_lifetime) if key_lifetime else None,
        status="retired" if retired else "active",
    )
    done = await admin_call(t, "admin.tier.define", req, p.Done)
    emit(t, done, lambda: click.echo(f"tier {name} defined"))


# --- tokens -----------------------------------------------------------------------------------


@admin.group()
def token() -> None:
    """Enrollment tokens (shown once, stored only as a hash)."""


@token.command("create")
@click.option("--tier", "tier_name", required=True, help="the tier devices enrolled with it get")
@click.option("--uses", type=int, help="how many enrollments it allows (default: unlimited)")
@click.option("--ttl", help="lifetime, e.g. 24h (default: no expiry)")
@click.pass_context
@run
async def token_create(
    ctx: click.Context, tier_name: str, uses: int | None, ttl: str | None
) -> None:
    """Issue an enrollment token; it is printed once and never again."""
    t = target(ctx)
    req = p.CreateToken(tier=tier_name, uses=uses, ttl_s=parse_duration(ttl) if ttl else None)
    created = await admin_call(t, "admin.token.create", req, p.TokenCreated)

    def text() -> None:
        # The id on stderr, the secret alone on stdout: TOKEN=$(damm admin token create …)
        click.echo(
            f"token id {created.token_id} (tier {created.tier}; revoke with "
            f"`damm admin token revoke {created.token_id}`); the secret, shown once:",
            err=True,
        )
        click.echo(created.token)

    emit(t, created, text)


@token.command("revoke")
@click.argument("token_id")
@click.option("--reason", default="", help="recorded in the event log")
@click.pass_context
@run
async def token_revoke(ctx: click.Context, token_id: str, reason: str) -> None:
    """Stop TOKEN_ID (its id, or a unique prefix; never the secret) from enrolling devices."""
    t = target(ctx)
    done = await admin_call(
        t, "admin.token.revoke", p.RevokeToken(token_id=token_id, reason=reason), p.Done
    )
    emit(t, done, lambda: click.echo(f"token {done.id or token_id} revoked"))


# --- gateways ---------------------------------------------------------------------------------


@admin.group()
def gateway() -> None:
    """Gateways and their front doors."""


@gateway.command("add")
@click.argument("gateway_id")
@click.option("--region", required=True, help="where the gateway serves devices")
@click.option("--front-door", help="udp://HOST:PORT, the first front door (id fd1)")
@click.option("--priority", type=int, default=10, help="lower is preferred")
@click.pass_context
@run
async def gateway_add(
    ctx: click.Context, gateway_id: str, region: str, front_door: str | None, priority: int
) -> None:
    """Add a gateway; prints its gateway-scoped registration token once."""
    t = target(ctx)
    added = await admin_call(
        t,
        "admin.gateway.add",
        p.AddGateway(
            gateway_id=gateway_id, region=region, front_door=front_door, priority=priority
        ),
        p.GatewayAdded,
    )
    emit(t, added, lambda: click.echo(added.token))


@gateway.command("front-door")
@click.argument("gateway_id")
@click.argument("front_door_id")
@click.option("--endpoint", required=True, help="udp://HOST:PORT")
@click.option("--priority", type=int, default=10, help="lower is preferred")
@click.option("--inactive", is_flag=True, help="keep it but do not hand it out")
@click.pass_context
@run
async def gateway_front_door(
    ctx: click.Context,
    gateway_id: str,
    front_door_id: str,
    endpoint: str,
    priority: int,
    inactive: bool,
) -> None:
    """Add or change a front door of a gateway."""
    t = target(ctx)
    done = await admin_call(
        t,
        "admin.gateway.front_door",
        p.SetFrontDoor(
            gateway_id=gateway_id,
            front_door_id=front_door_id,
            endpoint=endpoint,
            priority=priority,
            active=not inactive,
        ),
        p.Done,
    )
    emit(t, done, lambda: click.echo(f"front door {done.id or gateway_id}/{front_door_id} set"))


@gateway.command("disable")
@click.argument("gateway_id")
@click.option("--reason", default="", help="recorded in the event log")
@click.pass_context
@run
async def gateway_disable(ctx: click.Context, gateway_id: str, reason: str) -> None:
    """Take a gateway out of placement and catalogs."""
    t = target(ctx)
    done = await admin_call(
        t,
        "admin.gateway.status",
        p.SetGatewayStatus(gateway_id=gateway_id, active=False, reason=reason),
        p.Done,
    )
    emit(t, done, lambda: click.echo(f"gateway {done.id or gateway_id} disabled"))


@gateway.command("enable")
@click.argument("gateway_id")
@click.pass_context
@run
async def gateway_enable(ctx: click.Context, gateway_id: str) -> None:
    """Put a disabled gateway back into placement and catalogs."""
    t = target(ctx)
    done = await admin_call(
        t, "admin.gateway.status", p.SetGatewayStatus(gateway_id=gateway_id, active=True), p.Done
    )
    emit(t, done, lambda: click.echo(f"gateway {done.id or gateway_id} enabled"))


# --- egress -----------------------------------------------------------------------------------


@admin.group()
def egress() -> None:
    """Egress pools: where traffic leaves, per exit country."""


@egress.command("add")
@click.argument("pool_id")
@click.option("--region", required=True, help="the region whose gateways use this pool")
@click.option("--countries", required=True, help="comma-separated ISO codes")
@click.option("--ips", default="", help="comma-separated addresses or CIDRs")
@click.option("--provider", default="static", help="who provides the addresses")
@click.option(
    "--devices-per-address",
    type=click.IntRange(1, 65535),
    default=128,
    show_default=True,
    help="capacity: devices one source address carries (load is measured against it)",
)
@click.option(
    "--transfer-per-address",
    default=None,
    help="capacity: bytes one address may move per usage period, e.g. 20TiB (optional)",
)
@click.pass_context
@run
async def egress_add(
    ctx: click.Context,
    pool_id: str,
    region: str,
    countries: str,
    ips: str,
    provider: str,
    devices_per_address: int,
    transfer_per_address: str | None,
) -> None:
    """Add or redefine an egress pool. Its load and headroom are measured from the devices
    assigned to its addresses; a redefinition may not drop an address devices still use."""
    t = target(ctx)
    done = await admin_call(
        t,
        "admin.egress.define",
        p.DefineEgress(
            pool_id=pool_id,
            provider=provider,
            region=region,
            countries=_csv(countries),
            ips=_csv(ips),
            devices_per_address=devices_per_address,
            transfer_per_address=parse_size(transfer_per_address) if transfer_per_address else None,
        ),
        p.Done,
    )
    emit(t, done, lambda: click.echo(f"egress pool {pool_id} defined"))


# --- device lifecycle -------------------------------------------------------------------------


def _lifecycle(command: str, verb: str) -> Any:
    @click.argument("device_id")
    @click.option("--reason", default="", help="recorded in the event log")
    @json_option
    @click.pass_context
    @run
    async def action(ctx: click.Context, device_id: str, reason: str, as_json: bool) -> None:
        t = target(ctx)
        done = await admin_call(
            t, command, p.DeviceAction(device_id=device_id, reason=reason), p.Done
        )
        emit(t, done, lambda: click.echo(f"device {done.id or device_id} {verb}"))

    action.__doc__ = f"Mark DEVICE_ID (its id or a unique prefix) {verb}."
    return action


admin.command("revoke")(_lifecycle("admin.device.revoke", "revoked"))
admin.command("suspend")(_lifecycle("admin.device.suspend", "suspended"))
admin.command("resume")(_lifecycle("admin.device.resume", "resumed"))


@admin.group()
def usage() -> None:
    """Device usage against the tier's byte limit."""


@usage.command("reset")
@click.argument("device_id")
@click.option("--period", help="the period to reset, e.g. 2026-11 (default: the current one)")
@json_option
@click.pass_context
@run
async def usage_reset(
    ctx: click.Context, device_id: str, period: str | None, as_json: bool
) -> None:
    """Forget DEVICE_ID's usage for a period (an event); an over-quota device may then resume."""
    t = target(ctx)
    done = await admin_call(
        t, "admin.usage.reset", p.ResetUsage(device_id=device_id, period=period), p.Done
    )
    emit(t, done, lambda: click.echo(f"usage of device {done.id or device_id} reset"))


@admin.command("explain-placement")
@click.option("--tier", "tier_name", required=True, help="the tier of the would-be device")
@click.option("--region", help="preferred region")
@click.option("--exit-country", help="where traffic should leave (ISO code)")
@json_option
@click.pass_context
@run
async def explain_placement(
    ctx: click.Context,
    tier_name: str,
    region: str | None,
    exit_country: str | None,
    as_json: bool,
) -> None:
    """Show where a device with these hints would land: every eligible gateway ranked with its
    load, peers, heartbeat age, front door and egress headroom, the winner marked, and why every
    other candidate was rejected."""
    t = target(ctx)
    res = await admin_call(
        t,
        "admin.explain_placement",
        p.ExplainPlacement(tier=tier_name, region=region, exit_country=exit_country),
        p.PlacementExplained,
    )

    def text() -> None:
        if res.gateway_id:
            click.echo(
                f"chosen: gateway {res.gateway_id} via {res.front_door_id} "
                f"({res.endpoint}), egress {res.egress_pool_id or '-'}"
            )
        else:
            assert res.error is not None
            click.echo(f"no placement: {res.error.code}: {res.error.detail}")
        if res.candidates:
            click.echo(f"candidates, ranked by {'; then '.join(res.ranking)}:")
            for c in res.candidates:
                mark = "*" if c.chosen else " "
                pool = (
                    f"egress {c.egress_pool_id} headroom {c.egress_headroom:.0%}"
                    if c.egress_pool_id is not None and c.egress_headroom is not None
                    else "egress -"
                )
                click.echo(
                    f" {mark}{c.rank:>3} {c.gateway_id} ({c.region}) load {c.load:.2f} "
                    f"peers {c.peer_count} heartbeat {c.heartbeat_age_s:.0f}s ago "
                    f"door {c.front_door_id} priority {c.front_door_priority} {pool}"
                    + ("  <- chosen" if c.chosen else "")
                )
        for r in res.rejected:
            click.echo(f"  rejected {r.kind} {r.id}: {r.reason}")

    emit(t, res, text)


# --- catalog signing key ---------------------------------------------------------------------


@admin.group("catalog-key")
def catalog_key() -> None:
    """Rotate the catalog signing key: announce the next one, then activate it."""


def activation_warning(res: SigningKeyChanged) -> str | None:
    """The devices an activation strands: they never fetched the key now signing catalogs."""
    r = res.reach
    if r is None or r.devices_with_key >= r.devices_active:
        return None
    missing = r.devices_active - r.devices_with_key
    return (
        f"warning: {missing} of {r.devices_active} active devices had not fetched key "
        f"{r.key_id}; they reject catalogs signed by it (failover fails) until re-enrolled"
    )


def _key_step(command: str, verb: str) -> Any:
    @json_option
    @click.pass_context
    @run
    async def step(ctx: click.Context, as_json: bool) -> None:
        from damm.control.handlers.signing_keys import SigningKeyChanged

        t = target(ctx)
        res = await admin_call(t, command, p.Empty(), SigningKeyChanged)
        where = (
            "in every region's catalog"
            if res.published
            else "recorded; the leader has not published it in every catalog yet"
        )
        emit(
            t,
            res,
            lambda: click.echo(f"{verb} signing key {res.key_id} ({res.public_key}): {where}"),
        )
        if (warning := activation_warning(res)) is not None:
            click.echo(warning, err=True)

    return step


catalog_key.command("announce", help="Stage a next key and announce it in current catalogs.")(
    _key_step("admin.catalog.announce", "announced")
)
catalog_key.command(
    "activate",
    help="Sign with the announced key; retire the current one. Warns with the number of active "
    "devices that never fetched the announced key.",
)(_key_step("admin.catalog.activate", "activated"))


@catalog_key.command("status")
@json_option
@click.pass_context
@run
async def catalog_key_status(ctx: click.Context, as_json: bool) -> None:
    """The signing key, and how many active devices fetched each announced key."""
    from damm.control.handlers.signing_keys import CatalogKeyStatus

    t = target(ctx)
    res = await admin_call(t, "admin.catalog.status", p.Empty(), CatalogKeyStatus)

    def text() -> None:
        click.echo(f"signing key {res.signing_key_id}")
        if not res.announced:
            click.echo("no announced key (run: damm admin catalog-key announce)")
        for r in res.announced:
            click.echo(
                f"announced {r.key_id}: fetched by {r.devices_with_key} of "
                f"{r.devices_active} active devices"
            )

    emit(t, res, text)


# --- one device -------------------------------------------------------------------------------


@admin.command("device")
@click.argument("device_id")
@json_option
@click.pass_context
@run
async def device_show(ctx: click.Context, device_id: str, as_json: bool) -> None:
    """Show one device (its id or a unique prefix): state, placement, key, usage per period."""
    from damm.cli.ids import resolve

    t = target(ctx)
    device_id = await resolve(t, "device", device_id)
    rows = await query(
        t,
        "SELECT d.*, t.byte_limit, f.endpoint FROM devices d LEFT JOIN tiers t USING (tier)"
        " LEFT JOIN front_doors f ON f.gateway_id = d.gateway_id"
        " AND f.front_door_id = d.front_door_id WHERE d.device_id = $1",
        device_id,
    )
    if not rows:
        raise DammError(Code.NOT_FOUND, f"device {device_id!r}")
    device = dict(rows[0])
    usage = _records(
        await query(
            t,
            "SELECT period, rx_bytes, tx_bytes FROM usage_totals WHERE device_id = $1"
            " ORDER BY period DESC",
            device_id,
        )
    )
    device["usage"] = usage

    def text() -> None:
        for key in (
            "device_id",
            "status",
            "status_reason",
            "tier",
            "gateway_id",
            "front_door_id",
            "endpoint",
            "address",
            "address6",
            "egress_pool_id",
            "egress_address",
            "public_key",
            "key_expires_at",
            "enrolled_at",
            "updated_at",
            "byte_limit",
        ):
            click.echo(f"{key:15} {'' if device[key] is None else device[key]}")
        for u in usage:
            click.echo(f"usage {u['period']:9} rx {u['rx_bytes']:>14,} tx {u['tx_bytes']:>14,}")

    emit(t, device, text)


# --- NATS configuration ------------------------------------------------------------------------


@admin.command("nats-config")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write here (mode 0600) instead of stdout",
)
@click.option("--cluster", is_flag=True, help="the three-node cluster file (ops/nats-cluster.conf)")
@click.pass_context
@run
async def nats_config(ctx: click.Context, out: Path | None, cluster: bool) -> None:
    """Render the production nats-server config (the same for any fleet: the control plane's
    auth callout decides each device and gateway connection)."""
    from damm.private_files import write_atomic
    from damm.stack.nats_config import production, production_cluster

    text = production_cluster() if cluster else production()
    if out is None:
        click.echo(text, nl=False)
        return
    write_atomic(out, text, mode=0o600)
    click.echo(f"wrote {out}", err=True)


@admin.command("callout-key")
@click.argument("seed_file", type=click.Path(dir_okay=False, path_type=Path))
def callout_key(seed_file: Path) -> None:
    """Make the auth callout issuer's seed (0600) for `damm control run`
    (DAMM_CALLOUT_SEED_FILE), and print the environment nats-server needs."""
    from damm.keys import nats_identity
    from damm.private_files import read_secret, write_atomic

    if seed_file.exists():
        seed = read_secret(seed_file, "callout seed").encode()
    else:
        seed = nats_identity.new_account_seed()
        write_atomic(seed_file, seed, mode=0o600)
    issuer = nats_identity.public_key(seed)
    click.echo(f"DAMM_CALLOUT_ISSUER={issuer}")
    click.echo(f"DAMM_CALLOUT_NONCE_USER={nats_identity.as_user_key(issuer)}")


# --- replay ----------------------------------------------------------------------------------


@admin.command()
@click.option(
    "--verify",
    "check",
    is_flag=True,
    help="rebuild beside the live read models and compare, changing nothing",
)
@json_option
@click.pass_context
@run
async def replay(ctx: click.Context, check: bool, as_json: bool) -> None:
    """Rebuild the read models from event 1 (or, with --verify, check them against the log)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from damm.projections import replay as rp

    t = target(ctx)
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=t.json, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("replaying events", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        async def body(nc: NATS) -> Any:
            dsn = t.database()
            if check:
                return await rp.verify(nc, dsn, progress=progress)
            return await rp.replace_live(nc, dsn, progress=progress)

        result = await with_nats(t, "admin", body)
    if not check:
        emit(
            t,
            {"rebuilt_to": result},
            lambda: click.echo(f"read models rebuilt from the log up to event {result}"),
        )
        return
    report = result
    summary = {
        "ok": report.ok,
        "seq": report.seq,
        "differing": {
            name: {"missing_in_live": d.missing_in_live, "extra_in_live": d.extra_in_live}
            for name, d in report.tables.items()
            if not d.ok
        },
        "quarantined": [
            {"seq": q.seq, "subject": q.subject, "event_type": q.event_type, "error": q.error}
            for q in report.quarantined
        ],
    }
    emit(
        t,
        summary,
        lambda: click.echo(
            f"read models match the log up to event {report.seq}"
            if report.ok
            else "\n".join(rp.describe(report))
        ),
    )
    if report.quarantined:
        raise SystemExit(Code.EVENT_QUARANTINED.exit_status)
    if not report.ok:
        raise SystemExit(1)


# --- lists ------------------------------------------------------------------------------------


_LISTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "devices": (
        "SELECT device_id, status, status_reason, tier, gateway_id, address, public_key,"
        " enrolled_at FROM devices ORDER BY enrolled_at, device_id",
        (
            "device_id",
            "status",
            "status_reason",
            "tier",
            "gateway_id",
            "address",
            "public_key",
            "enrolled_at",
        ),
    ),
    "gateways": (
        "SELECT g.gateway_id, g.region, g.active, g.public_key IS NOT NULL AS registered,"
        " h.last_heartbeat, h.peer_count, h.load,"
        " (SELECT string_agg(f.front_door_id || '=' || f.endpoint, ' ' ORDER BY f.priority)"
        "  FROM front_doors f WHERE f.gateway_id = g.gateway_id) AS front_doors"
        " FROM gateways g LEFT JOIN gateway_health h USING (gateway_id) ORDER BY 1",
        (
            "gateway_id",
            "region",
            "active",
            "registered",
            "last_heartbeat",
            "peer_count",
            "load",
            "front_doors",
        ),
    ),
    "tokens": (
        "SELECT token_id, tier, uses, max_uses, active_sessions, expires_at, revoked,"
        " issued_by FROM tokens ORDER BY issued_at",
        (
            "token_id",
            "tier",
            "uses",
            "max_uses",
            "active_sessions",
            "expires_at",
            "revoked",
            "issued_by",
        ),
    ),
    "tiers": (
        "SELECT tier, regions, exit_countries, session_limit, byte_limit, key_lifetime_s,"
        " status FROM tiers ORDER BY tier",
        (
            "tier",
            "regions",
            "exit_countries",
            "session_limit",
            "byte_limit",
            "key_lifetime_s",
            "status",
        ),
    ),
    "pools": (
        "SELECT p.pool_id, p.provider, p.region, p.countries, p.ips, p.devices_per_address,"
        " (SELECT count(*) FROM devices d WHERE d.egress_pool_id = p.pool_id"
        "  AND d.status <> 'revoked') AS assigned, p.active FROM egress_pools p ORDER BY pool_id",
        (
            "pool_id",
            "provider",
            "region",
            "countries",
            "ips",
            "devices_per_address",
            "assigned",
            "active",
        ),
    ),
}


def _list_command(name: str) -> Any:
    sql, columns = _LISTS[name]

    @json_option
    @click.pass_context
    @run
    async def listing(ctx: click.Context, as_json: bool) -> None:
        t = target(ctx)
        if t.json:
            await stream_json(t, sql, sys.stdout.buffer)
            return
        rows = _records(await query(t, sql))
        emit(t, rows, lambda: table(name, columns, [[r[c] for c in columns] for r in rows]))

    listing.__doc__ = f"List {name} (read model)."
    return listing


for _name in _LISTS:
    admin.command(_name)(_list_command(_name))

admin.add_command(audit)
admin.add_command(report)
