"""Test helpers that drive the control plane the way the CLI and agents do: over the bus."""

from __future__ import annotations

import base64
import uuid

from nacl.public import PrivateKey
from nats.aio.client import Client as NATS

from damm.protocol import messages as p
from damm.protocol.client import call


def keypair() -> tuple[str, str]:
    key = PrivateKey.generate()
    return (base64.b64encode(bytes(key)).decode(), base64.b64encode(bytes(key.public_key)).decode())


async def setup_fleet(
    admin: NATS,
    gw_nc: NATS,
    *,
    tier: str = "gold",
    regions: tuple[str, ...] = ("eu",),
    countries: tuple[str, ...] = (),
    gateways: tuple[tuple[str, str], ...] = (("gw1", "eu"),),
    session_limit: int | None = None,
    byte_limit: int | None = None,
    uses: int | None = None,
    ttl_s: int | None = None,
    key_lifetime_s: int | None = None,
) -> dict[str, str]:
    """A tier, healthy registered gateways with one front door each, and a token."""
    await call(
        admin,
        "admin.tier.define",
        p.DefineTier(
            tier=tier,
            regions=regions,
            exit_countries=countries,
            session_limit=session_limit,
            byte_limit=byte_limit,
            key_lifetime_s=key_lifetime_s,
        ),
        p.Done,
    )
    out: dict[str, str] = {}
    for n, (gw, region) in enumerate(gateways):
        added = await call(
            admin,
            "admin.gateway.add",
            p.AddGateway(gateway_id=gw, region=region, front_door=f"192.0.2.{n + 1}:51820"),
            p.GatewayAdded,
        )
        out[f"{gw}_token"] = added.token
        _, pub = keypair()
        out[f"{gw}_public_key"] = pub
        await call(
            gw_nc,
            "gateway.register",
            p.RegisterGateway(gateway_id=gw, token=added.token, public_key=pub, listen_port=51820),
            p.Registered,
        )
        await heartbeat(gw_nc, gw, added.token)
    created = await call(
        admin,
        "admin.token.create",
        p.CreateToken(tier=tier, uses=uses, ttl_s=ttl_s),
        p.TokenCreated,
    )
    out["token"] = created.token
    out["token_id"] = created.token_id
    return out


async def heartbeat(gw_nc: NATS, gateway_id: str, token: str, load: float = 0.1) -> None:
    await call(
        gw_nc,
        "gateway.heartbeat",
        p.Heartbeat(
            gateway_id=gateway_id,
            token=token,
            peer_count=0,
            active_peers=0,
            rx_bytes=0,
            tx_bytes=0,
            load=load,
        ),
        p.Done,
    )


async def enroll(
    device_nc: NATS,
    token: str,
    *,
    public_key: str | None = None,
    region: str | None = None,
    exit_country: str | None = None,
    request_id: str | None = None,
) -> p.Enrolled:
    pub = public_key or keypair()[1]
    return await call(
        device_nc,
        "enroll",
        p.Enroll(
            token=token,
            public_key=pub,
            region=region,
            exit_country=exit_country,
            request_id=request_id or uuid.uuid4().hex,
        ),
        p.Enrolled,
    )
