from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from damm.domain.ipam import AddressPool, Overlay
from damm.errors import Code, DammError

# --- Overlay ------------------------------------------------------------------------------------


def test_defaults_match_the_network_model() -> None:
    ov = Overlay()
    assert ov.network == IPv4Network("10.44.0.0/24")
    assert ov.gateway == IPv4Address("10.44.0.1")
    assert ov.client_indices == range(10, 255)
    assert ov.capacity == 245
    assert ov.address(10) == IPv4Address("10.44.0.10")
    assert ov.address6(10) is None
    assert ov.gateway6 is None
    assert Overlay.parse() == ov


def test_dual_stack_derives_both_addresses_from_one_index() -> None:
    ov = Overlay.parse("10.44.0.0/16", ula="fd44:44::/64")
    assert ov.address(300) == IPv4Address("10.44.1.44")
    assert ov.address6(300) == IPv6Address("fd44:44::12c")
    assert ov.gateway6 == IPv6Address("fd44:44::1")
    assert ov.index_of(IPv4Address("10.44.1.44")) == 300
    assert ov.index_of("fd44:44::12c") == 300
    assert ov.index_of(" 10.44.1.44 ") == 300


@given(st.integers(min_value=0, max_value=65535))
def test_index_of_inverts_address(index: int) -> None:
    ov = Overlay.parse("10.44.0.0/16", ula="fd44:44::/64")
    assert ov.index_of(ov.address(index)) == index
    v6 = ov.address6(index)
    assert v6 is not None
    assert ov.index_of(v6) == index


def test_custom_offsets() -> None:
    ov = Overlay.parse("192.168.8.0/28", gateway_offset=2, first_client_offset=4)
    assert ov.gateway == IPv4Address("192.168.8.2")
    assert ov.client_indices == range(4, 15)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"cidr": "not-a-net"}, "not a network in CIDR form"),
        ({"cidr": "10.44.0.5/24"}, "host bits set"),
        ({"cidr": "fd00::/64"}, "must be IPv4"),
        ({"cidr": "10.44.0.0/29"}, "leaves no room for clients"),
        ({"cidr": "10.44.0.0/32", "first_client_offset": 2}, "leaves no room for clients"),
        ({"cidr": "10.44.0.0/31", "first_client_offset": 2}, "leaves no room for clients"),
        ({"gateway_offset": 0}, "network address"),
        ({"gateway_offset": 10}, "must be above gateway offset"),
        ({"gateway_offset": 20}, "must be above gateway offset"),
        ({"ula": "2001:db8::/64"}, "not inside fc00::/7"),
        ({"ula": "10.0.0.0/8"}, "must be IPv6"),
        ({"ula": "fd44::1/64"}, "host bits set"),
        ({"ula": "nonsense"}, "not a network in CIDR form"),
        ({"cidr": "10.44.0.0/16", "ula": "fd44::/120"}, "smaller than the IPv4 overlay"),
    ],
)
def test_parse_errors_are_specific(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(DammError) as info:
        Overlay.parse(**kwargs)  # type: ignore[arg-type]
    assert info.value.code is Code.INVALID_ARGUMENT
    assert fragment in info.value.detail


def test_smallest_usable_overlay_has_one_client() -> None:
    ov = Overlay.parse("10.44.0.0/30", first_client_offset=2)
    assert ov.capacity == 1
    assert ov.client_indices == range(2, 3)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(DammError):
        Overlay(network=IPv4Network("10.0.0.0/30"))
    with pytest.raises(DammError):
        Overlay(ula=IPv6Network("2001:db8::/64"))


@pytest.mark.parametrize("index", [-1, 256, 10_000])
def test_address_outside_network(index: int) -> None:
    with pytest.raises(DammError) as info:
        Overlay().address(index)
    assert info.value.code is Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("addr", "fragment"),
    [
        ("10.45.0.1", "not inside overlay"),
        ("fd44::1", "no ULA"),
        ("garbage", "not an IP address"),
    ],
)
def test_index_of_errors(addr: str, fragment: str) -> None:
    with pytest.raises(DammError) as info:
        Overlay().index_of(addr)
    assert fragment in info.value.detail


