"""An operator's provider script for tests: the exec JSON contract, driving the netns provider.

Reads one request on stdin, answers on stdout. Its configuration comes from the environment
(DAMM_EXEC_STATE: the inventory directory), as a real script would take its own settings.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from damm import log
from damm.orchestrator.providers.base import HostSpec
from damm.orchestrator.providers.netns import NetnsProvider
from damm.orchestrator.topology import Provider


def provider() -> NetnsProvider:
    spec = Provider(kind="netns", subnet="172.31.9.0/24", heartbeat_s=1.0, capacity=2)
    return NetnsProvider("exec-lab", spec, Path(os.environ["DAMM_EXEC_STATE"]))


async def answer(req: dict[str, Any]) -> Any:
    lab = provider()
    match req["op"]:
        case "create":
            fields = {k: v for k, v in req.items() if k != "op"}
            return await lab.create(msgspec.convert(fields, HostSpec))
        case "destroy":
            await lab.destroy(req["gateway_id"])
            return {}
        case "add_front_door":
            return {"endpoint": await lab.add_front_door(req["gateway_id"], req["front_door_id"])}
        case "remove_front_door":
            await lab.remove_front_door(req["gateway_id"], req["front_door_id"])
            return {}
        case "add_egress":
            return {"ips": await lab.add_egress(req["pool_id"], req["region"], req["country"])}
        case "list":
            return await lab.list()
    print(f"unknown op {req['op']!r}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    log.configure()  # stderr: stdout carries the answer only
    request = msgspec.json.decode(sys.stdin.buffer.read())
    sys.stdout.buffer.write(msgspec.json.encode(asyncio.run(answer(request))))
