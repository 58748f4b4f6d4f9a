"""A WireGuard interface that outlives its agent: peers and counters in an SQLite file.

A real interface keeps its peers and counters when the agent is killed; the in-memory backend
dies with the agent's process, so a chaos run could not tell a correct restart from a lucky one.
Here the agent's process applies peers to the file, and the harness plays the network: every
tick it moves bytes over each peer that has allowed IPs (a cleared peer passes nothing, as in
WireGuard) and keeps its own tally of what moved. That tally is what the usage totals must equal.
"""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

from nacl.bindings import crypto_scalarmult_base

from damm.wireguard.base import InterfaceState, PeerStats, WireGuardError
from damm.wireguard.peer_diff import PeerDiff

_SCHEMA = """
CREATE TABLE IF NOT EXISTS identity (public_key TEXT, listen_port INTEGER);
CREATE TABLE IF NOT EXISTS peers (
    public_key TEXT PRIMARY KEY, allowed_ips TEXT NOT NULL, keepalive INTEGER NOT NULL,
    rx INTEGER NOT NULL DEFAULT 0, tx INTEGER NOT NULL DEFAULT 0, endpoint TEXT
);
CREATE TABLE IF NOT EXISTS moved (
    public_key TEXT PRIMARY KEY, rx INTEGER NOT NULL, tx INTEGER NOT NULL
);
"""


def open_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "PRAGMA synchronous=NORMAL"
    )  # a process kill loses nothing; a host crash is not ours
    db.executescript(_SCHEMA)
    return db


class SqliteBackend:
    """The agent's side: the five operations of ``WireGuardBackend`` over the file."""

    def __init__(self, path: Path) -> None:
        self.db = open_db(path)

    async def read(self) -> InterfaceState:
        try:
            row = self.db.execute("SELECT public_key, listen_port FROM identity").fetchone()
            rows = self.db.execute(
                "SELECT public_key, allowed_ips, keepalive, rx, tx, endpoint FROM peers"
            ).fetchall()
        except sqlite3.Error as exc:
            raise WireGuardError(f"read: {exc}") from None
        peers = {
            key: PeerStats(
                key,
                tuple(ips.split(",")) if ips else (),
                endpoint=endpoint,
                rx_bytes=rx,
                tx_bytes=tx,
                persistent_keepalive=keepalive,
            )
            for key, ips, keepalive, rx, tx, endpoint in rows
        }
        return InterfaceState(row[0] if row else None, row[1] if row else None, peers)

    async def apply(self, diff: PeerDiff) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(
                    "DELETE FROM peers WHERE public_key=?", [(k,) for k in diff.remove]
                )
                self.db.executemany(
                    "UPDATE peers SET allowed_ips=?, keepalive=? WHERE public_key=?",
                    [
                        (",".join(p.allowed_ips), p.persistent_keepalive, p.public_key)
                        for p in diff.update
                    ],
                )
                # A peer added again starts from zero, as WireGuard's counters do.
                self.db.executemany(
                    "INSERT OR REPLACE INTO peers (public_key, allowed_ips, keepalive)"
                    " VALUES (?,?,?)",
                    [
                        (p.public_key, ",".join(p.allowed_ips), p.persistent_keepalive)
                        for p in diff.add
                    ],
                )
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise WireGuardError(f"apply: {exc}") from None

    async def set_identity(self, private_key_b64: str, listen_port: int) -> None:
        public = base64.b64encode(crypto_scalarmult_base(base64.b64decode(private_key_b64)))
        with self.db:
            self.db.execute("DELETE FROM identity")
            self.db.execute("INSERT INTO identity VALUES (?,?)", (public.decode(), listen_port))

    async def set_peer_endpoint(self, public_key: str, endpoint: str) -> None:
        self.db.execute("UPDATE peers SET endpoint=? WHERE public_key=?", (endpoint, public_key))

    async def close(self) -> None:
        self.db.close()


class Network:
    """The harness's side: traffic over the live peers, and what the interface shows."""

    def __init__(self, path: Path) -> None:
        self.db = open_db(path)

    def move(self, rx: int, tx: int) -> int:
        """Move ``rx``/``tx`` bytes over every peer that passes traffic; returns how many."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            n = self.db.execute(
                "UPDATE peers SET rx=rx+?, tx=tx+? WHERE allowed_ips != ''", (rx, tx)
            ).rowcount
            self.db.execute(
                "INSERT INTO moved SELECT public_key, ?, ? FROM peers WHERE allowed_ips != ''"
                " ON CONFLICT(public_key) DO UPDATE SET rx=moved.rx+excluded.rx,"
                " tx=moved.tx+excluded.tx",
                (rx, tx),
            )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return int(n)

    def moved(self) -> dict[str, tuple[int, int]]:
        rows = self.db.execute("SELECT public_key, rx, tx FROM moved").fetchall()
        return {key: (rx, tx) for key, rx, tx in rows}

    def peers(self) -> dict[str, tuple[str, ...]]:
        rows = self.db.execute("SELECT public_key, allowed_ips FROM peers").fetchall()
        return {key: tuple(ips.split(",")) if ips else () for key, ips in rows}

    def close(self) -> None:
        self.db.close()
