"""Kill and pause every part under a steady enrollment load; the invariants hold every time.

The CI-sized run kills the event stream's leader node and a control-plane process at 100
enrollments/s; the slow run goes through every fault at 200/s and compares p99 with a single
node. Figures land in test-artefacts/chaos-*.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from damm.errors import DammError
from damm.projections.replay import VerifyReport, verify
from damm.protocol.bus import connect
from damm.stack.postgres import Postgres
from tests.chaos.harness import (
    Fault,
    Outcome,
    Stack,
    check_invariants,
    codes,
    details,
    drive,
    failure_window,
    kill_node,
    kill_plane,
    p99_outside,
    pause_node,
    pause_plane,
    pause_postgres,
    read_log,
)

ARTEFACTS = Path(
    os.environ.get("DAMM_TEST_ARTEFACTS", Path(__file__).resolve().parents[2] / "test-artefacts")
)


@pytest.fixture
def root() -> AsyncIterator[Path]:  # type: ignore[misc]
    path = Path(tempfile.mkdtemp(prefix="damm-chaos-", dir="/tmp"))
    yield path
    if not os.environ.get("DAMM_CHAOS_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


async def run_with_faults(
    stack: Stack,
    rate: float,
    warmup: float,
    faults: list[Callable[[], Awaitable[Fault]]],
    gap: float,
) -> tuple[list[Outcome], list[Fault]]:
    duration = warmup + len(faults) * gap + gap
    load = asyncio.create_task(drive(stack, rate, duration))
    done: list[Fault] = []
    await asyncio.sleep(warmup)  # steady state before the first fault
    for inject in faults:
        started = asyncio.get_running_loop().time()
        done.append(await inject())
        await asyncio.sleep(max(0.0, gap - (asyncio.get_running_loop().time() - started)))
    return await load, done


async def verdict(stack: Stack, outcomes: list[Outcome], faults: list[Fault], name: str) -> dict:  # type: ignore[type-arg]
    nc = await connect(stack.url, user="control", password=stack.password, name="chaos-check")
    try:
        envs = await read_log(nc)
    finally:
        await nc.close()
    problems = check_invariants(envs, outcomes)
    report = await _verify(stack)
    if not report.ok:
        problems.append(
            "replay --verify differs: "
            + ", ".join(
                f"{name} ({diff.missing_in_live} missing, {diff.extra_in_live} extra in live)"
                for name, diff in sorted(report.differing.items())
            )
        )
    p99, n = p99_outside(outcomes, faults)
    figures = {
        "requests": len(outcomes),
        "enrolled": sum(1 for o in outcomes if o.enrolled),
        "codes": dict(codes(outcomes)),
        "why": dict(details(outcomes).most_common(8)),
        "windows_s": {f.name: round(failure_window(outcomes, f), 3) for f in faults},
        "p99_outside_faults_s": round(p99, 4),
        "p99_samples": n,
        "problems": problems,
    }
    await asyncio.to_thread(_write, f"chaos-{name}.json", json.dumps(figures, indent=2))
    return figures


async def _verify(stack: Stack) -> VerifyReport:
    """replay --verify, once the projector has caught up with the log."""
    nc = await connect(stack.url, user="control", password=stack.password, name="chaos-verify")
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            try:
                return await verify(nc, stack.dsn)
            except DammError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


def _write(name: str, text: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / name).write_text(text)


async def test_leader_and_control_plane_kills_lose_nothing(root: Path, dsn: str) -> None:
    stack = Stack(root, dsn, nodes=3, planes=2)
    await stack.start()
    try:
        leader = await stack.stream_leader()
        outcomes, faults = await run_with_faults(
            stack,
            rate=100,
            warmup=3,
            faults=[
                lambda: kill_node(stack, leader, 1.0),
                lambda: kill_plane(stack, 1, 0.5),
            ],
            gap=5,
        )
        figures = await verdict(stack, outcomes, faults, "ci")
    finally:
        await stack.stop()
    assert figures["problems"] == [], figures
    assert all(o.enrolled for o in outcomes), figures["codes"]
    windows = figures["windows_s"]
    # The target for the stream leader is 5 s; NATS draws its Raft election timeout
    # between about 4 and 9 s, so a run may miss it by design (measured 0-5 s here, the note
    # has the figures). Any more than an election plus one request timeout is a regression.
    assert windows[f"SIGKILL {leader}"] <= 14.0, figures
    assert windows["SIGKILL control-1"] <= 2.0, figures


@pytest.mark.slow
async def test_every_fault_in_turn_at_200_per_second(root: Path) -> None:
    """The issue's figures: each fault's failure window and p99 away from faults, on a
    three-node cluster with two control planes, against one node with one control plane."""
    pg = Postgres(root / "pgdata")
    dsn = await asyncio.to_thread(pg.start)
    try:
        conn = await asyncpg.connect(dsn)
        await conn.execute("CREATE DATABASE single_node")
        await conn.close()
        single_dsn = dsn.replace("/postgres?", "/single_node?")
        single = Stack(root / "single", single_dsn, nodes=1, planes=1)
        await single.start()
        try:
            baseline, _ = await run_with_faults(single, rate=200, warmup=10, faults=[], gap=0)
        finally:
            await single.stop()
        base_p99, base_n = p99_outside(baseline, [])
        stack = Stack(root / "cluster", dsn, nodes=3, planes=2)
        await stack.start()
        try:
            leader = await stack.stream_leader()
            other = next(n.server_name for n in stack.servers if n.server_name != leader)
            outcomes, faults = await run_with_faults(
                stack,
                rate=200,
                warmup=4,
                faults=[
                    lambda: kill_node(stack, leader, 2.0),
                    lambda: kill_node(stack, other, 2.0),
                    lambda: pause_node(stack, leader, 3.0),
                    lambda: pause_node(stack, other, 3.0),
                    lambda: kill_plane(stack, 1, 1.0),
                    lambda: pause_plane(stack, 1, 3.0),
                    lambda: pause_postgres(pg.pgdata, 3.0),
                ],
                gap=10,
            )
            figures = await verdict(stack, outcomes, faults, "slow")
        finally:
            await stack.stop()
    finally:
        await asyncio.to_thread(pg.stop)
    figures["single_node_p99_s"] = round(base_p99, 4)
    figures["single_node_samples"] = base_n
    await asyncio.to_thread(_write, "chaos-slow.json", json.dumps(figures, indent=2))
    assert figures["problems"] == [], figures
    assert all(o.enrolled for o in outcomes), figures["codes"]
