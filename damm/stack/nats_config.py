"""The NATS server configuration, for production (ops/nats.conf) and the embedded stack alike.

Outside parties live in accounts of their own, so the server, not DAMM's code, decides where an
answer may go. The accounts stay; who lands in which is decided per connection by the control
plane's auth callout (damm.control.callout) from the event log, so only the control plane and
the admin tool have users in this file, and adding a device or a gateway needs no reload.

- ``DAMM`` holds the event streams, the control plane and the operator's admin tool. It exports
  the request services each outside account may call, and, as streams into ``GW``, the peer
  sets and the answers to gateways.
- ``DEV``: devices that proved their enrolled key (an nkey's signature over the server's
  nonce); ``ANON``: a key not (or no longer) enrolled, only enrollment and the catalog, and no
  credentials at all, only the catalog, with connection and subscription caps. Requests reach
  the control plane through service imports, so the reply subject a device names is mapped by
  the server to ``_R_.…``: the control plane can only ever answer into the device's own
  account, never onto ``damm.evt.>``, ``damm.peers.>`` or ``$JS.>``; and a device may only
  subscribe to an inbox named by its own key.
- ``GW``: a gateway logs in as ``gw-<id>`` with its token, checked by the callout against the
  bcrypt hash in the log. The callout grants it only ``damm.peers.<id>`` and
  ``damm.gwr.<id>.>``. One account for all gateways (nats-server does not wire service
  imports of an account added by a config reload), so a gateway's *reply* subject could name
  another gateway's subjects; the control plane therefore never answers a gateway on the reply
  subject it names, only on ``damm.gwr.<its own id>.<token>``, its identity taken from the
  server-stamped ``Nats-Request-Info``.
- The untrusted accounts get a small ``max_payload``: the server refuses an oversized body
  before it is ever delivered to the control plane.
- The control-plane user may publish exactly what it writes: events, telemetry, peer sets and
  gateway answers, the JetStream API and acks, answers to mapped (``_R_``) or its own inboxes,
  and the callout's answers to the server.

Without a callout issuer (the embedded test fixtures) the same accounts hold static users: an
anonymous ``device`` (``no_auth_user``) and one ``gw-<id>`` per gateway with a bcrypt hash.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from damm.keys.nats_identity import as_user_key, new_account_seed, public_key
from damm.subjects import (
    EVENT_PREFIX,
    GATEWAY_REPLY_PREFIX,
    LEASE_BUCKET,
    PEERS_PREFIX,
    REQUEST_PREFIX,
    SNAPSHOT_BUCKET,
    TELEMETRY_PREFIX,
    gateway_reply_prefix,
    gateway_user,
    inbox_prefix,
    peers_subject,
)

ROLES = ("control", "admin", "device")
DEVICE_INBOX = "_INBOX.>"
MAPPED_REPLY_PREFIX = "_R_"

DEVICE_SERVICES = (
    f"{REQUEST_PREFIX}.enroll",
    f"{REQUEST_PREFIX}.device.>",
    f"{REQUEST_PREFIX}.catalog.>",
)
GATEWAY_SERVICES = (f"{REQUEST_PREFIX}.gateway.>",)
# What the control plane publishes into the gateway account: peer sets, and its answers to each
# gateway on that gateway's own reply subjects (never on a reply subject a gateway names).
GATEWAY_STREAMS = (PEERS_PREFIX, GATEWAY_REPLY_PREFIX)

# Headers ride inside max_payload; a request's own body limit (protocol.messages) is below it.
DEVICE_MAX_PAYLOAD = 24 * 1024
GATEWAY_MAX_PAYLOAD = 272 * 1024

CONTROL_PUBLISH = [
    f"{EVENT_PREFIX}.>",
    f"{TELEMETRY_PREFIX}.>",
    f"{PEERS_PREFIX}.>",
    f"{GATEWAY_REPLY_PREFIX}.>",
    "$JS.API.>",
    f"$KV.{LEASE_BUCKET}.>",  # the leader lease
    "$JS.ACK.>",
    "$JS.FC.>",
    f"$O.{SNAPSHOT_BUCKET}.>",  # decision-state snapshots (object store chunks and metadata)
    f"{MAPPED_REPLY_PREFIX}.>",
    f"{inbox_prefix('control')}.>",
    f"{inbox_prefix('admin')}.>",
]

PERMISSIONS: dict[str, dict[str, list[str]] | None] = {
    "control": {"publish": CONTROL_PUBLISH},
    "admin": None,
    "device": {"publish": list(DEVICE_SERVICES), "subscribe": [DEVICE_INBOX]},
}

# The single shared account DAMM ran before accounts: kept only so the benchmark can measure
# what the accounts cost against it in the same run. Never ship it.
LEGACY_PERMISSIONS: dict[str, dict[str, list[str]] | None] = {
    "control": None,
    "admin": None,
    "device": {"publish": list(DEVICE_SERVICES), "subscribe": [DEVICE_INBOX]},
}

_ENV_REF = re.compile(r"^\$[A-Z_][A-Z0-9_]*$")


def gateway_permissions(gateway_id: str) -> dict[str, list[str]]:
    return {
        "publish": list(GATEWAY_SERVICES),
        "subscribe": [
            peers_subject(gateway_id),
            f"{gateway_reply_prefix(gateway_id)}.>",
            f"{inbox_prefix(gateway_user(gateway_id))}.>",
        ],
    }


@dataclass(frozen=True)
class ClusterSettings:
    """One node's place in a JetStream cluster: every node lists every node's route (its own
    included, which nats-server ignores), so one file template serves all of them."""

    name: str
    listen: str  # host:port for routes
    routes: tuple[str, ...]  # nats-route://host:port of every node


@dataclass(frozen=True)
class ServerSettings:
    store_dir: str
    passwords: dict[str, str]
    gateways: Mapping[str, str] = field(default_factory=dict)  # gateway id -> bcrypt hash
    max_payload: int = 1024 * 1024
    server_name: str = "damm"
    single_account: bool = False  # benchmarks only: the pre-accounts layout
    max_file_store: int | None = None  # bytes; None lets nats-server use most of the disk
    cluster: ClusterSettings | None = None
    # The auth callout's issuer (an account nkey, or a ``$ENV`` reference): when set, nobody but
    # the control plane and the admin tool has a user in this file; the control plane's callout
    # decides every other connection from the event log (damm.control.callout).
    callout_issuer: str | None = None
    anon_max_connections: int = 10_000
    anon_max_subscriptions: int = 40_000


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _password(value: str) -> str:
    """``$NAME`` stays an environment reference; anything else (bcrypt too) is a quoted literal."""
    return value if _ENV_REF.match(value) else _quote(value)


def _list(values: list[str] | tuple[str, ...]) -> str:
    return ", ".join(_quote(s) for s in values)


def _permissions(perms: dict[str, list[str]] | None) -> str:
    if perms is None:
        return ""
    parts = [
        f"{kind}: {{ allow: [{_list(perms[kind])}] }}"
        for kind in ("publish", "subscribe")
        if kind in perms
    ]
    inner = "".join(f"\n          {part}" for part in parts)
    return f"\n        permissions: {{{inner}\n        }}"


def _user(name: str, password: str | None, perms: dict[str, list[str]] | None) -> str:
    pw = f", password: {_password(password)}" if password is not None else ""
    return f"      {{ user: {_quote(name)}{pw}{_permissions(perms)} }}"


def _max_file_store(settings: ServerSettings) -> str:
    if settings.max_file_store is None:
        return ""
    return f"\n  max_file_store: {settings.max_file_store}"


def _cluster(settings: ServerSettings) -> str:
    c = settings.cluster
    if c is None:
        return ""
    routes = ", ".join(_quote(r) for r in c.routes)
    return f"""
