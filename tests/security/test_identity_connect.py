"""A device proving its key at CONNECT, against a real nats-server in the callout layout."""

from __future__ import annotations

from pathlib import Path

import nkeys
import pytest
from nats.aio.msg import Msg

from damm.control.callout import AuthRequest, CalloutService
from damm.control.state import DecisionState
from damm.domain.ipam import Overlay
from damm.keys import nats_identity
from damm.protocol.bus import connect
from damm.stack.nats_server import NatsServer
from damm.subjects import inbox_prefix


async def test_a_device_signs_the_nonce_with_its_key_derived_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py would derive the key pair from the seed in pure Python once for the public key
    and again for the nonce; the device derives it once, and the callout still admits it only
    on a signature that verifies."""
    server = NatsServer(tmp_path / "nats", callout=True)
    url = server.start()
    control = await connect(url, user="control", password=server.passwords["control"])
    seen: list[str] = []
    service = CalloutService(
        control, DecisionState(Overlay.parse("10.44.0.0/24")), server.callout_seed
    )
    real_answer = service._answer

    async def watched(msg: Msg, req: AuthRequest, *, slow: bool) -> None:
        seen.append(req.connect_opts.nkey)
        await real_answer(msg, req, slow=slow)

    monkeypatch.setattr(service, "_answer", watched)
    await service.start()
    derived: list[bytes] = []
    real_from_seed = nkeys.from_seed

    def counted(seed: bytearray) -> nkeys.KeyPair:
        derived.append(bytes(seed))
        return real_from_seed(seed)

    monkeypatch.setattr(nkeys, "from_seed", counted)
    try:
        seed = nats_identity.new_user_seed()
        key = nats_identity.public_key(seed)
        nc = await connect(url, identity_seed=seed, reconnect=False)
        assert nc.is_connected
        assert seen == [key]
        assert nc._inbox_prefix == bytearray(inbox_prefix(key).encode())
        await nc.close()
        assert derived == []
    finally:
        await service.stop()
        await control.close()
        server.stop()
