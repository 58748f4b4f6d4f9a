"""Three (or more) nats-server nodes on loopback forming one JetStream cluster.

The same binary and the same generated configuration as a single node, plus a ``cluster`` block
whose routes name every node. Client and route ports are chosen up front (routes must be known
before any node starts), so a port taken in between makes ``start`` fail rather than guess.
"""

from __future__ import annotations

import asyncio
import socket
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js.errors import APIError, ServiceUnavailableError

from damm.stack.nats_config import ClusterSettings
from damm.stack.nats_server import NatsServer, callout_seed

CLUSTER_NAME = "damm"


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@dataclass
class NatsCluster:
    data_dir: Path
    size: int = 3
    passwords: dict[str, str] = field(default_factory=dict)
    nodes: list[NatsServer] = field(default_factory=list)
    # Every node names the same callout issuer; any control plane answers for any node.
    callout: bool = False
    callout_seed: bytes = b""

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: nats-py reconnects across them."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> str:
        ports = free_ports(2 * self.size)
        client, route = ports[: self.size], ports[self.size :]
        routes = tuple(f"nats-route://127.0.0.1:{p}" for p in route)
        if self.callout and not self.callout_seed:
            self.callout_seed = callout_seed(self.data_dir)
        self.nodes = [
            NatsServer(
                self.data_dir / f"n{i + 1}",
                passwords=self.passwords,  # shared: start() fills in any missing role once
                port=client[i],
                server_name=f"damm-{i + 1}",
                cluster=ClusterSettings(CLUSTER_NAME, f"127.0.0.1:{route[i]}", routes),
                callout=self.callout,
                callout_seed=self.callout_seed,
            )
            for i in range(self.size)
        ]
        try:
            for node in self.nodes:
                node.start()
        except Exception:
            self.stop()
            raise
        return self.url

    def node(self, server_name: str) -> NatsServer:
        return next(n for n in self.nodes if n.server_name == server_name)

    def set_gateways(self, gateways: dict[str, str]) -> bool:
        changed = [node.set_gateways(gateways) for node in self.nodes]
        return any(changed)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


async def until_meta_leader(js: Any, timeout: float = 30.0) -> None:
    """Wait until the cluster has elected the JetStream meta leader (stream creation fails
    with 'JetStream system temporarily unavailable' until then, about 3 s here)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await js.account_info()
            return
        except (APIError, ServiceUnavailableError, TimeoutError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
