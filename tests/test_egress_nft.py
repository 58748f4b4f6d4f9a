"""The egress reconciler against real nftables, in a namespace this test creates."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest

from damm import netns as netlab
from damm.agent import egress as nat

pytestmark = pytest.mark.netns

_ok, _why = netlab.can_run_netns()
if not _ok or shutil.which("nft") is None:
    pytest.skip(
        f"nftables tests skipped: {_why if not _ok else 'nft missing'}", allow_module_level=True
    )


@pytest.fixture
async def ns() -> AsyncIterator[str]:
    async with netlab.Lab() as lab:
        yield await lab.netns("nat")


async def kernel_map(backend: nat.Nftables) -> dict[str, str]:
    state = nat.parse(await backend.read())
    assert state.intact
    return state.elements


async def test_full_change_tamper_and_removal(ns: str) -> None:
    backend = nat.Nftables(wrapper=("ip", "netns", "exec", ns))
    rec = nat.EgressReconciler(backend)
    want = {f"10.44.0.{i}": f"198.51.100.{1 + i % 3}" for i in range(10, 20)}
    first = await rec.full(want)
    assert first.rebuild and await kernel_map(backend) == want
    assert (await rec.full(want)).is_empty  # converged: nothing to do

    want2 = dict(want)
    want2["10.44.0.10"] = "198.51.100.9"  # moved
    del want2["10.44.0.11"]  # revoked
    want2["10.44.0.30"] = "198.51.100.1"  # enrolled
    step = await rec.change(want2, ["10.44.0.10", "10.44.0.11", "10.44.0.30"])
    assert step.remove == ("10.44.0.10", "10.44.0.11") and len(step.add) == 2
    assert await kernel_map(backend) == want2

    # Someone adds a rule and an element by hand: the full reconcile removes both.
    await netlab.exec_in(ns, "nft", "add", "rule", "ip", "damm", "egress", "counter")
    await netlab.exec_in(
        ns, "nft", "add", "element", "ip", "damm", "egress", "{ 10.44.0.99 : 192.0.2.1 }"
    )
    assert not nat.parse(await backend.read()).intact
    repair = await rec.full(want2)
    assert repair.rebuild and await kernel_map(backend) == want2
    ruleset = (await netlab.exec_in(ns, "nft", "list", "ruleset")).stdout
    assert "counter" not in ruleset and "10.44.0.99" not in ruleset

    # The kernel lost an element behind our back: a change that trips on it falls back to full.
    await netlab.exec_in(ns, "nft", "delete", "element", "ip", "damm", "egress", "{ 10.44.0.12 }")
    want3 = {k: v for k, v in want2.items() if k != "10.44.0.12"}
    await rec.change(want3, ["10.44.0.12"])
    assert await kernel_map(backend) == want3


async def test_the_rule_spares_the_overlay_and_reads_back_as_ours(ns: str) -> None:
    backend = nat.Nftables(wrapper=("ip", "netns", "exec", ns))
    rec = nat.EgressReconciler(backend, overlay="10.44.0.0/24")
    want = {"10.44.0.10": "198.51.100.1"}
    assert (await rec.full(want)).rebuild
    assert (await rec.full(want)).is_empty  # nft's echo of our rule parses as ours
    ruleset = (await netlab.exec_in(ns, "nft", "list", "ruleset")).stdout
    assert "ip daddr != 10.44.0.0/24 snat to ip saddr map @egress" in ruleset
    # A new overlay makes the old rule foreign: the next reconcile rebuilds it.
    rec.overlay = "10.45.0.0/16"
    assert (await rec.full(want)).rebuild
    assert "ip daddr != 10.45.0.0/16" in (await netlab.exec_in(ns, "nft", "list", "ruleset")).stdout


async def test_other_tables_are_left_alone(ns: str) -> None:
    await netlab.exec_in(ns, "nft", "add", "table", "ip", "operator")
    await netlab.exec_in(
        ns, "nft", "add", "chain", "ip", "operator", "x", "{ type filter hook input priority 0; }"
    )
    rec = nat.EgressReconciler(nat.Nftables(wrapper=("ip", "netns", "exec", ns)))
    await rec.full({"10.44.0.10": "198.51.100.1"})
    await rec.full({})
    ruleset = (await netlab.exec_in(ns, "nft", "list", "ruleset")).stdout
    assert "table ip operator" in ruleset and "10.44.0.10" not in ruleset
