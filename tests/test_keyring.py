"""Keyring decisions without a server: genesis, import, announce, activate, refusals, KEK checks.

Every refusal must leave the in-memory log untouched.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damm.catalog.signing import CatalogSigner
from damm.control.context import Context
from damm.control.handlers.signing_keys import SigningKeys, ensure_keys
from damm.control.keyring import Keyring, sealed_signing_key
from damm.control.state import DecisionState
from damm.domain.ipam import Overlay
from damm.errors import Code, DammError
from damm.events import model as m
from damm.events.store import envelope
from damm.keys.rotation import RotationKey
from damm.keys.sealing import LocalKek
from damm.protocol import messages as p
from damm.protocol.router import Call
from damm.subjects import CATALOG_KEYRING
from tests.memory_log import MemoryLog, memory_context

ADMIN = Call("op", m.Actor("admin", "op"))


def with_keyring(tmp_path: Path, kek: LocalKek) -> tuple[Context, MemoryLog]:
    ctx, log = memory_context(tmp_path)
    ctx.keyring = Keyring(ctx.state, kek)
    return ctx, log


async def test_genesis_creates_sealed_keys_once(tmp_path: Path) -> None:
    kek = LocalKek.generate()
    ctx, log = with_keyring(tmp_path, kek)
    await ensure_keys(ctx, kek, tmp_path / "none")
    first = ctx.signer.key_id
    types = [type(e) for e in log.events()]
    assert types == [m.SigningKeyAnnounced, m.SigningKeyActivated, m.RotationKeyStored]
    await ensure_keys(ctx, kek, tmp_path / "none")  # a restart appends nothing
    assert len(log.messages) == 3 and ctx.signer.key_id == first


async def test_legacy_keys_directory_is_imported(tmp_path: Path) -> None:
    kek = LocalKek.generate()
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    current = CatalogSigner.load_or_create(keys / "catalog.key")
    staged = CatalogSigner.load_or_create(keys / "catalog.next.key")
    rotation = RotationKey.load_or_create(keys / "rotation.key")
    ctx, _ = with_keyring(tmp_path, kek)
    await ensure_keys(ctx, kek, keys)
    assert ctx.signer.key_id == current.key_id
    assert ctx.state.keyring.announced == staged.key_id
    assert ctx.rotation.public_b64 == rotation.public_b64


async def test_a_wrong_kek_appends_nothing(tmp_path: Path) -> None:
    kek = LocalKek.generate()
    ctx, log = with_keyring(tmp_path, kek)
    await ensure_keys(ctx, kek, tmp_path / "none")
    other = LocalKek.generate()
    replica = Context(log, ctx.state, ctx.follower, ctx.settings, None, None)  # type: ignore[arg-type]
    replica.keyring = Keyring(ctx.state, other)
    before = len(log.messages)
    with pytest.raises(DammError) as info:
        await ensure_keys(replica, other, tmp_path / "none")
    assert info.value.code is Code.KEK_MISMATCH
    with pytest.raises(DammError) as info:
        _ = replica.signer
    assert info.value.code is Code.KEK_MISMATCH
    assert len(log.messages) == before


async def test_announce_then_activate_and_refusals(tmp_path: Path) -> None:
    kek = LocalKek.generate()
    ctx, log = with_keyring(tmp_path, kek)
    await ensure_keys(ctx, kek, tmp_path / "none")
    keys = SigningKeys(ctx, kek)
    old = ctx.signer.key_id

    before = len(log.messages)
    with pytest.raises(DammError) as info:
        await keys.activate(p.Empty(), ADMIN)
    assert info.value.code is Code.NOT_FOUND
    assert len(log.messages) == before

    announced = await keys.announce(p.Empty(), ADMIN)
    again = await keys.announce(p.Empty(), ADMIN)  # idempotent: the same staged key
    assert again.key_id == announced.key_id and announced.key_id != old
    assert ctx.signer.key_id == old  # announcing does not switch signing

    # A region whose current catalog does not announce the key yet: refused, nothing appended.
    ctx.state.catalogs["eu"] = m.CatalogPublished(
        region="eu", version=1, key_id=old, digest="d", signed=b"x"
    )
    before = len(log.messages)
    with pytest.raises(DammError) as info:
        await keys.activate(p.Empty(), ADMIN)
    assert info.value.code is Code.INVALID_ARGUMENT
    assert len(log.messages) == before

    ctx.state.catalogs["eu"] = m.CatalogPublished(
        region="eu", version=2, key_id=old, digest="d", signed=b"x",
        next_key_ids=(announced.key_id,),
    )  # fmt: skip
    activated = await keys.activate(p.Empty(), ADMIN)
    assert activated.retired_key_id == old and activated.key_id == announced.key_id
    assert ctx.signer.key_id == announced.key_id
    assert old in ctx.state.keyring.retired and ctx.state.keyring.announced is None


def _fold(state: DecisionState, seq: int, event: m.Event) -> None:
    env = envelope(
        CATALOG_KEYRING, event, actor=m.Actor("admin", "x"), correlation_id=str(seq),
        now=datetime(2026, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    state.apply(msgspec.structs.replace(env, seq=seq))


KEK = LocalKek(b"\x05" * 32)
SEEDS = [bytes([n]) * 32 for n in range(1, 5)]
SEALED = [sealed_signing_key(KEK, seed) for seed in SEEDS]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("announce"), st.integers(0, 3)),
            st.tuples(st.just("activate"), st.integers(0, 3)),
            st.tuples(st.just("legacy"), st.integers(0, 3)),
        ),
        max_size=20,
    )
)
def test_keyring_fold_never_activates_an_unknown_or_unsealed_key(
    steps: list[tuple[str, int]],
) -> None:
    """Whatever order keyring events arrive in, the active key is one whose sealed seed is in
    the log, and a retired key never comes back as the announced one."""
    state = DecisionState(Overlay.parse("10.44.0.0/24"))
    ring = Keyring(state, KEK)
    for seq, (kind, n) in enumerate(steps, 1):
        key = SEALED[n]
        if kind == "announce":
            event: m.Event = key
        elif kind == "activate":
            event = m.SigningKeyActivated(key_id=key.key_id, retired_key_id="")
        else:  # a pre-log announcement: no seed, not a key
            event = m.SigningKeyAnnounced(key_id=key.key_id, public_key=key.public_key)
        _fold(state, seq, event)
        active = state.keyring.active
        if active is not None:
            assert active in state.keyring.keys
            assert ring.signer().key_id == active
        assert state.keyring.announced not in state.keyring.retired | {active} or (
            state.keyring.announced is None
        )
