"""Ordered SQL migrations, tracked per schema, so a read-model schema can be built anywhere.

Replay builds a fresh schema beside the live one with the same files, which is why the schema
name is a parameter rather than baked into the SQL.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def migrations() -> list[tuple[int, str, str]]:
    files = resources.files("damm.projections").joinpath("migrations")
    found = []
    for entry in files.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


def check_schema(schema: str) -> str:
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"bad schema name {schema!r}")
    return schema


async def migrate(conn: Any, schema: str) -> list[str]:
    """Apply the migrations not yet applied to ``schema``; return their names."""
    check_schema(schema)
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"damm-migrate-{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            r["version"]
            for r in await conn.fetch(f"SELECT version FROM {schema}.schema_migrations")
        }
        await conn.execute(f"SET LOCAL search_path TO {schema}")
        for version, name, sql in migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                f"INSERT INTO {schema}.schema_migrations (version, name) VALUES ($1, $2)",
                version,
                name,
            )
            applied.append(name)
    return applied