def test_index_of_v6_beyond_the_v4_twin() -> None:
    ov = Overlay.parse(ula="fd44:44::/64")
    with pytest.raises(DammError, match="no IPv4 twin"):
        ov.index_of("fd44:44::1:0")
    with pytest.raises(DammError, match="not inside"):
        ov.index_of("fd45::1")


# --- AddressPool: examples ----------------------------------------------------------------------


def test_allocate_is_lowest_first_and_reuses_released() -> None:
    pool = AddressPool(Overlay())
    assert [pool.allocate() for _ in range(3)] == [10, 11, 12]
    pool.release(11)
    assert pool.peek(3) == [11, 13, 14]
    assert pool.allocate() == 11
    assert pool.allocate() == 13


def test_exhaustion_raises_pool_exhausted() -> None:
    ov = Overlay.parse("10.44.0.0/28", first_client_offset=10)
    pool = AddressPool(ov)
    got = [pool.allocate() for _ in range(ov.capacity)]
    assert got == list(range(10, 15))
    assert pool.free_count == 0
    assert pool.peek(2) == []
    with pytest.raises(DammError) as info:
        pool.allocate()
    assert info.value.code is Code.POOL_EXHAUSTED
    assert "10.44.0.0/28" in info.value.detail
    pool.release(12)
    assert pool.allocate() == 12


def test_claim_beyond_the_high_water_mark_is_skipped_by_allocate() -> None:
    pool = AddressPool(Overlay())
    pool.claim(12)
    pool.claim(10)
    assert pool.peek(3) == [11, 13, 14]
    assert [pool.allocate() for _ in range(3)] == [11, 13, 14]
    pool.release(12)
    assert pool.allocate() == 12


def test_claim_of_a_released_index_leaves_no_duplicate() -> None:
    pool = AddressPool(Overlay())
    for _ in range(5):
        pool.allocate()
    pool.release(11)
    pool.claim(11)
    pool.release(11)
    pool.claim(11)
    assert pool.peek(2) == [15, 16]
    assert pool.allocate() == 15
    pool.release(11)
    assert pool.allocate() == 11
    assert pool.allocate() == 16


def test_fold_from_existing_indices() -> None:
    pool = AddressPool(Overlay(), used=[10, 11, 13])
    assert pool.used == 3
    assert pool.used_indices() == frozenset({10, 11, 13})
    assert pool.allocate() == 12
    assert pool.allocate() == 14


@pytest.mark.parametrize(
    ("index", "fragment"),
    [
        (0, "network address"),
        (1, "gateway address"),
        (5, "reserved"),
        (255, "broadcast address"),
        (256, "outside overlay"),
        (-3, "outside overlay"),
    ],
)
def test_claim_refuses_reserved_addresses(index: int, fragment: str) -> None:
    pool = AddressPool(Overlay())
    with pytest.raises(DammError) as info:
        pool.claim(index)
    assert info.value.code is Code.INVALID_ARGUMENT
    assert fragment in info.value.detail
    assert not pool.is_free(index)


def test_claim_twice_and_release_free_raise() -> None:
    pool = AddressPool(Overlay())
    pool.claim(20)
    with pytest.raises(DammError) as taken:
        pool.claim(20)
    assert taken.value.code is Code.ALREADY_EXISTS
    assert "10.44.0.20" in taken.value.detail
    with pytest.raises(DammError) as free:
        pool.release(21)
    assert free.value.code is Code.INVALID_ARGUMENT
    assert "not allocated" in free.value.detail
    with pytest.raises(DammError):
        pool.release(1)


def test_peek_does_not_take() -> None:
    pool = AddressPool(Overlay())
    assert pool.peek(0) == []
    assert pool.peek(4) == [10, 11, 12, 13]
    assert pool.used == 0
    assert pool.allocate() == 10
    with pytest.raises(DammError):
        pool.peek(-1)


def test_sixteen_with_sixty_thousand_devices_is_fast() -> None:
    ov = Overlay.parse("10.44.0.0/16", ula="fd44:44::/64")
    start = time.perf_counter()
    pool = AddressPool(ov)
    got = [pool.allocate() for _ in range(60_000)]
    for index in got[::3]:
        pool.release(index)
    again = [pool.allocate() for _ in range(20_000)]
    assert pool.peek(5) == list(range(60_010, 60_015))
    elapsed = time.perf_counter() - start
    assert got == list(range(10, 60_010))
    assert again == got[::3]
    assert pool.used == 60_000
    assert elapsed < 2.0, f"took {elapsed:.2f}s"