# A JetStream cluster: streams are replicated (R3) across these nodes by Raft.
cluster {{
  name: {_quote(c.name)}
  listen: {_quote(c.listen)}
  routes: [{routes}]
}}
"""


def _imports(subjects: tuple[str, ...]) -> str:
    return ",\n".join(
        f'      {{ service: {{ account: "DAMM", subject: {_quote(s)} }} }}' for s in subjects
    )


def _accounts(settings: ServerSettings, sys_password: str) -> str:
    control_users = ",\n".join(
        _user(role, settings.passwords.get(role), PERMISSIONS[role])
        for role in ("control", "admin")
    )
    device_user = _user("device", None, PERMISSIONS["device"])
    gateway_users = ",\n".join(
        _user(gateway_user(gw), pw_hash, gateway_permissions(gw))
        for gw, pw_hash in sorted(settings.gateways.items())
    )
    exports = ",\n".join(
        [f'      {{ service: {_quote(s)}, accounts: ["DEV"] }}' for s in DEVICE_SERVICES]
        + [f'      {{ service: {_quote(s)}, accounts: ["GW"] }}' for s in GATEWAY_SERVICES]
        + [f'      {{ stream: {_quote(s + ".>")}, accounts: ["GW"] }}' for s in GATEWAY_STREAMS]
    )
    peers_import = ",\n".join(
        f'      {{ stream: {{ account: "DAMM", subject: {_quote(s + ".>")} }} }}'
        for s in GATEWAY_STREAMS
    )
    return f"""accounts {{
  DAMM {{
    jetstream: enabled
    users: [
{control_users}
    ]
    exports: [
{exports}
    ]
  }}
  DEV {{
    users: [
{device_user}
    ]
    imports: [
{_imports(DEVICE_SERVICES)}
    ]
    limits: {{ max_payload: {DEVICE_MAX_PAYLOAD} }}
  }}
  GW {{
    users: [
{gateway_users}
    ]
    imports: [
{_imports(GATEWAY_SERVICES)},
{peers_import}
    ]
    limits: {{ max_payload: {GATEWAY_MAX_PAYLOAD} }}
  }}
  SYS {{
    users: [ {{ user: "sys", password: {sys_password} }} ]
  }}
}}"""


ENROLLING_SERVICES = (f"{REQUEST_PREFIX}.enroll", f"{REQUEST_PREFIX}.catalog.>")
CALLOUT_AUTH_USERS = ("control", "admin")
CALLOUT_REPLIES = "$SYS._INBOX.>"
# Production: the issuer's public account key and the same key as a user key (``U…``), both
# printed by `damm admin callout-key`, which makes the issuer's seed for `damm control run`.
CALLOUT_ISSUER_ENV = "$DAMM_CALLOUT_ISSUER"
CALLOUT_NONCE_USER_ENV = "$DAMM_CALLOUT_NONCE_USER"


def _shared_imports(subjects: tuple[str, ...]) -> str:
    """``share: true`` makes the server stamp each request with ``Nats-Request-Info`` (account,
    user, client id, source address), overwriting any such header the client sent."""
    return ",\n".join(
        f'      {{ service: {{ account: "DAMM", subject: {_quote(s)} }}, share: true }}'
        for s in subjects
    )


def _callout_accounts(settings: ServerSettings, sys_password: str) -> str:
    # The callout answers the server on $SYS._INBOX: the control user may publish there too.
    perms = {
        **PERMISSIONS,
        "control": {"publish": [*CONTROL_PUBLISH, CALLOUT_REPLIES]},
    }
    control_users = ",\n".join(
        _user(role, settings.passwords.get(role), perms[role]) for role in CALLOUT_AUTH_USERS
    )
    device_only = tuple(s for s in DEVICE_SERVICES if s not in ENROLLING_SERVICES)
    exports = ",\n".join(
        [f'      {{ service: {_quote(s)}, accounts: ["DEV", "ANON"] }}' for s in ENROLLING_SERVICES]
        + [f'      {{ service: {_quote(s)}, accounts: ["DEV"] }}' for s in device_only]
        + [f'      {{ service: {_quote(s)}, accounts: ["GW"] }}' for s in GATEWAY_SERVICES]
        + [f'      {{ stream: {_quote(s + ".>")}, accounts: ["GW"] }}' for s in GATEWAY_STREAMS]
    )
    peers_import = ",\n".join(
        f'      {{ stream: {{ account: "DAMM", subject: {_quote(s + ".>")} }} }}'
        for s in GATEWAY_STREAMS
    )
    issuer = settings.callout_issuer or ""
    issuer_value = issuer if _ENV_REF.match(issuer) else _quote(issuer)
    # nats-server sends clients a nonce to sign only when some user is an nkey user; without
    # one a device could not prove its key to the callout. This user can do nothing at all.
    nonce_key = CALLOUT_NONCE_USER_ENV if _ENV_REF.match(issuer) else as_user_key(issuer)
    nonce_user = (
        f'      {{ nkey: {_password(nonce_key)}, permissions: {{ publish: {{ deny: [">"] }}, '
        f'subscribe: {{ deny: [">"] }} }} }}'
    )
    return f"""accounts {{
  DAMM {{
    jetstream: enabled
    users: [
{control_users}
    ]
    exports: [
{exports}
    ]
  }}
  DEV {{
    imports: [
{_shared_imports(DEVICE_SERVICES)}
    ]
    limits: {{ max_payload: {DEVICE_MAX_PAYLOAD} }}
  }}
  ANON {{
    imports: [
{_shared_imports(ENROLLING_SERVICES)}
    ]
    limits: {{
      max_payload: {DEVICE_MAX_PAYLOAD}
      max_connections: {settings.anon_max_connections}
      max_subscriptions: {settings.anon_max_subscriptions}
    }}
  }}
  GW {{
    imports: [
{_shared_imports(GATEWAY_SERVICES)},
{peers_import}
    ]
    limits: {{ max_payload: {GATEWAY_MAX_PAYLOAD} }}
  }}
  SYS {{
    users: [
      {{ user: "sys", password: {sys_password} }},
{nonce_user}
    ]
  }}
}}
authorization {{
  auth_callout {{
    issuer: {issuer_value}
    account: "DAMM"
    auth_users: [{_list(CALLOUT_AUTH_USERS)}]
  }}
}}"""


def _single_account(settings: ServerSettings, sys_password: str) -> str:
    users = [_user(role, settings.passwords.get(role), LEGACY_PERMISSIONS[role]) for role in ROLES]
    users += [
        _user(gateway_user(gw), pw_hash, gateway_permissions(gw))
        for gw, pw_hash in sorted(settings.gateways.items())
    ]
    user_block = ",\n".join(users)
    return f"""accounts {{
  DAMM {{
    jetstream: enabled
    users: [
{user_block}
    ]
  }}
  SYS {{
    users: [ {{ user: "sys", password: {sys_password} }} ]
  }}
}}"""


def render(settings: ServerSettings) -> str:
    """Render a nats-server config. Passwords may be ``$ENV`` references (production)."""
    sys_password = _password(settings.passwords.get("sys", "$DAMM_SYS_PASSWORD"))
    if settings.single_account:
        accounts = _single_account(settings, sys_password)
    elif settings.callout_issuer:
        accounts = _callout_accounts(settings, sys_password)
    else:
        accounts = _accounts(settings, sys_password)
    how = (
        "# The control plane decides every device and gateway connection (auth callout):\n"
        "# adding either changes nothing here. `damm admin nats-config` renders this file."
        if settings.callout_issuer and not settings.single_account
        else "# One user per gateway; reload nats-server after adding one."
    )
    return f"""# DAMM nats-server configuration (generated by damm.stack.nats_config; keep in sync).
{how}
server_name: {_password(settings.server_name)}
max_payload: {settings.max_payload}
max_connections: 65536
write_deadline: "10s"

