"""A gateway agent in a process of its own, on an interface that outlives it (interface_db).

What `damm gateway run` does, with the SQLite interface as the WireGuard backend, so a chaos run
can SIGKILL or SIGSTOP the agent at any instruction and restart it on the same state directory
(its key and its usage ledger) and the same interface.

python -m tests.chaos.agent_proc GATEWAY_ID TOKEN NATS_URL STATE_DIR INTERFACE_DB USER PASSWORD
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from damm import log
from damm.agent.runner import AgentConfig, GatewayAgent
from tests.chaos.interface_db import SqliteBackend


async def main(
    gateway_id: str, token: str, url: str, state_dir: str, db: str, user: str, password: str
) -> None:
    config = AgentConfig(
        gateway_id=gateway_id,
        token=token,
        nats_url=url,
        state_dir=Path(state_dir),
        nats_user=user,
        nats_password=password,
        heartbeat_s=1.0,
        usage_s=1.0,
        reconcile_s=10.0,
    )
    await asyncio.to_thread(Path(state_dir).mkdir, parents=True, exist_ok=True)
    backend = SqliteBackend(Path(db))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await GatewayAgent(config, backend).run(stop)
    finally:
        await backend.close()


if __name__ == "__main__":
    log.configure("info", json=True)
    asyncio.run(main(*sys.argv[1:8]))
