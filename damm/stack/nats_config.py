"""The NATS server configuration, for production (ops/nats.conf) and the embedded stack alike.

Outside parties live in accounts of their own, so the server, not DAMM's code, decides where an
answer may go.

- ``DAMM`` holds the event streams, the control plane and the operator's admin tool. It exports
  the request services each outside account may call, and the peer-set subjects as a stream.
- ``DEV``: devices connect without credentials (``no_auth_user``) and may only call enrollment,
  device and catalog requests. They reach them through service imports, so the reply subject a
  device names is mapped by the server to ``_R_.…``: the control plane can only ever answer
  into the device's own account, never onto ``damm.evt.>``, ``damm.peers.>`` or ``$JS.>``.
- ``GW``: each gateway is its own user, ``gw-<id>``, whose password is its gateway token (the
  config holds only a bcrypt hash, recorded when the gateway was added). It imports the gateway
  requests the same way, and the peer-set stream, of which its permissions let it read only
  ``damm.peers.<id>``; replies reach it on an inbox only it may read. One shared account, not
  one per gateway: nats-server (2.15/2.16, tried) does not wire service imports of an account
  added by a config reload, and gateways are added at run time. The cost: a gateway may name
  another gateway's peer subject or inbox as its reply and have an answer delivered there, in
  the gateway account only. It cannot read it; the agent ignores anything on its peer subject
  that is not a peer-set change.
- The untrusted accounts get a small ``max_payload``: the server refuses an oversized body
  before it is ever delivered to the control plane.
- The control-plane user may publish exactly what it writes: events, telemetry, peer sets, the
  JetStream API and acks, and answers to mapped (``_R_``) or its own parties' inboxes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from damm.subjects import (
    EVENT_PREFIX,
    PEERS_PREFIX,
    REQUEST_PREFIX,
    TELEMETRY_PREFIX,
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

# Headers ride inside max_payload; a request's own body limit (protocol.messages) is below it.
DEVICE_MAX_PAYLOAD = 24 * 1024
GATEWAY_MAX_PAYLOAD = 272 * 1024

CONTROL_PUBLISH = [
    f"{EVENT_PREFIX}.>",
    f"{TELEMETRY_PREFIX}.>",
    f"{PEERS_PREFIX}.>",
    "$JS.API.>",
    "$JS.ACK.>",
    "$JS.FC.>",
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
        "subscribe": [peers_subject(gateway_id), f"{inbox_prefix(gateway_user(gateway_id))}.>"],
    }


@dataclass(frozen=True)
class ServerSettings:
    store_dir: str
    passwords: dict[str, str]
    gateways: Mapping[str, str] = field(default_factory=dict)  # gateway id -> bcrypt hash
    max_payload: int = 1024 * 1024
    server_name: str = "damm"
    single_account: bool = False  # benchmarks only: the pre-accounts layout


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
        + [f'      {{ stream: {_quote(PEERS_PREFIX + ".>")}, accounts: ["GW"] }}']
    )
    peers_import = (
        f'      {{ stream: {{ account: "DAMM", subject: {_quote(PEERS_PREFIX + ".>")} }} }}'
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
    accounts = (
        _single_account(settings, sys_password)
        if settings.single_account
        else _accounts(settings, sys_password)
    )
    return f"""# DAMM nats-server configuration (generated by damm.stack.nats_config; keep in sync).
# `damm admin nats-config` renders it with one user per gateway; reload nats-server after.
server_name: {_quote(settings.server_name)}
max_payload: {settings.max_payload}
max_connections: 65536
write_deadline: "10s"

jetstream {{
  store_dir: {_quote(settings.store_dir)}
  # fsync before acknowledging: the default 2-minute interval lost acknowledged writes
  # in Jepsen's 2025 analysis of NATS 2.12.1. DAMM acknowledges enrollments; it must not lose them.
  sync_interval: always
}}

{accounts}
system_account: SYS

# Devices connect without credentials and get only the device account and permissions.
no_auth_user: "device"
"""


def production(gateways: Mapping[str, str] | None = None) -> str:
    return render(
        ServerSettings(
            store_dir="/var/lib/damm/jetstream",
            passwords={
                "control": "$DAMM_CONTROL_PASSWORD",
                "admin": "$DAMM_ADMIN_PASSWORD",
                "sys": "$DAMM_SYS_PASSWORD",
            },
            gateways=gateways or {},
        )
    )
