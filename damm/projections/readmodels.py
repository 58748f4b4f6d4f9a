"""How each event changes the read models, as SQL statements.

Every statement touches exactly one table and reads no other, so statements for different tables
commute: the runner may group a batch by table (keeping order within a table) and send each
group with one pipelined ``executemany``. Values come from the event and its envelope only, never
from ``now()``, so a replay yields the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from damm import settings
from damm.domain.periods import period_at
from damm.events import model as m


class Stmt(NamedTuple):
    table: str
    sql: str
    args: tuple[Any, ...]


def period_of(env: m.Envelope) -> str:
    """The usage period of the measurement (when the gateway measured, else when it was logged)."""
    event = env.event
    when = event.measured_at if isinstance(event, m.UsageReported) and event.measured_at else None
    return period_at(when or env.occurred_at, settings.usage_period())


_TIER = (
    "INSERT INTO tiers (tier, regions, exit_countries, session_limit, byte_limit, key_lifetime_s,"
    " status, defined_by, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
    " ON CONFLICT (tier) DO UPDATE SET regions=EXCLUDED.regions,"
    " exit_countries=EXCLUDED.exit_countries, session_limit=EXCLUDED.session_limit,"
    " byte_limit=EXCLUDED.byte_limit, key_lifetime_s=EXCLUDED.key_lifetime_s,"
    " status=EXCLUDED.status, defined_by=EXCLUDED.defined_by, updated_at=EXCLUDED.updated_at"
)
_TOKEN = (
    "INSERT INTO tokens (token_id, token_hash, tier, max_uses, expires_at, issued_by, issued_at)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT DO NOTHING"
)
_TOKEN_USED = (
    "UPDATE tokens SET uses = uses + 1, active_sessions = active_sessions + 1 WHERE token_id = $1"
)
_TOKEN_RELEASED = (
    "UPDATE tokens SET active_sessions = GREATEST(active_sessions - 1, 0) WHERE token_id = $1"
)
_TOKEN_REVOKED = "UPDATE tokens SET revoked = true, revoked_reason = $2 WHERE token_id = $1"
_GATEWAY = (
    "INSERT INTO gateways (gateway_id, region, token_hash, nats_password_bcrypt, added_at)"
    " VALUES ($1,$2,$3,$4,$5) ON CONFLICT (gateway_id) DO UPDATE SET region=EXCLUDED.region,"
    " token_hash=EXCLUDED.token_hash, nats_password_bcrypt=EXCLUDED.nats_password_bcrypt"
)
_GATEWAY_REGISTERED = (
    "UPDATE gateways SET public_key=$2, listen_port=$3, agent_version=$4, registered_at=$5"
    " WHERE gateway_id=$1"
)
_GATEWAY_STATUS = "UPDATE gateways SET active=$2, status_reason=$3 WHERE gateway_id=$1"
_FRONT_DOOR = (
    "INSERT INTO front_doors (gateway_id, front_door_id, endpoint, transport, priority, active)"
    " VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (gateway_id, front_door_id) DO UPDATE SET"
    " endpoint=EXCLUDED.endpoint, transport=EXCLUDED.transport, priority=EXCLUDED.priority,"
    " active=EXCLUDED.active"
)
_EGRESS = (
    "INSERT INTO egress_pools (pool_id, provider, region, countries, ips, load, headroom, active,"
    " devices_per_address, transfer_per_address) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
    " ON CONFLICT (pool_id) DO UPDATE SET"
    " provider=EXCLUDED.provider, region=EXCLUDED.region, countries=EXCLUDED.countries,"
    " ips=EXCLUDED.ips, load=EXCLUDED.load, headroom=EXCLUDED.headroom, active=EXCLUDED.active,"
    " devices_per_address=EXCLUDED.devices_per_address,"
    " transfer_per_address=EXCLUDED.transfer_per_address"
)
_ADDRESS = (
    "INSERT INTO addresses (pool, idx, address, address6, device_id) VALUES ($1,$2,$3,$4,$5)"
    " ON CONFLICT (pool, idx) DO UPDATE SET address=EXCLUDED.address,"
    " address6=EXCLUDED.address6, device_id=EXCLUDED.device_id"
)
_ADDRESS_RELEASED = "DELETE FROM addresses WHERE pool=$1 AND idx=$2 AND device_id=$3"
_DEVICE = (
    "INSERT INTO devices (device_id, public_key, token_id, tier, gateway_id, front_door_id,"
    " egress_pool_id, address, address6, region, exit_country, status, key_expires_at,"
    " enrolled_at, updated_at, egress_address)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,'active',$12,$13,$13,$14)"
    " ON CONFLICT (device_id) DO NOTHING"
)
_DEVICE_STATUS = (
    "UPDATE devices SET status=$2, status_reason=$3, updated_at=$4 WHERE device_id=$1"
    " AND status <> 'revoked'"
)
_DEVICE_KEY = (
    "UPDATE devices SET public_key=$2, key_expires_at=$3, updated_at=$4,"
    " status = CASE WHEN status='suspended' AND status_reason='key_expired' THEN 'active'"
    " ELSE status END,"
    " status_reason = CASE WHEN status='suspended' AND status_reason='key_expired'"
    " THEN 'key_rotated' ELSE status_reason END"
    " WHERE device_id=$1"
)
_DEVICE_FAILED_OVER = (
    "UPDATE devices SET front_door_id=$2, pinned_keys=$3, front_door_reported_at=$4"
    " WHERE device_id=$1"
)
_DEVICE_KEYS = "UPDATE devices SET pinned_keys=$2 WHERE device_id=$1"
_USAGE = (
    "INSERT INTO usage_totals (device_id, period, rx_bytes, tx_bytes) VALUES ($1,$2,$3,$4)"
    " ON CONFLICT (device_id, period) DO UPDATE SET"
    " rx_bytes = usage_totals.rx_bytes + EXCLUDED.rx_bytes,"
    " tx_bytes = usage_totals.tx_bytes + EXCLUDED.tx_bytes"
)
_USAGE_RESET = "DELETE FROM usage_totals WHERE device_id=$1 AND period=$2"
_CATALOG = (
    "INSERT INTO catalogs (region, version, key_id, digest, expires_at) VALUES ($1,$2,$3,$4,$5)"
    " ON CONFLICT (region) DO UPDATE SET version=EXCLUDED.version, key_id=EXCLUDED.key_id,"
    " digest=EXCLUDED.digest, expires_at=EXCLUDED.expires_at"
    " WHERE catalogs.version < EXCLUDED.version"
)
_SIGNING_KEY = (
    "INSERT INTO signing_keys (key_id, public_key, announced_at) VALUES ($1,$2,$3)"
    " ON CONFLICT DO NOTHING"
)
_KEY_ACTIVATED = "UPDATE signing_keys SET activated_at=$2 WHERE key_id=$1"
_KEY_RETIRED = "UPDATE signing_keys SET retired_at=$2 WHERE key_id=$1"
_HEALTH = (
    "INSERT INTO gateway_health (gateway_id, last_heartbeat, peer_count, active_peers, rx_bytes,"
    " tx_bytes, load, peer_set_revision) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
    " ON CONFLICT (gateway_id) DO UPDATE SET last_heartbeat=EXCLUDED.last_heartbeat,"
    " peer_count=EXCLUDED.peer_count, active_peers=EXCLUDED.active_peers,"
    " rx_bytes=EXCLUDED.rx_bytes, tx_bytes=EXCLUDED.tx_bytes, load=EXCLUDED.load,"
    " peer_set_revision=EXCLUDED.peer_set_revision"
    " WHERE gateway_health.last_heartbeat <= EXCLUDED.last_heartbeat"
)

# Tables whose every row comes from the event log; replay --verify compares exactly these.
REPLAYED_TABLES = (
    "tiers",
    "tokens",
    "gateways",
    "front_doors",
    "egress_pools",
    "addresses",
    "devices",
    "usage_totals",
    "catalogs",
    "signing_keys",
)


def statements(env: m.Envelope) -> Iterator[Stmt]:
    e = env.event
    at = env.occurred_at
    actor = str(env.actor)
    match e:
        case m.TierDefined():
            yield Stmt(
                "tiers",
                _TIER,
                (
                    e.tier,
                    list(e.regions),
                    list(e.exit_countries),
                    e.session_limit,
                    e.byte_limit,
                    e.key_lifetime_s,
                    e.status,
                    actor,
                    at,
                ),
            )
        case m.TokenIssued():
            yield Stmt(
                "tokens",
                _TOKEN,
                (e.token_id, e.token_hash, e.tier, e.max_uses, e.expires_at, actor, at),
            )
        case m.TokenUsed():
            yield Stmt("tokens", _TOKEN_USED, (e.token_id,))
        case m.TokenSessionReleased():
            yield Stmt("tokens", _TOKEN_RELEASED, (e.token_id,))
        case m.TokenRevoked():
            yield Stmt("tokens", _TOKEN_REVOKED, (e.token_id, e.reason))
        case m.GatewayAdded():
            yield Stmt(
                "gateways",
                _GATEWAY,
                (e.gateway_id, e.region, e.token_hash, e.nats_password_bcrypt, at),
            )
        case m.GatewayRegistered():
            yield Stmt(
                "gateways",
                _GATEWAY_REGISTERED,
                (e.gateway_id, e.public_key, e.listen_port, e.agent_version, at),
            )
        case m.GatewayStatusChanged():
            yield Stmt("gateways", _GATEWAY_STATUS, (e.gateway_id, e.active, e.reason))
        case m.FrontDoorSet():
            yield Stmt(
                "front_doors",
                _FRONT_DOOR,
                (e.gateway_id, e.front_door_id, e.endpoint, e.transport, e.priority, e.active),
            )
        case m.EgressPoolDefined():
            yield Stmt(
                "egress_pools",
                _EGRESS,
                (
                    e.pool_id,
                    e.provider,
                    e.region,
                    list(e.countries),
                    list(e.ips),
                    e.load,
                    e.headroom,
                    e.active,
                    e.devices_per_address,
                    e.transfer_per_address,
                ),
            )
        case m.AddressAllocated():
            yield Stmt("addresses", _ADDRESS, (e.pool, e.index, e.address, e.address6, e.device_id))
        case m.AddressReleased():
            yield Stmt("addresses", _ADDRESS_RELEASED, (e.pool, e.index, e.device_id))
        case m.DeviceEnrolled():
            yield Stmt(
                "devices",
                _DEVICE,
                (
                    e.device_id,
                    e.public_key,
                    e.token_id,
                    e.tier,
                    e.gateway_id,
                    e.front_door_id,
                    e.egress_pool_id,
                    e.address,
                    e.address6,
                    e.region,
                    e.exit_country,
                    e.key_expires_at,
                    at,
                    e.egress_address,
                ),
            )
        case m.DeviceRevoked():
            yield Stmt("devices", _DEVICE_STATUS, (e.device_id, "revoked", e.reason, at))
            if e.token_id:
                yield Stmt("tokens", _TOKEN_RELEASED, (e.token_id,))
        case m.DeviceSuspended():
            yield Stmt("devices", _DEVICE_STATUS, (e.device_id, "suspended", e.reason, at))
        case m.DeviceResumed():
            yield Stmt("devices", _DEVICE_STATUS, (e.device_id, "active", e.reason, at))
        case m.DeviceKeyRotated():
            yield Stmt(
                "devices", _DEVICE_KEY, (e.device_id, e.new_public_key, e.key_expires_at, at)
            )
        case m.DeviceFailedOver():
            yield Stmt(
                "devices",
                _DEVICE_FAILED_OVER,
                (e.device_id, e.front_door_id, list(e.pinned_keys), at),
            )
        case m.DeviceCatalogKeysReported():
            yield Stmt("devices", _DEVICE_KEYS, (e.device_id, list(e.pinned_keys)))
        case m.UsageReported():
            period = period_of(env)
            for d in e.deltas:
                yield Stmt("usage_totals", _USAGE, (d.device_id, period, d.rx_bytes, d.tx_bytes))
        case m.UsagePeriodReset():
            yield Stmt("usage_totals", _USAGE_RESET, (e.device_id, e.period))
        case m.CatalogPublished():
            yield Stmt(
                "catalogs", _CATALOG, (e.region, e.version, e.key_id, e.digest, e.expires_at)
            )
        case m.SigningKeyAnnounced():
            yield Stmt("signing_keys", _SIGNING_KEY, (e.key_id, e.public_key, at))
        case m.SigningKeyActivated():
            yield Stmt("signing_keys", _KEY_RETIRED, (e.retired_key_id, at))
            yield Stmt("signing_keys", _KEY_ACTIVATED, (e.key_id, at))
        case m.GatewayHeartbeat():
            yield Stmt(
                "gateway_health",
                _HEALTH,
                (
                    e.gateway_id,
                    at,
                    e.peer_count,
                    e.active_peers,
                    e.rx_bytes,
                    e.tx_bytes,
                    e.load,
                    e.peer_set_revision,
                ),
            )
        case _:
            return
