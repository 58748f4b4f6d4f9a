"""Prometheus endpoints of a real control plane and a real agent, scraped over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.cli.metrics import metrics_endpoint
from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.events.model import Actor, Envelope, TierDefined
from damm.events.store import Append, EventStore, envelope
from damm.metrics import AgentMetrics, ControlMetrics, parse_listen, series_names
from damm.projections.readmodels import Stmt
from damm.projections.runner import Projector
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from damm.subjects import EVENTS_STREAM, event_subject
from damm.wireguard.memory import MemoryBackend
from tests.fleet import enroll, keypair, setup_fleet

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "ops" / "grafana-dashboard.json"
DAMM = str(Path(sys.executable).parent / "damm")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

CONTROL_SERIES = (
    "damm_requests_total",
    "damm_request_duration_seconds_bucket",
    "damm_request_duration_seconds_count",
    "damm_events_appended_total",
    "damm_projector_lag_events",
    "damm_projector_lag_seconds",
    "damm_projector_active",
    "damm_enrollments_total",
    "damm_leader",
    "damm_nats_connected",
)
AGENT_SERIES = (
    "damm_agent_peers",
    "damm_agent_reconcile_duration_seconds_bucket",
    "damm_agent_reconcile_duration_seconds_count",
    "damm_agent_usage_reports_pending",
    "damm_nats_connected",
)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def _scrape(url: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(_get(url))
        for s in family.samples
    }


async def scrape(url: str) -> Samples:
    return await asyncio.to_thread(_scrape, url)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def until(check: Callable[[], object], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def scraped_until(
    url: str, check: Callable[[Samples], bool], timeout: float = 5.0
) -> Samples:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        samples = await scrape(url)
        if check(samples):
            return samples
        if loop.time() > deadline:
            raise AssertionError(f"scrape of {url} never matched; last: {samples}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def endpoints(
    control: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    nats_server: NatsServer,
    tmp_path: Path,
) -> AsyncIterator[tuple[str, str, GatewayAgent, MemoryBackend, dict[str, str]]]:
    """Both endpoints up through the CLI's own helper; the agent is created, not yet running."""
    assert control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    fleet = await setup_fleet(admin_nc, gateway_nc)
    backend = MemoryBackend()
    agent = GatewayAgent(
        AgentConfig(
            gateway_id="gw1",
            token=fleet["gw1_token"],
            nats_url=nats_server.url,
            state_dir=tmp_path / "agent",
            heartbeat_s=0.3,
            usage_s=60,  # reports stay pending until the test flushes them
            reconcile_s=60,
        ),
        backend,
    )
    async with AsyncExitStack() as stack:
        control_server = await stack.enter_async_context(
            metrics_endpoint("127.0.0.1:0", control.metrics.registry)
        )
        agent_server = await stack.enter_async_context(
            metrics_endpoint("127.0.0.1:0", agent.metrics.registry)
        )
        assert control_server is not None and agent_server is not None
        yield control_server.url, agent_server.url, agent, backend, fleet


async def test_both_endpoints_export_every_series_and_they_move(
    endpoints: tuple[str, str, GatewayAgent, MemoryBackend, dict[str, str]],
    control: ControlPlane,
    admin_nc: NATS,
    device_nc: NATS,
) -> None:
    control_url, agent_url, agent, backend, fleet = endpoints
    agent_before = await scrape(agent_url)
    assert value(agent_before, "damm_nats_connected") == 0  # not started yet

    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.synced.wait(), 5)
        await control.wait_projected()
        before = await scrape(control_url)
        agent_synced = await scrape(agent_url)
        assert set(CONTROL_SERIES) <= names(before), set(CONTROL_SERIES) - names(before)
        assert set(AGENT_SERIES) <= names(agent_synced), set(AGENT_SERIES) - names(agent_synced)
        assert value(before, "damm_leader") == 1
        assert value(before, "damm_nats_connected") == 1
        assert value(before, "damm_projector_active", projector="readmodels") == 1
        assert value(agent_synced, "damm_nats_connected") == 1
        assert value(agent_synced, "damm_agent_peers") == 0
        count = "damm_agent_reconcile_duration_seconds_count"
        assert value(agent_synced, count, kind="full") >= 1

        # Traffic: one enrollment, one refused enrollment, and the reconcile it causes.
        _, pub = keypair()
        await enroll(device_nc, fleet["token"], public_key=pub)
        with pytest.raises(DammError) as refused:
            await enroll(device_nc, "dmt_unknown-token")
        assert refused.value.code is Code.TOKEN_UNKNOWN
        await until(lambda: pub in backend.peers)
        await control.wait_projected()

        after = await scrape(control_url)
        for route, code in (("enroll", "ok"), ("enroll", "token_unknown")):
            assert value(after, "damm_requests_total", route=route, code=code) == (
                value(before, "damm_requests_total", route=route, code=code) + 1
            )
        assert value(after, "damm_request_duration_seconds_count", route="enroll") == (
            value(before, "damm_request_duration_seconds_count", route="enroll") + 2
        )
        assert value(after, "damm_enrollments_total") == value(before, "damm_enrollments_total") + 1
        enrolled = value(after, "damm_events_appended_total", type="device.enrolled")
        assert enrolled == value(before, "damm_events_appended_total", type="device.enrolled") + 1
        assert value(after, "damm_projector_lag_events", projector="readmodels") == 0

        moved = await scraped_until(agent_url, lambda s: value(s, "damm_agent_peers") == 1)

        def reconciles(s: Samples) -> float:  # a change, or a resync if a heartbeat came first
            return value(s, count, kind="changes") + value(s, count, kind="full")

        assert reconciles(moved) > reconciles(agent_synced)

        # Usage: bytes seen when the device leaves wait on disk until the control plane takes them.
        backend.set_counters(pub, 4096, 1024)
        device_id = control.ctx.state.bound_keys[pub]  # type: ignore[union-attr]
        await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=device_id), p.Done)
        await scraped_until(
            agent_url,
            lambda s: (
                value(s, "damm_agent_usage_reports_pending") >= 1
                and value(s, "damm_agent_peers") == 0
            ),
        )
        await agent.flush_usage()
        await scraped_until(agent_url, lambda s: value(s, "damm_agent_usage_reports_pending") == 0)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    stopped = await scrape(agent_url)
    assert value(stopped, "damm_nats_connected") == 0