# --- AddressPool: properties --------------------------------------------------------------------

SMALL = Overlay.parse("10.44.0.0/27", gateway_offset=1, first_client_offset=4)
RESERVED = {0, SMALL.gateway_offset, SMALL.network.num_addresses - 1}


class PoolMachine(RuleBasedStateMachine):
    """Drives the pool with arbitrary interleavings and checks it against a plain set."""

    allocated = Bundle("allocated")

    def __init__(self) -> None:
        super().__init__()
        self.pool = AddressPool(SMALL)
        self.model: set[int] = set()

    def _expected_next(self) -> int | None:
        free = [i for i in SMALL.client_indices if i not in self.model]
        return min(free) if free else None

    @rule(target=allocated)
    def allocate(self) -> int:
        expected = self._expected_next()
        if expected is None:
            with pytest.raises(DammError) as info:
                self.pool.allocate()
            assert info.value.code is Code.POOL_EXHAUSTED
            return -1
        got = self.pool.allocate()
        assert got == expected
        assert got not in self.model
        assert got not in RESERVED
        assert got >= SMALL.first_client_offset
        self.model.add(got)
        return got

    @rule(target=allocated, index=st.integers(min_value=-2, max_value=34))
    def claim(self, index: int) -> int:
        if index not in SMALL.client_indices:
            with pytest.raises(DammError) as info:
                self.pool.claim(index)
            assert info.value.code is Code.INVALID_ARGUMENT
            return -1
        if index in self.model:
            with pytest.raises(DammError) as info:
                self.pool.claim(index)
            assert info.value.code is Code.ALREADY_EXISTS
            return -1
        self.pool.claim(index)
        self.model.add(index)
        return index

    @rule(index=consumes(allocated))
    def release(self, index: int) -> None:
        if index in self.model:
            self.pool.release(index)
            self.model.remove(index)
        elif index >= 0:
            with pytest.raises(DammError):
                self.pool.release(index)

    @rule(index=st.integers(min_value=-2, max_value=34))
    def release_arbitrary(self, index: int) -> None:
        if index in self.model:
            self.pool.release(index)
            self.model.remove(index)
        else:
            with pytest.raises(DammError):
                self.pool.release(index)

    @rule(n=st.integers(min_value=0, max_value=40))
    def peek(self, n: int) -> None:
        free = sorted(i for i in SMALL.client_indices if i not in self.model)
        assert self.pool.peek(n) == free[:n]

    @invariant()
    def counts_add_up(self) -> None:
        assert self.pool.used + self.pool.free_count == SMALL.capacity
        assert self.pool.used_indices() == self.model
        assert not self.model & RESERVED

    @invariant()
    def is_free_agrees(self) -> None:
        for i in range(-1, SMALL.network.num_addresses + 1):
            assert self.pool.is_free(i) == (i in SMALL.client_indices and i not in self.model)


PoolMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
test_pool_state_machine = PoolMachine.TestCase


Op = tuple[str, int]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("allocate"), st.just(0)),
            st.tuples(st.just("claim"), st.integers(min_value=-1, max_value=33)),
            st.tuples(st.just("release"), st.integers(min_value=-1, max_value=33)),
        ),
        max_size=200,
    )
)
def test_any_sequence_never_duplicates_or_leaks_reserved(ops: list[Op]) -> None:
    pool = AddressPool(SMALL)
    handed: set[int] = set()
    for op, index in ops:
        try:
            if op == "allocate":
                got = pool.allocate()
                assert got not in handed
                handed.add(got)
            elif op == "claim":
                pool.claim(index)
                assert index not in handed
                handed.add(index)
            else:
                pool.release(index)
                handed.remove(index)
        except DammError as err:
            if op == "allocate":
                assert err.code is Code.POOL_EXHAUSTED
                assert len(handed) == SMALL.capacity
        assert not handed & RESERVED
        assert all(i in SMALL.client_indices for i in handed)
        assert pool.used + pool.free_count == SMALL.capacity
        assert pool.used == len(handed)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=16, max_value=30), st.data())
