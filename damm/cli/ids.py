"""Naming objects by a unique id prefix in commands that read, not write.

Writes resolve prefixes in the control plane (``damm.domain.ids``) against the log's own state;
commands that only read look the candidates up in the read model instead.
"""

from __future__ import annotations

from typing import Literal

import asyncpg

from damm.cli.common import Target
from damm.domain.ids import SHOWN, resolve_prefix
from damm.errors import Code, DammError

Kind = Literal["device", "gateway", "token"]
_TABLES: dict[Kind, tuple[str, str]] = {
    "device": ("devices", "device_id"),
    "gateway": ("gateways", "gateway_id"),
    "token": ("tokens", "token_id"),
}


def _like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def resolve(t: Target, kind: Kind, given: str) -> str:
    """The full id ``given`` names, from the read model."""
    table, column = _TABLES[kind]
    try:
        conn = await asyncpg.connect(t.database(), server_settings={"search_path": "damm"})
    except (OSError, asyncpg.PostgresError) as exc:
        raise DammError(Code.UNAVAILABLE, f"cannot reach Postgres: {exc}") from None
    try:
        rows = await conn.fetch(
            f"SELECT {column} FROM {table} WHERE {column} LIKE $1 ORDER BY 1 LIMIT $2",
            _like(given),
            SHOWN + 1,
        )
    finally:
        await conn.close()
    return resolve_prefix({r[column] for r in rows}, given, kind)