async def test_leadership_and_connection_move_between_replicas(
    control: ControlPlane, nats_server: NatsServer, dsn: str
) -> None:
    """Two more replicas in this interpreter (their own schema, so their own leader lock): each
    reports itself from its own registry, and the numbers follow a leader's shutdown."""

    def replica() -> ControlPlane:
        return ControlPlane(
            nats_server.url,
            dsn,
            control.settings,
            password=nats_server.passwords["control"],
            schema="replicas",
            run_projectors=False,
        )

    first, second = replica(), replica()
    running = [first]
    await first.start()
    try:
        assert first.leadership is not None
        await asyncio.wait_for(first.leadership.gained.wait(), 5)
        running.append(second)
        await second.start()
        async with (
            metrics_endpoint("127.0.0.1:0", first.metrics.registry) as first_server,
            metrics_endpoint("127.0.0.1:0", second.metrics.registry) as second_server,
            metrics_endpoint("127.0.0.1:0", control.metrics.registry) as control_server,
        ):
            assert first_server and second_server and control_server
            before = await scrape(first_server.url)
            other = await scrape(second_server.url)
            assert value(before, "damm_leader") == 1 and value(other, "damm_leader") == 0
            assert value(before, "damm_nats_connected") == value(other, "damm_nats_connected") == 1
            assert "damm_projector_active" not in names(other)  # it runs no projector
            projecting = await scrape(control_server.url)
            assert value(projecting, "damm_projector_active", projector="readmodels") == 1

            running.remove(first)
            await first.stop()
            gone = await scrape(first_server.url)
            assert value(gone, "damm_leader") == 0 and value(gone, "damm_nats_connected") == 0
            await scraped_until(second_server.url, lambda s: value(s, "damm_leader") == 1)
    finally:
        for plane in running:
            await plane.stop()


async def test_projector_lag_grows_while_stuck_and_clears(
    nc: NATS, store: EventStore, dsn: str
) -> None:
    """A projector that cannot apply an event shows the events behind it and their age."""
    admin = Actor("admin", "test")
    items = [
        Append(
            event_subject("tier", f"t{n}"),
            envelope(
                event_subject("tier", f"t{n}"),
                TierDefined(tier=f"t{n}"),
                actor=admin,
                correlation_id=f"c{n}",
            ),
        )
        for n in range(5)
    ]
    for item in items:
        await store.append(item)
    blocked = True

    def project(env: Envelope) -> list[Stmt]:
        if blocked and env.seq >= 2:
            raise RuntimeError("cannot apply (test)")
        return []

    metrics = ControlMetrics()
    projector = Projector(
        "lagtest", EVENTS_STREAM, dsn, batch_size=1, project=project, metrics=metrics
    )
    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(metrics_endpoint("127.0.0.1:0", metrics.registry))
        assert server is not None
        task = asyncio.create_task(projector.run(nc, stop))
        try:
            stuck = await scraped_until(
                server.url,
                lambda s: value(s, "damm_projector_lag_events", projector="lagtest") == 4,
            )
            first_age = value(stuck, "damm_projector_lag_seconds", projector="lagtest")
            assert first_age > 0
            await scraped_until(
                server.url,
                lambda s: value(s, "damm_projector_lag_seconds", projector="lagtest") > first_age,
            )
            blocked = False
            await scraped_until(
                server.url,
                lambda s: (
                    value(s, "damm_projector_lag_events", projector="lagtest") == 0
                    and value(s, "damm_projector_lag_seconds", projector="lagtest") == 0
                ),
                timeout=10,
            )
            assert projector.applied_seq == 5
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9100", ":9100", "host:", "host:port", "host:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