def test_every_address_handed_out_is_a_client_address(prefix: int, data: st.DataObject) -> None:
    first = data.draw(st.integers(min_value=2, max_value=min(12, 2 ** (32 - prefix) - 2)))
    ov = Overlay.parse("10.44.0.0/" + str(prefix), first_client_offset=first, ula="fd44::/64")
    pool = AddressPool(ov)
    for _ in range(min(ov.capacity, 64)):
        index = pool.allocate()
        v4 = ov.address(index)
        assert v4 not in (ov.network.network_address, ov.network.broadcast_address, ov.gateway)
        assert index >= first
        v6 = ov.address6(index)
        assert v6 is not None
        assert int(v6) - int(IPv6Address("fd44::")) == int(v4) - int(ov.network.network_address)


def test_peek_after_a_replay_does_not_walk_the_used_addresses() -> None:
    """A control plane that folded 60k claims must not sweep them on every enrollment."""
    ov = Overlay.parse("10.44.0.0/16")
    pool = AddressPool(ov)
    for index in range(10, 60_010):
        pool.claim(index)
    start = time.perf_counter()
    for _ in range(2_000):
        assert pool.peek(1) == [60_010]
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"2,000 peeks after a replay took {elapsed:.2f}s"


def test_revoke_and_enroll_cycles_leave_no_stale_heap_for_peek_to_walk() -> None:
    """Issue 12: a revoke releases an address, the next enrollment's fold claims it back. Each
    such claim left a stale heap entry behind, and ``peek`` walked all of them on every
    enrollment group: 7 ms after 10k revokes, growing for as long as the fleet churned."""
    ov = Overlay.parse("10.44.0.0/16")
    pool = AddressPool(ov)
    for index in range(10, 20_010):
        pool.claim(index)
    for n in range(5_000):
        pool.release(10 + (n * 7919) % 20_000)  # a revoke
        pool.claim(pool.peek(2)[0])  # the fold of the next enrollment takes the lowest free
    free_below_mark = sum(1 for i in range(10, 20_010) if pool.is_free(i))
    assert len(pool._released) <= free_below_mark + 1, (
        f"{len(pool._released)} heap entries for {free_below_mark} free addresses"
    )
    assert pool.peek(1) == [20_010]


@settings(max_examples=200, deadline=None)
@given(
    st.sets(st.integers(min_value=4, max_value=30), max_size=27),
    st.lists(st.integers(min_value=4, max_value=30), max_size=10),
    st.randoms(use_true_random=False),
)
def test_a_replayed_pool_allocates_like_the_naive_definition(
    claimed: set[int], released: list[int], rnd: object
) -> None:
    """Claims folded in any order, then releases: allocation is the lowest free index."""
    order = sorted(claimed)
    rnd.shuffle(order)  # type: ignore[attr-defined]
    pool = AddressPool(SMALL, order)
    model = set(claimed)
    for index in released:
        if index in model:
            pool.release(index)
            model.remove(index)
    free = sorted(i for i in SMALL.client_indices if i not in model)
    assert pool.peek(len(free) + 1) == free
    for expected in free:
        assert pool.allocate() == expected
    with pytest.raises(DammError):
        pool.allocate()


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(min_value=4, max_value=30), max_size=27))
def test_a_restored_pool_allocates_like_the_naive_definition(used: set[int]) -> None:
    pool = AddressPool.restore(SMALL, used)
    free = sorted(i for i in SMALL.client_indices if i not in used)
    assert pool.used_indices() == used
    assert pool.peek(len(free) + 1) == free
    for expected in free:
        assert pool.allocate() == expected
    assert pool.free_count == 0


@given(st.sets(st.integers(min_value=4, max_value=30), max_size=10), st.sampled_from([0, 1, 2, 31]))
def test_a_restore_naming_a_non_client_address_is_refused(used: set[int], bad: int) -> None:
    with pytest.raises(DammError) as err:
        AddressPool.restore(SMALL, used | {bad})
    assert err.value.code is Code.INVALID_ARGUMENT
