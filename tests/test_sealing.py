"""Sealing secrets at rest under the operator's key-encryption key (no server needed)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from damm.errors import Code, DammError
from damm.keys.sealing import KeyEncryptionKey, LocalKek, kek_from_env

KEK = LocalKek(b"\x11" * 32)
OTHER = LocalKek(b"\x22" * 32)


@given(st.binary(min_size=0, max_size=256))
def test_seal_round_trip_hides_the_plaintext(secret: bytes) -> None:
    sealed = KEK.seal(secret)
    assert KEK.unseal(sealed) == secret
    if len(secret) >= 8:
        assert secret not in sealed
    assert KEK.seal(secret) != sealed  # a fresh nonce every time


def test_a_wrong_kek_has_its_own_code() -> None:
    sealed = KEK.seal(b"\x07" * 32)
    with pytest.raises(DammError) as info:
        OTHER.unseal(sealed)
    assert info.value.code is Code.KEK_MISMATCH
    with pytest.raises(DammError) as info:
        KEK.unseal(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    assert info.value.code is Code.KEK_MISMATCH
    assert KEK.kek_id != OTHER.kek_id
    assert "\\x11" not in repr(KEK) and "11111111" not in repr(KEK)


def test_local_kek_satisfies_the_kms_hook() -> None:
    kek: KeyEncryptionKey = KEK
    assert kek.unseal(kek.seal(b"x")) == b"x"


def test_kek_from_env(tmp_path: Path) -> None:
    raw = bytes(range(32))
    assert kek_from_env({}) is None
    from_var = kek_from_env({"DAMM_KEK": base64.b64encode(raw).decode()})
    assert from_var is not None and from_var.kek_id == LocalKek(raw).kek_id
    path = tmp_path / "kek"
    path.write_text(base64.b64encode(raw).decode() + "\n")
    path.chmod(0o600)
    from_file = kek_from_env({"DAMM_KEK_FILE": str(path)})
    assert from_file is not None and from_file.kek_id == LocalKek(raw).kek_id
    for bad in ({"DAMM_KEK": "not base64!"}, {"DAMM_KEK": base64.b64encode(b"short").decode()}):
        with pytest.raises(DammError) as info:
            kek_from_env(bad)
        assert info.value.code is Code.INVALID_ARGUMENT
    path.chmod(0o644)
    with pytest.raises(DammError) as info:
        kek_from_env({"DAMM_KEK_FILE": str(path)})
    assert info.value.code is Code.INVALID_ARGUMENT
    with pytest.raises(DammError) as info:
        kek_from_env({"DAMM_KEK_FILE": str(tmp_path / "missing")})
    assert info.value.code is Code.KEK_MISSING