async def test_listen_refusals_are_catalogued() -> None:
    registry = ControlMetrics().registry
    with pytest.raises(DammError) as bad:
        async with metrics_endpoint("nowhere", registry):
            pass
    assert bad.value.code is Code.INVALID_ARGUMENT
    async with metrics_endpoint("127.0.0.1:0", registry) as taken:
        assert taken is not None
        with pytest.raises(DammError) as busy:
            async with metrics_endpoint(f"127.0.0.1:{taken.port}", registry):
                pass
    assert busy.value.code is Code.INVALID_ARGUMENT and "in use" in busy.value.detail


def test_dashboard_queries_use_exported_series() -> None:
    exported = set(series_names(ControlMetrics().registry)) | set(
        series_names(AgentMetrics().registry)
    )
    exported.discard("")
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs
    for expr in exprs:
        used = set(re.findall(r"\bdamm_[a-z_]+\b", expr))
        assert used, expr
        assert used <= exported, (expr, used - exported)


def _endpoint(log: Path, proc: subprocess.Popen[bytes], seconds: float = 60) -> str:
    """The URL a command announced on stderr (`metrics: URL`)."""
    deadline = time.monotonic() + seconds
    while True:
        found = re.search(r"^metrics: (\S+)$", log.read_text(errors="replace"), re.MULTILINE)
        if found:
            return found.group(1)
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.05)


def _scrape_until(
    url: str, check: Callable[[Samples], bool], logs: Sequence[Path], seconds: float = 30
) -> Samples:
    deadline = time.monotonic() + seconds
    while True:
        try:
            samples = _scrape(url)
        except OSError as exc:
            said = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')}" for log in logs)
            raise AssertionError(f"scraping {url}: {exc!r}\n{said}") from exc
        if check(samples):
            return samples
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)


@pytest.fixture
def damm_home() -> Iterator[Path]:
    """Outside pytest's tmp tree: another pytest run on this machine resets that tree to 0700,
    and embedded PostgreSQL (as root) runs as its own user, which must reach its data dir."""
    root = Path(tempfile.mkdtemp(prefix="damm-test-up-", dir="/tmp"))
    yield root / "home"
    shutil.rmtree(root, ignore_errors=True)


def test_up_control_run_and_gateway_run_serve_metrics(tmp_path: Path, damm_home: Path) -> None:
    """`--metrics-listen` on all three long-running commands, against one `damm up` stack."""
    env = {**os.environ, "DAMM_HOME": str(damm_home), "DAMM_LOG_LEVEL": "warning"}
    for name in ("DAMM_NATS_URL", "DAMM_DATABASE_URL", "DAMM_METRICS_LISTEN"):
        env.pop(name, None)
    listen = ["--metrics-listen", "127.0.0.1:0"]
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([DAMM, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, log

    try:
        up, up_log = start("up", "up", "--no-demo", *listen)
        up_url = _endpoint(up_log, up)
        logs = [up_log]
        _scrape_until(up_url, lambda s: value(s, "damm_leader") == 1, logs)
        added = subprocess.run(
            [DAMM, "admin", "gateway", "add", "gw1", "--region", "eu", "--front-door",
             "udp://192.0.2.1:51820"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        token = re.search(r"dmg_\S+", added.stdout)
        assert token is not None, added.stdout
        agent, agent_log = start(
            "gateway", "gateway", "run", "--id", "gw1", "--token", token.group(0), "--wg",
            "memory", "--state-dir", str(tmp_path / "gw"), *listen,
        )  # fmt: skip
        agent_url = _endpoint(agent_log, agent)
        logs.append(agent_log)
        replica, replica_log = start(
            "control", "control", "run", "--no-projectors", "--keys-dir",
            str(damm_home / "keys"), *listen,
        )  # fmt: skip
        replica_url = _endpoint(replica_log, replica)
        logs.append(replica_log)

        agent_seen = _scrape_until(
            agent_url,
            lambda s: (
                value(s, "damm_nats_connected") == 1
                and value(s, "damm_agent_reconcile_duration_seconds_count", kind="full") >= 1
            ),
            logs,
        )
        assert set(AGENT_SERIES) <= names(agent_seen)
        # The agent's registration was answered by one of the two replicas (a queue group).
        registered = {"route": "gateway.register", "code": "ok"}
        _scrape_until(
            up_url,
            lambda s: (
                value(s, "damm_requests_total", **registered)
                + value(_scrape(replica_url), "damm_requests_total", **registered)
                >= 1
            ),
            logs,
        )
        up_seen = _scrape(up_url)
        assert set(CONTROL_SERIES) <= names(up_seen)
        assert value(up_seen, "damm_projector_active", projector="readmodels") == 1
        replica_seen = _scrape_until(
            replica_url, lambda s: value(s, "damm_nats_connected") == 1, logs
        )
        assert value(replica_seen, "damm_leader") == 0  # `damm up`'s control plane leads
        assert "damm_projector_active" not in names(replica_seen)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for proc, name in zip(procs, ("up", "gateway", "control"), strict=False):
        assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text(errors="replace")
