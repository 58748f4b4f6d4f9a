"""`damm orchestrate plan|apply|run`: shape the fleet from a topology file, within guardrails."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click
import msgspec

from damm.cli.common import Target, emit, run, target
from damm.errors import Code, DammError
from damm.orchestrator import actions as a
from damm.orchestrator import topology as topo
from damm.orchestrator.apply import StepResult
from damm.orchestrator.loop import Orchestrator, build_providers
from damm.private_files import write_atomic

T = TypeVar("T")


def _state_dir() -> Path:
    return Path(os.environ.get("DAMM_HOME", ".damm")) / "orchestrator"


def _common(fn: Callable[..., object]) -> Callable[..., object]:
    fn = click.option(
        "--topology",
        "topology_path",
        required=True,
        type=click.Path(path_type=Path, dir_okay=False),
        help="The desired fleet (TOML); see ops/fleet.example.toml.",
    )(fn)
    fn = click.option(
        "--state-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="Token key and provider inventories (default $DAMM_HOME/orchestrator).",
    )(fn)
    fn = click.option(
        "--heartbeat-ttl",
        type=float,
        default=lambda: float(os.environ.get("DAMM_HEARTBEAT_TTL", "90")),
        show_default="90 or DAMM_HEARTBEAT_TTL",
        help="Seconds a heartbeat keeps a gateway healthy (as the control plane counts them).",
    )(fn)
    return click.option("--json", "as_json", is_flag=True, help="machine-readable output")(fn)


async def _session(
    t: Target,
    topology_path: Path,
    state_dir: Path | None,
    heartbeat_ttl: float,
    body: Callable[[Orchestrator], Awaitable[T]],
) -> T:
    desired = await asyncio.to_thread(topo.load, topology_path)
    state = state_dir or _state_dir()
    nc = await t.connect("admin")
    try:
        orch = Orchestrator(
            nc=nc,
            database_url=t.database(),
            topology=desired,
            providers=build_providers(desired, state),
            state_dir=state,
            agent_nats_url=t.nats(),
            heartbeat_ttl_s=heartbeat_ttl,
        )
        return await body(orch)
    finally:
        await nc.close()


def _print_plan(result: a.Plan) -> None:
    if result.empty:
        click.echo(f"plan {result.plan_id}: nothing to do")
        return
    click.echo(f"plan {result.plan_id}: {len(result.actions)} action(s)")
    for n, action in enumerate(result.actions):
        click.echo(
            f"  {n}. {a.kind_of(action)} {a.target_of(action)} ({action.region}, "
            f"{action.provider}): {action.reason}"
        )
    if result.refusals:
        click.echo(f"refused by guardrails: {len(result.refusals)}")
        for r in result.refusals:
            click.echo(
                f"  - {r.code}: {a.kind_of(r.action)} {a.target_of(r.action)}: {r.detail} "
                f"(wanted because: {r.action.reason})"
            )


@click.group()
def orchestrate() -> None:
    """Plan and apply the fleet's shape from a topology file, through providers."""


@orchestrate.command("plan")
@_common
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Save the plan.")
@click.pass_context
@run
async def plan_cmd(
    ctx: click.Context,
    topology_path: Path,
    state_dir: Path | None,
    heartbeat_ttl: float,
    as_json: bool,
    out: Path | None,
) -> None:
    """List the actions that bring the fleet to the topology, each with its reason."""
    t = target(ctx)
    result = await _session(t, topology_path, state_dir, heartbeat_ttl, lambda orch: orch.plan())
    if out is not None:
        await asyncio.to_thread(write_atomic, out, msgspec.json.encode(result), 0o600)
    emit(t, result, lambda: _print_plan(result))


def _read_plan(path: Path) -> a.Plan:
    try:
        return msgspec.json.decode(path.read_bytes(), type=a.Plan)
    except OSError as exc:
        raise DammError(Code.PLAN_INVALID, f"{path}: {exc.strerror}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DammError(Code.PLAN_INVALID, f"{path}: {exc}") from None


def _print_results(results: list[StepResult]) -> None:
    if not results:
        click.echo("nothing to do")
    for r in results:
        ref = f" [{r.provider_ref}]" if r.provider_ref else ""
        err = f": {r.error}" if r.error else ""
        click.echo(
            f"  {r.step}. {a.kind_of(r.action)} {a.target_of(r.action)}: {r.outcome}{ref}{err}"
        )


@orchestrate.command("apply")
@_common
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A plan saved by `plan --out`; refused when its inputs changed since.",
)
@click.pass_context
@run
async def apply_cmd(
    ctx: click.Context,
    topology_path: Path,
    state_dir: Path | None,
    heartbeat_ttl: float,
    as_json: bool,
    plan_path: Path | None,
) -> None:
    """Run a plan through the providers; every step is an event. Safe to run again."""
    t = target(ctx)
    saved = await asyncio.to_thread(_read_plan, plan_path) if plan_path else None

    async def body(orch: Orchestrator) -> tuple[a.Plan, list[StepResult]]:
        current = saved
        if current is None:
            current = await orch.plan()
        else:
            await orch.check_fresh(current)
        return current, await orch.apply(current)

    applied, results = await _session(t, topology_path, state_dir, heartbeat_ttl, body)
    failed = [r for r in results if r.outcome == "failed"]

    def text() -> None:
        click.echo(f"plan {applied.plan_id}:")
        _print_results(results)

    rows = [msgspec.structs.asdict(_row(r)) for r in results]
    emit(t, {"plan_id": applied.plan_id, "steps": rows}, text)
    if failed:
        sys.exit(1)


class _Row(msgspec.Struct):
    step: int
    kind: str
    target: str
    outcome: str
    provider_ref: str
    error: str


def _row(r: StepResult) -> _Row:
    return _Row(
        r.step, a.kind_of(r.action), a.target_of(r.action), r.outcome, r.provider_ref, r.error
    )


@orchestrate.command("run")
@_common
@click.option("--interval", default=10.0, show_default=True, type=float, help="Seconds per round.")
@click.option(
    "--lease-ttl",
    default=60.0,
    show_default=True,
    type=float,
    help="Seconds a round that acts holds the lease; other loops act only once it lapses.",
)
@click.option("--rounds", default=None, type=int, help="Stop after this many rounds.")
@click.pass_context
@run
async def run_cmd(
    ctx: click.Context,
    topology_path: Path,
    state_dir: Path | None,
    heartbeat_ttl: float,
    as_json: bool,
    interval: float,
    lease_ttl: float,
    rounds: int | None,
) -> None:
    """Reconcile continuously: replace dead gateways, follow load, within the guardrails."""
    t = target(ctx)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    async def body(orch: Orchestrator) -> int:
        return await orch.run(stop, interval_s=interval, lease_ttl_s=lease_ttl, max_rounds=rounds)

    acted = await _session(t, topology_path, state_dir, heartbeat_ttl, body)
    emit(t, {"rounds_acted": acted}, lambda: click.echo(f"rounds that acted: {acted}"))
