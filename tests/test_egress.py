"""Egress decisions without a server: address assignment, pool load, and the NAT plan."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damm.agent import egress as nat
from damm.domain import egress
from damm.errors import Code, DammError

SOURCES = st.sampled_from([f"10.44.0.{i}" for i in range(10, 30)])
TARGETS = st.sampled_from([f"198.51.100.{i}" for i in range(1, 6)])
MAPS = st.dictionaries(SOURCES, TARGETS, max_size=20)


def test_addresses_expand_networks_and_skip_ipv6() -> None:
    got = egress.addresses(["198.51.100.0/30", "203.0.113.7", "2001:db8::/64", "198.51.100.1"])
    assert got == ("198.51.100.1", "198.51.100.2", "203.0.113.7")


def test_addresses_refuse_huge_ranges_and_garbage() -> None:
    with pytest.raises(DammError) as big:
        egress.addresses(["10.0.0.0/8"])
    assert big.value.code is Code.INVALID_ARGUMENT
    with pytest.raises(DammError) as bad:
        egress.addresses(["not-an-ip"])
    assert bad.value.code is Code.INVALID_ARGUMENT


def test_assign_fills_evenly_then_lowest() -> None:
    pool = ("198.51.100.1", "198.51.100.2", "198.51.100.3")
    used: Counter[str] = Counter()
    picks = []
    for _ in range(7):
        a = egress.assign(pool, used)
        assert a is not None
        used[a] += 1
        picks.append(a)
    assert picks[:3] == list(pool) and max(used.values()) - min(used.values()) <= 1
    assert egress.assign((), used) is None


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, unique=True), st.integers(0, 60))
def test_assign_is_balanced_and_deterministic(pool: list[str], n: int) -> None:
    used: Counter[str] = Counter()
    for _ in range(n):
        first = egress.assign(pool, used)
        assert first == egress.assign(list(pool), Counter(used))  # same inputs, same answer
        assert first is not None
        used[first] += 1
    counts = [used[a] for a in pool]
    assert max(counts) - min(counts) <= 1


def test_orphaned_and_load() -> None:
    used = Counter({"198.51.100.1": 2, "198.51.100.2": 0})
    assert egress.orphaned(["198.51.100.3"], used) == ("198.51.100.1",)
    assert egress.orphaned(["198.51.100.1"], used) == ()
    assert egress.load(64, 1, 128) == 0.5
    assert egress.load(500, 1, 128) == 1.0
    assert egress.load(0, 0) == 1.0


# --- the NAT plan ------------------------------------------------------------------------------


def listing(elements: dict[str, str], *, extra: list[dict[str, object]] | None = None) -> dict:
    """What ``nft -j list table ip damm`` prints for a table DAMM built (plus ``extra``)."""
    cmds = nat.NatPlan(rebuild=True, add=tuple(sorted(elements.items()))).commands()
    items: list[dict[str, object]] = [{"metainfo": {"json_schema_version": 1}}]
    for c in cmds:
        ((kind, body),) = c["add"].items() if "add" in c else (("skip", None),)
        if kind in ("table", "chain", "rule"):
            items.append({kind: dict(body, handle=1)})
        elif kind == "map":
            m = dict(body)
            if elements:
                m["elem"] = [[k, v] for k, v in sorted(elements.items())]
            items.append({"map": m})
    return {"nftables": items + (extra or [])}


@given(MAPS, MAPS)
def test_full_plan_reaches_desired(have: dict[str, str], want: dict[str, str]) -> None:
    state = nat.parse(listing(have))
    assert state.intact and state.elements == have
    p = nat.plan(state, want)
    assert not p.rebuild
    assert nat.after(have, p) == want
    assert nat.plan(nat.parse(listing(want)), want).is_empty


@given(MAPS)
def test_missing_or_tampered_table_is_rebuilt(want: dict[str, str]) -> None:
    for state in (
        nat.parse(None),
        nat.parse(listing({"10.44.0.99": "192.0.2.1"}, extra=[{"rule": {"chain": "x"}}])),
        nat.parse(listing({}, extra=[{"set": {"name": "stray"}}])),
    ):
        p = nat.plan(state, want)
        assert p.rebuild and nat.after(state.elements, p) == want


def test_a_rule_for_another_overlay_is_not_ours() -> None:
    with_overlay = nat.NatPlan(rebuild=True, overlay="10.44.0.0/24").commands()
    rule = next(c["add"]["rule"] for c in with_overlay if "rule" in c.get("add", {}))
    assert rule["expr"][0]["match"]["op"] == "!="
    built = listing({})
    for item in built["nftables"]:
        if "rule" in item:
            item["rule"]["expr"] = rule["expr"]
    assert nat.parse(built, "10.44.0.0/24").intact
    assert not nat.parse(built, "10.45.0.0/24").intact
    assert not nat.parse(built).intact


def test_foreign_rule_in_our_chain_is_not_intact() -> None:
    tampered = listing({"10.44.0.10": "198.51.100.1"})
    tampered["nftables"].append(
        {"rule": {"family": "ip", "table": "damm", "chain": "egress", "expr": [{"accept": None}]}}
    )
    assert not nat.parse(tampered).intact


@settings(max_examples=200)
@given(MAPS, st.lists(st.tuples(SOURCES, st.none() | TARGETS), max_size=30))
def test_incremental_equals_full(
    start: dict[str, str], changes: list[tuple[str, str | None]]
) -> None:
    """Applying each peer-set change as its own small plan ends where one full plan ends."""
    applied = dict(start)
    want = dict(start)
    for src, target in changes:
        if target is None:
            want.pop(src, None)
        else:
            want[src] = target
        step = nat.plan_change(applied, want, [src])
        applied = nat.after(applied, step)
    full = nat.after(start, nat.plan(nat.parse(listing(start)), want))
    assert applied == full == want


def test_plan_commands_change_is_delete_then_add() -> None:
    p = nat.plan_change(
        {"10.44.0.10": "198.51.100.1"}, {"10.44.0.10": "198.51.100.2"}, ["10.44.0.10"]
    )
    assert p.commands() == [
        {"delete": {"element": {"family": "ip", "table": "damm", "name": "egress",
                                "elem": ["10.44.0.10"]}}},
        {"add": {"element": {"family": "ip", "table": "damm", "name": "egress",
                             "elem": [["10.44.0.10", "198.51.100.2"]]}}},
    ]  # fmt: skip


def test_desired_map_uses_the_ipv4_host_route() -> None:
    peers = {
        "k1": (("10.44.0.10/32", "fd00::a/128"), "198.51.100.1"),
        "k2": (("10.44.0.11/32",), None),
        "k3": (("fd00::c/128",), "198.51.100.2"),
    }
    assert nat.desired_map(peers) == {"10.44.0.10": "198.51.100.1"}


def test_pool_load_is_the_tighter_of_devices_and_traffic() -> None:
    assert egress.traffic_load(500, 2, None) == 0.0  # no allowance declared: not a constraint
    assert egress.traffic_load(500, 2, 1000) == 0.25
    assert egress.traffic_load(5000, 2, 1000) == 1.0
    assert egress.pool_load(64, 0, 1, 128) == 0.5
    assert egress.pool_load(64, 900, 1, 128, 1000) == 0.9
    assert egress.pool_load(0, 900, 0, 128, 1000) == 1.0
