"""The ``netns`` provider: real gateway hosts on one Linux machine, one network namespace each.

A host is a namespace attached to the provider's bridge (itself in a hub namespace), with one
bridge address per front door, running the same ``damm gateway run`` an operator runs. The
agent makes its wireguard-go interface, registers with its scoped token and heartbeats like any
gateway. A relay (``relay.py``) gives the namespace a loopback port that reaches NATS.

Hosts outlive the apply that made them, so the provider keeps an inventory on disk (one JSON
file per host) and checks it against the machine on ``list``: a namespace that vanished or whose
processes died is ``broken``. Processes are found by namespace (``ip netns pids``), so a host
whose inventory write was cut short by a crash is still torn down completely.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from damm import log
from damm.errors import Code, DammError
from damm.netns import LabError, exec_in, run
from damm.orchestrator.providers.base import Host, HostSpec
from damm.orchestrator.topology import Provider as ProviderSpec
from damm.private_files import open_private_log, private_dir, write_atomic

_log = log.get("damm.orchestrator.netns")

LISTEN_PORT = 51820
RELAY_PORT = 4222
EGRESS_BASE = ipaddress.ip_network("198.18.0.0/15")  # benchmarking range: never routed


class HostRecord(msgspec.Struct, kw_only=True):
    gateway_id: str
    region: str
    netns: str
    veth: str
    ifname: str
    front_doors: dict[str, str] = msgspec.field(default_factory=dict)  # id -> address
    relay_pid: int = 0
    agent_pid: int = 0
    created_at: float = 0.0


class Inventory(msgspec.Struct, kw_only=True):
    clients: dict[str, str] = msgspec.field(default_factory=dict)  # name -> address
    egress: dict[str, str] = msgspec.field(default_factory=dict)  # pool id -> cidr


def _short(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own dead child not yet reaped) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _wait_gone(pids: list[int], grace: float) -> None:
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


class NetnsProvider:
    def __init__(self, name: str, spec: ProviderSpec, state_dir: Path) -> None:
        self.name = name
        self.spec = spec
        self.state_dir = state_dir
        self.tag = _short(str(state_dir.resolve()) + name)[:6]
        self.subnet = ipaddress.ip_network(spec.subnet)
        self.hub = f"dmo-{self.tag}-hub"
        self.bridge = "br0"

    # --- inventory -------------------------------------------------------------------------

    @property
    def hosts_dir(self) -> Path:
        return self.state_dir / "hosts"

    def _record_path(self, gateway_id: str) -> Path:
        return self.hosts_dir / f"{gateway_id}.json"

    def _records(self) -> list[HostRecord]:
        if not self.hosts_dir.is_dir():
            return []
        out = []
        for path in sorted(self.hosts_dir.glob("*.json")):
            with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
                out.append(msgspec.json.decode(path.read_bytes(), type=HostRecord))
        return out

    def _record(self, gateway_id: str) -> HostRecord | None:
        path = self._record_path(gateway_id)
        try:
            return msgspec.json.decode(path.read_bytes(), type=HostRecord)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def _save(self, record: HostRecord) -> None:
        private_dir(self.hosts_dir)
        write_atomic(self._record_path(record.gateway_id), msgspec.json.encode(record))

    def _inventory(self) -> Inventory:
        try:
            return msgspec.json.decode(
                (self.state_dir / "inventory.json").read_bytes(), type=Inventory
            )
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return Inventory()

    def _save_inventory(self, inv: Inventory) -> None:
        private_dir(self.state_dir)
        write_atomic(self.state_dir / "inventory.json", msgspec.json.encode(inv))

    def _allocate(self, used_extra: set[str] = frozenset()) -> str:  # type: ignore[assignment]
        used = set(used_extra) | set(self._inventory().clients.values())
        for rec in self._records():
            used |= set(rec.front_doors.values())
        for host in self.subnet.hosts():
            if str(host) not in used:
                return str(host)
        raise DammError(Code.PROVIDER_FAILED, f"{self.name}: subnet {self.subnet} is full")

    # --- the machine -----------------------------------------------------------------------

    async def _netns_exists(self, ns: str) -> bool:
        return await asyncio.to_thread(os.path.exists, f"/run/netns/{ns}")

    async def _ensure_hub(self) -> None:
        if await self._netns_exists(self.hub):
            return
        await run("ip", "netns", "add", self.hub)
        await run("ip", "-n", self.hub, "link", "set", "lo", "up")
        await run("ip", "-n", self.hub, "link", "add", self.bridge, "type", "bridge")
        await run("ip", "-n", self.hub, "link", "set", self.bridge, "up")

    async def _attach(self, ns: str, key: str) -> str:
        """A veth from ``ns`` to the hub's bridge; returns its name inside ``ns``."""
        inner, outer = f"vo{_short(key)}", f"vb{_short(key)}"
        await run(
            "ip", "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer,
            "netns", self.hub,
        )  # fmt: skip
        await run("ip", "-n", self.hub, "link", "set", outer, "master", self.bridge)
        await run("ip", "-n", self.hub, "link", "set", outer, "up")
        await run("ip", "-n", ns, "link", "set", inner, "up")
        return inner

    async def _pids(self, ns: str) -> list[int]:
        if not await self._netns_exists(ns):
            return []
        result = await run("ip", "netns", "pids", ns, check=False)
        return [int(x) for x in result.stdout.split() if x.isdigit()]

    async def _kill(self, pids: list[int], grace: float = 3.0) -> None:
        # Never 0 or negative: os.kill would signal a whole process group, ours included.
        pids = [pid for pid in pids if pid > 0]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        await asyncio.to_thread(_wait_gone, pids, grace)
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # --- the provider interface ------------------------------------------------------------

    async def list(self) -> list[Host]:
        hosts = []
        for rec in self._records():
            running = await self._netns_exists(rec.netns) and _alive(rec.agent_pid)
            hosts.append(
                Host(
                    gateway_id=rec.gateway_id,
                    region=rec.region,
                    provider_ref=rec.netns,
                    state="running" if running else "broken",
                    front_doors={fd: f"{ip}:{LISTEN_PORT}" for fd, ip in rec.front_doors.items()},
                )
            )
        return hosts

    async def create(self, spec: HostSpec) -> Host:
        existing = next((h for h in await self.list() if h.gateway_id == spec.gateway_id), None)
        if existing is not None and existing.state == "running":
            return existing
        if existing is not None:
            await self.destroy(spec.gateway_id)
        try:
            return await self._create(spec)
        except (LabError, OSError) as exc:
            raise DammError(Code.PROVIDER_FAILED, f"{self.name}: {exc}") from None

    async def _create(self, spec: HostSpec) -> Host:
        await self._ensure_hub()
        ns = f"dmo-{self.tag}-{spec.gateway_id}"
        if await self._netns_exists(ns):  # left by a crash before its record was written
            await self._kill(await self._pids(ns))
            await run("ip", "netns", "del", ns)
        record = HostRecord(
            gateway_id=spec.gateway_id,
            region=spec.region,
            netns=ns,
            veth="",
            ifname=f"wgo{_short(self.tag + spec.gateway_id)}",
            created_at=time.time(),
        )
        self._save(record)  # first, so a crash from here on leaves something to clean up
        await run("ip", "netns", "add", ns)
        await run("ip", "-n", ns, "link", "set", "lo", "up")
        # Front doors share one subnet; without this, removing the first address (fd1) makes
        # the kernel drop every other address of that subnet (fd2 too) with it.
        await exec_in(
            ns, "sysctl", "-q", "-w", "net.ipv4.conf.all.promote_secondaries=1",
            "net.ipv4.conf.default.promote_secondaries=1",
        )  # fmt: skip
        record.veth = await self._attach(ns, self.tag + spec.gateway_id)
        for fd in spec.front_doors:
            address = self._allocate(set(record.front_doors.values()))
            await run(
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                f"{address}/{self.subnet.prefixlen}",
                "dev",
                record.veth,
            )
            record.front_doors[fd] = address
        self._save(record)
        host_dir = self.hosts_dir / spec.gateway_id
        private_dir(host_dir)
        record.relay_pid = self._spawn(
            [
                sys.executable,
                "-m",
                "damm.orchestrator.providers.relay",
                ns,
                str(RELAY_PORT),
                spec.nats_url,
            ],
            host_dir / "relay.log",
        )
        self._save(record)
        agent = [
            "ip", "netns", "exec", ns,
            sys.executable, "-m", "damm.cli.main", "gateway", "run",
            "--id", spec.gateway_id,
            "--interface", record.ifname,
            "--nats", f"nats://127.0.0.1:{RELAY_PORT}",
            "--listen-port", str(LISTEN_PORT),
            "--state-dir", str(host_dir / "agent"),
            "--heartbeat-interval", str(self.spec.heartbeat_s),
            "--usage-interval", str(max(5.0, self.spec.heartbeat_s)),
            "--capacity", str(self.spec.capacity),
        ]  # fmt: skip
        # The token travels in the environment, never on a command line others can read.
        record.agent_pid = self._spawn(agent, host_dir / "agent.log", DAMM_GATEWAY_TOKEN=spec.token)
        self._save(record)
        _log.info("host created", gateway_id=spec.gateway_id, netns=ns, doors=record.front_doors)
        return Host(
            gateway_id=spec.gateway_id,
            region=spec.region,
            provider_ref=ns,
            state="running",
            front_doors={fd: f"{ip}:{LISTEN_PORT}" for fd, ip in record.front_doors.items()},
        )

    def _spawn(self, argv: Sequence[str], log_path: Path, **env: str) -> int:
        out = open_private_log(log_path)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env={**os.environ, "DAMM_LOG_FORMAT": "json", **env},
                start_new_session=True,  # the host outlives the apply that made it
            )
        finally:
            os.close(out)
        return proc.pid

    async def destroy(self, gateway_id: str) -> None:
        await self._take_down(gateway_id)
        self._record_path(gateway_id).unlink(missing_ok=True)
        _log.info("host destroyed", gateway_id=gateway_id)

    async def _take_down(self, gateway_id: str) -> None:
        """Its processes, namespace and bridge link gone; its record and agent state left."""
        record = self._record(gateway_id)
        ns = record.netns if record else f"dmo-{self.tag}-{gateway_id}"
        await self._kill([*await self._pids(ns), *([record.agent_pid] if record else [])])
        if record is not None:
            await self._kill(
                [record.relay_pid, _read_pid(self.hosts_dir / gateway_id / "relay.pid")]
            )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/var/run/wireguard/{record.ifname}.sock")
        if await self._netns_exists(ns):
            await run("ip", "netns", "del", ns)
        if record is not None and record.veth:
            await run("ip", "-n", self.hub, "link", "del", f"vb{record.veth[2:]}", check=False)

    async def add_front_door(self, gateway_id: str, front_door_id: str) -> str:
        record = self._record(gateway_id)
        if record is None:
            raise DammError(Code.PROVIDER_FAILED, f"{self.name}: no host for {gateway_id}")
        if front_door_id not in record.front_doors:
            address = self._allocate()
            await run(
                "ip",
                "-n",
                record.netns,
                "addr",
                "add",
                f"{address}/{self.subnet.prefixlen}",
                "dev",
                record.veth,
            )
            record.front_doors[front_door_id] = address
            self._save(record)
        return f"{record.front_doors[front_door_id]}:{LISTEN_PORT}"

    async def remove_front_door(self, gateway_id: str, front_door_id: str) -> None:
        record = self._record(gateway_id)
        if record is None or front_door_id not in record.front_doors:
            return
        address = record.front_doors.pop(front_door_id)
        await run(
            "ip",
            "-n",
            record.netns,
            "addr",
            "del",
            f"{address}/{self.subnet.prefixlen}",
            "dev",
            record.veth,
            check=False,
        )
        self._save(record)

    async def add_egress(self, pool_id: str, region: str, country: str) -> tuple[str, ...]:
        inv = self._inventory()
        if pool_id not in inv.egress:
            blocks = EGRESS_BASE.subnets(new_prefix=28)
            taken = set(inv.egress.values())
            inv.egress[pool_id] = next(str(b) for b in blocks if str(b) not in taken)
            self._save_inventory(inv)
        return (inv.egress[pool_id],)

    # --- for tests and demos: a client on the provider's network ---------------------------

    async def attach_client(self, ns: str, name: str) -> str:
        """Put namespace ``ns`` on the bridge with an address; returns the address."""
        await self._ensure_hub()
        inv = self._inventory()
        address = inv.clients.get(name) or self._allocate()
        inv.clients[name] = address
        self._save_inventory(inv)
        inner = await self._attach(ns, f"client-{self.tag}-{name}")
        await exec_in(
            ns, "ip", "addr", "replace", f"{address}/{self.subnet.prefixlen}", "dev", inner
        )
        return address

    async def teardown(self) -> None:
        """Every host, then the hub: nothing of this provider is left on the machine."""
        for rec in self._records():
            await self.destroy(rec.gateway_id)
        await self._drop_hub()

    async def stop(self) -> None:
        """Every host down and the hub gone, as after a reboot, but the records and agent state
        stay: each host then lists as ``broken``, and ``create`` with its spec boots it again
        under its own id and WireGuard key instead of the orchestrator replacing it."""
        for rec in self._records():
            await self._take_down(rec.gateway_id)
            # Dead pids in a record kept for long would be signalled once reused by others.
            self._save(msgspec.structs.replace(rec, agent_pid=0, relay_pid=0))
        await self._drop_hub()
        _log.info("hosts stopped", provider=self.name)

    async def _drop_hub(self) -> None:
        inv = self._inventory()
        if inv.clients:
            inv.clients.clear()  # their links went with the hub
            self._save_inventory(inv)
        if await self._netns_exists(self.hub):
            await self._kill(await self._pids(self.hub))
            await run("ip", "netns", "del", self.hub)
