"""`damm gateway run`: the agent on a gateway host.

The agent makes its interface when it is missing (kernel module, else wireguard-go), sets the
tunnel address it learns at registration, brings the link up, and removes what it made on stop.
An interface that already exists is used as it is (see damm/agent/interface.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import click

from damm import log, settings
from damm.agent.egress import EgressReconciler, Nftables
from damm.agent.interface import Interface
from damm.agent.interface import ensure as ensure_interface
from damm.agent.runner import AgentConfig, GatewayAgent
from damm.cli.common import Target, resolve_token, run, token_options
from damm.cli.metrics import metrics_endpoint, metrics_option
from damm.errors import Code, DammError
from damm.protocol.messages import Registered
from damm.wireguard.base import WireGuardBackend


def make_backend(kind: str, interface: str, socket_path: str | None) -> WireGuardBackend:
    if kind == "memory":
        from damm.wireguard.memory import MemoryBackend

        return MemoryBackend()
    if kind == "uapi":
        from damm.wireguard.uapi import UapiBackend

        return UapiBackend(interface, socket_path)
    if kind == "kernel":
        from damm.wireguard.kernel import KernelBackend

        return KernelBackend(interface)
    raise DammError(Code.INVALID_ARGUMENT, f"unknown WireGuard backend {kind!r}")


@click.group()
def gateway() -> None:
    """Run and inspect a DAMM gateway."""


@gateway.command("run")
@click.option(
    "--id", "gateway_id", required=True, help="Gateway id given to `damm admin gateway add`."
)
@token_options("DAMM_GATEWAY_TOKEN", "gateway token")
@click.option(
    "--wg",
    "wg_kind",
    type=click.Choice(["auto", "kernel", "uapi", "memory"]),
    default="auto",
    show_default=True,
    help="WireGuard backend; auto: the kernel module, else wireguard-go.",
)
@click.option("--interface", default="wg0", show_default=True, help="WireGuard interface")
@click.option(
    "--uapi-socket", default=None, help="UAPI socket path (default /var/run/wireguard/IF.sock)."
)
@click.option(
    "--listen-port", default=51820, show_default=True, type=int, help="WireGuard UDP port"
)
@click.option(
    "--state-dir",
    default="/var/lib/damm/gateway",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Private key and pending usage live here.",
)
@click.option("--nats", "nats_url", envvar="DAMM_NATS_URL", default=None, help="NATS server URL")
@click.option("--heartbeat-interval", default=10.0, show_default=True, type=float, help="seconds")
@click.option(
    "--usage-interval",
    default=30.0,
    show_default=True,
    type=float,
    help="seconds between usage reports",
)
@click.option(
    "--capacity", default=1000, show_default=True, type=int, help="Peers at which load reads 1.0."
)
@click.option(
    "--egress",
    "egress_kind",
    type=click.Choice(["nftables", "off"]),
    default="off",
    show_default=True,
    help="Source-NAT each device to its egress address (nftables table `ip damm`).",
)
@click.option(
    "--egress-netns",
    default=None,
    help="Network namespace holding the uplink, when it is not the agent's own.",
)
@metrics_option
@run
async def run_cmd(
    gateway_id: str,
    token: str | None,
    token_file: Path | None,
    wg_kind: str,
    interface: str,
    uapi_socket: str | None,
    listen_port: int,
    state_dir: Path,
    nats_url: str | None,
    heartbeat_interval: float,
    usage_interval: float,
    capacity: int,
    egress_kind: str,
    egress_netns: str | None,
    metrics_listen: str | None,
) -> None:
    """Register, follow this gateway's peer set, heartbeat and report usage until stopped."""
    log.configure(settings.log_level(), json=settings.log_json())
    target = Target(nats_url, None)
    config = AgentConfig(
        gateway_id=gateway_id,
        token=resolve_token(token, token_file, "DAMM_GATEWAY_TOKEN", "gateway token"),
        nats_url=target.nats(),
        state_dir=state_dir,
        listen_port=listen_port,
        heartbeat_s=heartbeat_interval,
        usage_s=usage_interval,
        capacity=capacity,
    )
    iface: Interface | None = None
    if wg_kind != "memory" and uapi_socket is None:
        iface = await ensure_interface(interface, wg_kind)  # type: ignore[arg-type]
        wg_kind = iface.backend
    backend = make_backend(wg_kind, interface, uapi_socket)
    wrapper = ("ip", "netns", "exec", egress_netns) if egress_netns else ()
    egress = EgressReconciler(Nftables(wrapper=wrapper)) if egress_kind == "nftables" else None
    agent = GatewayAgent(config, backend, egress)
    if iface is not None:
        configure = iface.configure

        async def on_registered(reply: Registered) -> None:
            await configure(*(a for a in (reply.gateway_address, reply.gateway_address6) if a))

        agent.on_registered = on_registered
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with metrics_endpoint(metrics_listen, agent.metrics.registry):
            await agent.run(stop)
    finally:
        await backend.close()
        if iface is not None:
            await iface.close()


if __name__ == "__main__":
    gateway()
