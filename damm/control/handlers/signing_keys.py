"""Rotating the catalog signing key without re-enrolling a single device (the TUF way).

Step one, ``announce``: a next key is created beside the current one (0600) and announced in the
catalogs the current key signs; every device that verifies one of them pins the next key.
Step two, ``activate``: catalogs are signed with the next key and the old one is retired. Devices
that never saw an announcement reject the new catalogs as signed by an unknown key, which is the
point. A staged next key survives a restart and is announced again.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from damm.catalog.signing import CatalogSigner
from damm.control.context import Context
from damm.control.publishers.catalogs import CatalogPublisher
from damm.control.state import DecisionState
from damm.errors import Code, DammError
from damm.events import model as m
from damm.protocol import messages as p
from damm.protocol.router import Call, Route, route
from damm.subjects import event_subject

CURRENT = "catalog.key"
NEXT = "catalog.next.key"


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


class CatalogKeyStatus(msgspec.Struct, frozen=True):
    signing_key_id: str
    announced: tuple[KeyReach, ...]


def reach(state: DecisionState, key_id: str) -> KeyReach:
    """Active devices that reported holding ``key_id`` (check-ins and failover reports)."""
    active = [d for d in state.devices.values() if d.status == "active"]
    holding = sum(1 for d in active if key_id in d.pinned_keys)
    return KeyReach(key_id, holding, len(active))


class SigningKeys:
    def __init__(self, ctx: Context, publisher: CatalogPublisher, keys_dir: Path) -> None:
        self.ctx = ctx
        self.publisher = publisher
        self.keys_dir = keys_dir

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
        return CatalogKeyStatus(self.publisher.signer.key_id, announced)

    def resume(self) -> None:
        """Re-announce a staged next key after a restart."""
        if (self.keys_dir / NEXT).exists():
            self.publisher.announce_next(CatalogSigner.load_or_create(self.keys_dir / NEXT))

    async def announce(self, req: p.Empty, call: Call) -> SigningKeyChanged:
        signer = CatalogSigner.load_or_create(self.keys_dir / NEXT)
        if signer.key_id == self.publisher.signer.key_id:
            raise DammError(Code.ALREADY_EXISTS, "the staged key is already the signing key")
        subject = event_subject("signing_key", signer.key_id)
        await self.ctx.commit(
            lambda: (
                []
                if self.ctx.state.seq_of(subject)
                else [
                    self.ctx.append(
                        subject,
                        m.SigningKeyAnnounced(
                            key_id=signer.key_id, public_key=signer.public_key_b64
                        ),
                        call,
                        expected=0,
                    )
                ]
            )
        )
        self.publisher.announce_next(signer)
        await self.publisher.tick()
        return SigningKeyChanged(signer.key_id, signer.public_key_b64)

    async def activate(self, req: p.Empty, call: Call) -> SigningKeyChanged:
        staged = self.keys_dir / NEXT
        if not staged.exists():
            raise DammError(Code.NOT_FOUND, "no announced next key: run announce first")
        signer = CatalogSigner.load_or_create(staged)
        if signer.key_id not in self.publisher.next_keys:
            raise DammError(Code.INVALID_ARGUMENT, "the next key was not announced in catalogs")
        old = self.publisher.signer
        await self.ctx.follower.sync()
        before = reach(self.ctx.state, signer.key_id)
        subject = event_subject("signing_key", signer.key_id)
        await self.ctx.commit(
            lambda: [
                self.ctx.append(
                    subject,
                    m.SigningKeyActivated(key_id=signer.key_id, retired_key_id=old.key_id),
                    call,
                    expected=self.ctx.state.seq_of(subject),
                )
            ]
        )
        retired = self.keys_dir / f"catalog.{old.key_id}.retired.key"
        os.replace(self.keys_dir / CURRENT, retired)
        os.replace(staged, self.keys_dir / CURRENT)
        self.publisher.rotate_to(signer)
        await self.publisher.tick()
        return SigningKeyChanged(signer.key_id, signer.public_key_b64, old.key_id, before)