jetstream {{
  store_dir: {_quote(settings.store_dir)}
  # fsync before acknowledging: the default 2-minute interval lost acknowledged writes
  # in Jepsen's 2025 analysis of NATS 2.12.1. DAMM acknowledges enrollments; it must not lose them.
  sync_interval: always{_max_file_store(settings)}
}}
{_cluster(settings)}
{accounts}
system_account: SYS
{"" if settings.callout_issuer and not settings.single_account else _NO_AUTH_USER}"""


_NO_AUTH_USER = """
# Devices connect without credentials and get only the device account and permissions.
no_auth_user: "device"
"""


def production() -> str:
    """ops/nats.conf: one file for any number of devices and gateways, since the control plane
    decides each connection (auth callout); adding either needs no reload."""
    return render(
        ServerSettings(
            store_dir="/var/lib/damm/jetstream",
            passwords={
                "control": "$DAMM_CONTROL_PASSWORD",
                "admin": "$DAMM_ADMIN_PASSWORD",
                "sys": "$DAMM_SYS_PASSWORD",
            },
            callout_issuer=CALLOUT_ISSUER_ENV,
        )
    )


CLUSTER_ROUTES = tuple(f"nats-route://nats-{n}.damm.internal:6222" for n in (1, 2, 3))


def production_cluster() -> str:
    """One file for every node of a three-node production cluster (ops/nats-cluster.conf):
    each host sets DAMM_NATS_NODE to its own name. Streams get three replicas from
    `damm control run --stream-replicas 3`. Keep the route port reachable only from the other
    nodes (and add a mutual-TLS ``tls {}`` block to ``cluster`` on an untrusted network)."""
    return render(
        ServerSettings(
            store_dir="/var/lib/damm/jetstream",
            passwords={
                "control": "$DAMM_CONTROL_PASSWORD",
                "admin": "$DAMM_ADMIN_PASSWORD",
                "sys": "$DAMM_SYS_PASSWORD",
            },
            server_name="$DAMM_NATS_NODE",
            cluster=ClusterSettings("damm", "0.0.0.0:6222", CLUSTER_ROUTES),
            callout_issuer=CALLOUT_ISSUER_ENV,
        )
    )


def callout_env(seed: bytes | None = None) -> dict[str, str]:
    """The environment the production files expect for the callout: what
    `damm admin callout-key` prints for ``seed`` (a fresh one when None)."""
    issuer = public_key(seed if seed is not None else new_account_seed())
    return {CALLOUT_ISSUER_ENV[1:]: issuer, CALLOUT_NONCE_USER_ENV[1:]: as_user_key(issuer)}
