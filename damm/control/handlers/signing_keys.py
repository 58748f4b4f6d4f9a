"""Catalog signing keys in the log: created once, rotated by events every replica folds.

The first control plane to start seals a signing key and a rotation key under the operator's KEK
and appends them (importing the keys directory of a pre-log deployment if there is one); every
later replica folds and unseals the same keys. Rotation is the TUF way, without re-enrolling:
``announce`` seals a next key and the leader vouches for it in every catalog the current key
signs; ``activate`` switches signing to it and retires the old one. Either step can land on
any replica: both are appended to one keyring subject with the expectation of the last change.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from damm import log
from damm.control.context import Context
from damm.control.keyring import sealed_rotation_key, sealed_signing_key
from damm.control.state import DecisionState
from damm.errors import Code, DammError
from damm.events import model as m
from damm.events.store import Append
from damm.keys.sealing import KeyEncryptionKey
from damm.private_files import SEED_BYTES, read_seed
from damm.protocol import messages as p
from damm.protocol.router import Call, Route, route
from damm.subjects import CATALOG_KEYRING, ROTATION_KEYRING

_log = log.get("damm.signing_keys")

LEGACY_CURRENT = "catalog.key"
LEGACY_NEXT = "catalog.next.key"
LEGACY_ROTATION = "rotation.key"
KEYRING_ACTOR = m.Actor("system", "keyring")
PUBLISH_WAIT_S = 5.0


class KeyReach(msgspec.Struct, frozen=True):
    """How many active devices hold a key: those without it reject catalogs signed by it."""

    key_id: str
    devices_with_key: int
    devices_active: int


class SigningKeyChanged(msgspec.Struct, frozen=True):
    key_id: str
    public_key: str
    retired_key_id: str | None = None
    reach: KeyReach | None = None  # on activate: who had the key the moment before
    published: bool = False  # every region's current catalog reflects the change


class CatalogKeyStatus(msgspec.Struct, frozen=True):
    signing_key_id: str
    announced: tuple[KeyReach, ...]


def reach(state: DecisionState, key_id: str) -> KeyReach:
    """Active devices that reported holding ``key_id`` (check-ins and failover reports)."""
    active = [d for d in state.devices.values() if d.status == "active"]
    holding = sum(1 for d in active if key_id in d.pinned_keys)
    return KeyReach(key_id, holding, len(active))


def _legacy_seed(keys_dir: Path, name: str) -> bytes | None:
    try:
        return read_seed(keys_dir / name, name)
    except FileNotFoundError:
        return None


def _new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


async def ensure_keys(ctx: Context, kek: KeyEncryptionKey, keys_dir: Path) -> None:
    """Make sure the log holds a signing key and a rotation key; open them with this KEK.

    Two replicas starting at once both try; the second one's append expects an empty keyring,
    is refused, and it folds the first one's keys instead.
    """
    call = Call("keyring-genesis", KEYRING_ACTOR)

    def catalog_genesis() -> list[Append]:
        ring = ctx.state.keyring
        if ring.active is not None:
            return []
        seed = _legacy_seed(keys_dir, LEGACY_CURRENT) or _new_seed()
        key = sealed_signing_key(kek, seed)
        items = [
            ctx.append(CATALOG_KEYRING, key, call, expected=ctx.state.seq_of(CATALOG_KEYRING)),
            ctx.append(
                CATALOG_KEYRING,
                m.SigningKeyActivated(key_id=key.key_id, retired_key_id=""),
                call,
            ),
        ]
        staged = _legacy_seed(keys_dir, LEGACY_NEXT)
        if staged is not None:
            items.append(ctx.append(CATALOG_KEYRING, sealed_signing_key(kek, staged), call))
        return items

    def rotation_genesis() -> list[Append]:
        if ctx.state.keyring.rotation is not None:
            return []
        seed = _legacy_seed(keys_dir, LEGACY_ROTATION) or _new_seed()
        return [
            ctx.append(
                ROTATION_KEYRING,
                sealed_rotation_key(kek, seed),
                call,
                expected=ctx.state.seq_of(ROTATION_KEYRING),
            )
        ]

    # Open what is there first: a replica with the wrong KEK must not append anything.
    ring = ctx.state.keyring
    if ring.active is not None and ring.rotation is not None:
        assert ctx.keyring is not None
        ctx.keyring.check()
        return
    for kek_id in {k.kek_id for k in ring.keys.values()} | (
        {ring.rotation.kek_id} if ring.rotation else set()
    ):
        if kek_id != kek.kek_id:
            raise DammError(
                Code.KEK_MISMATCH,
                f"the log's keys are sealed under KEK {kek_id}; this process has {kek.kek_id}",
            )
    if (await ctx.commit(catalog_genesis)).seqs:
        _log.info("catalog signing key sealed into the log", key_id=ctx.state.keyring.active)
    if (await ctx.commit(rotation_genesis)).seqs:
        _log.info("rotation key sealed into the log")
    assert ctx.keyring is not None
    ctx.keyring.check()


class SigningKeys:
    def __init__(self, ctx: Context, kek: KeyEncryptionKey) -> None:
        self.ctx = ctx
        self.kek = kek

    def routes(self) -> list[Route]:
        return [
            route("admin.catalog.announce", p.Empty, self.announce),
            route("admin.catalog.activate", p.Empty, self.activate),
            route("admin.catalog.status", p.Empty, self.status),
        ]

    async def status(self, req: p.Empty, call: Call) -> CatalogKeyStatus:
        await self.ctx.follower.sync()
        state = self.ctx.state
        announced = tuple(reach(state, key_id) for key_id in sorted(state.announced_keys))
        return CatalogKeyStatus(self.ctx.signer.key_id, announced)

    async def announce(self, req: p.Empty, call: Call) -> SigningKeyChanged:
        state = self.ctx.state

        def decide() -> list[Append]:
            if state.keyring.announced is not None:
                return []  # already staged: announcing again changes nothing
            key = sealed_signing_key(self.kek, _new_seed())
            expected = state.seq_of(CATALOG_KEYRING)
            return [self.ctx.append(CATALOG_KEYRING, key, call, expected=expected)]

        await self.ctx.follower.sync()
        await self.ctx.commit(decide)
        key_id = state.keyring.announced
        assert key_id is not None
        published = await self._published(lambda c: key_id in c.next_key_ids or c.key_id == key_id)
        return SigningKeyChanged(
            key_id, state.keyring.keys[key_id].public_key, None, None, published
        )

    async def activate(self, req: p.Empty, call: Call) -> SigningKeyChanged:
        state = self.ctx.state
        await self.ctx.follower.sync()
        retired: list[str] = []

        def decide() -> list[Append]:
            ring = state.keyring
            if ring.announced is None:
                raise DammError(Code.NOT_FOUND, "no announced next key: run announce first")
            missing = sorted(
                region
                for region, c in state.catalogs.items()
                if ring.announced not in c.next_key_ids
            )
            if missing:
                raise DammError(
                    Code.INVALID_ARGUMENT,
                    f"the next key is not announced in the catalogs of {', '.join(missing)} yet",
                )
            retired[:] = [ring.active or ""]
            return [
                self.ctx.append(
                    CATALOG_KEYRING,
                    m.SigningKeyActivated(key_id=ring.announced, retired_key_id=ring.active or ""),
                    call,
                    expected=state.seq_of(CATALOG_KEYRING),
                )
            ]

        announced = state.keyring.announced
        before = reach(state, announced) if announced is not None else None
        await self.ctx.commit(decide)
        key_id = state.keyring.active
        assert key_id is not None
        published = await self._published(lambda c: c.key_id == key_id)
        return SigningKeyChanged(
            key_id, state.keyring.keys[key_id].public_key, retired[0] or None, before, published
        )

    async def _published(self, done: Callable[[m.CatalogPublished], bool]) -> bool:
        """Wait (bounded) until the leader has published the change in every region's catalog."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PUBLISH_WAIT_S
        while not all(done(c) for c in self.ctx.state.catalogs.values()):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True
