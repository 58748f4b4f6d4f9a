"""The keys this process signs and verifies with, unsealed on demand from the folded log.

Every replica folds the same keyring events, so they all resolve the same active signing key,
the same announced next key and the same rotation key. Seeds are unsealed with the operator's
KEK once per key and kept in memory only; nothing here writes a key to disk.
"""

from __future__ import annotations

from damm.catalog.document import KeyAnnouncement
from damm.catalog.signing import CatalogSigner
from damm.control.state import DecisionState
from damm.errors import Code, DammError
from damm.events import model as m
from damm.keys.rotation import RotationKey
from damm.keys.sealing import KeyEncryptionKey


class Keyring:
    def __init__(self, state: DecisionState, kek: KeyEncryptionKey) -> None:
        self.state = state
        self.kek = kek
        self._signers: dict[str, CatalogSigner] = {}
        self._rotation: RotationKey | None = None

    def signer(self) -> CatalogSigner:
        """The key catalogs are signed with now, and the one new enrollments pin."""
        active = self.state.keyring.active
        if active is None:
            raise DammError(Code.UNAVAILABLE, "no catalog signing key in the log yet")
        return self.signer_for(active)

    def signer_for(self, key_id: str) -> CatalogSigner:
        signer = self._signers.get(key_id)
        if signer is None:
            event = self.state.keyring.keys.get(key_id)
            if event is None:
                raise DammError(Code.NOT_FOUND, f"no signing key {key_id} in the log")
            signer = CatalogSigner.from_seed(self._unseal(event.sealed_seed, event.kek_id))
            if signer.key_id != key_id or signer.public_key_b64 != event.public_key:
                raise DammError(Code.KEK_MISMATCH, f"sealed seed of {key_id} is another key's")
            self._signers[key_id] = signer
        return signer

    def rotation(self) -> RotationKey:
        stored = self.state.keyring.rotation
        if stored is None:
            raise DammError(Code.UNAVAILABLE, "no rotation key in the log yet")
        if self._rotation is None or self._rotation.public_b64 != stored.public_key:
            key = RotationKey(self._unseal(stored.sealed_seed, stored.kek_id))
            if key.public_b64 != stored.public_key:
                raise DammError(Code.KEK_MISMATCH, "sealed rotation seed is another key's")
            self._rotation = key
        return self._rotation

    def announcements(self) -> tuple[KeyAnnouncement, ...]:
        """What current catalogs vouch for: the announced next key, if any."""
        announced = self.state.keyring.announced
        if announced is None:
            return ()
        event = self.state.keyring.keys[announced]
        return (KeyAnnouncement(key_id=event.key_id, public_key=event.public_key, not_before=0),)

    def check(self) -> None:
        """Open every key this process will need now, so a wrong KEK stops it at start."""
        self.signer()
        self.rotation()
        for key_id in (self.state.keyring.announced,):
            if key_id is not None:
                self.signer_for(key_id)

    def _unseal(self, sealed: bytes, kek_id: str) -> bytes:
        if kek_id != self.kek.kek_id:
            raise DammError(
                Code.KEK_MISMATCH,
                f"the log's keys are sealed under KEK {kek_id}; this process has {self.kek.kek_id}",
            )
        return self.kek.unseal(sealed)


def sealed_signing_key(kek: KeyEncryptionKey, seed: bytes) -> m.SigningKeyAnnounced:
    signer = CatalogSigner.from_seed(seed)
    return m.SigningKeyAnnounced(
        key_id=signer.key_id,
        public_key=signer.public_key_b64,
        sealed_seed=kek.seal(seed),
        kek_id=kek.kek_id,
    )


def sealed_rotation_key(kek: KeyEncryptionKey, seed: bytes) -> m.RotationKeyStored:
    return m.RotationKeyStored(
        public_key=RotationKey(seed).public_b64, sealed_seed=kek.seal(seed), kek_id=kek.kek_id
    )
