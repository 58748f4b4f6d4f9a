"""A read-model projector in its own process, so tests can SIGKILL it at any instruction.

python -m tests.projector_proc NATS_URL CONTROL_PASSWORD DSN
"""

from __future__ import annotations

import asyncio
import sys

from damm import log
from damm.projections.runner import Projector
from damm.protocol.bus import connect
from damm.subjects import EVENTS_STREAM


async def main(url: str, password: str, dsn: str) -> None:
    nc = await connect(url, user="control", password=password, name="projector-proc")
    try:
        await Projector("readmodels", EVENTS_STREAM, dsn).run(nc, asyncio.Event())
    finally:
        await nc.close()


if __name__ == "__main__":
    log.configure("warning", json=True)
    asyncio.run(main(*sys.argv[1:4]))
