"""Prometheus series of the control plane and the gateway agent, all defined here.

Every series is named ``damm_…`` and lives in a registry owned by one process object (a
``ControlPlane``, a ``GatewayAgent``), never in prometheus-client's global default registry:
tests run several processes' components in one interpreter, and a shared registry would mix
their numbers or refuse the second registration of a name.

Values that are already state elsewhere (leadership, connection, peers, pending reports, the
enrolled count) are read at scrape time through callbacks, so they cannot drift from the state
they describe. The endpoint serves from a thread: callbacks only read plain attributes.

This module sits at the lowest layer: it imports nothing from DAMM, so the event store, the
request router and the projectors can all record into it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# Request latency: NATS round trips are sub-millisecond, a JetStream append with fsync a few
# milliseconds, an enrollment batch tens; the deadline is seconds.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A reconcile is one UAPI or netlink round trip for a few peers, about a second for 10,000.
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _CountFrom(Collector):
    """A counter whose value is owned by someone else (a count derived from the event log)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.source: Callable[[], float] | None = None

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation)
        if self.source is not None:
            family.add_metric([], self.source())
        return [family]

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.documentation)]


class ControlMetrics:
    """The control plane's series. One instance per control-plane process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "damm_requests",
            "Requests answered, by route (command) and code ('ok' or the error code).",
            ["route", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "damm_request_duration_seconds",
            "Time from receiving a request to publishing its answer, by route.",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.events_appended = Counter(
            "damm_events_appended",
            "Events this process appended to the log (duplicates of a retry not counted), by type.",
            ["type"],
            registry=r,
        )
        self.projector_lag_events = Gauge(
            "damm_projector_lag_events",
            "Events in the stream not yet in the read models (0 on a standby projector).",
            ["projector"],
            registry=r,
        )
        self.projector_lag_seconds = Gauge(
            "damm_projector_lag_seconds",
            "While events wait, the age of the newest projected one (an upper bound on the age "
            "of the oldest waiting); 0 when caught up or standby.",
            ["projector"],
            registry=r,
        )
        self.projector_active = Gauge(
            "damm_projector_active",
            "1 where this process runs the projector (one process per projector holds its lock).",
            ["projector"],
            registry=r,
        )
        self.leader = Gauge(
            "damm_leader",
            "1 while this process is the leader (publishes peer sets, runs policy reactors).",
            registry=r,
        )
        self.nats_connected = Gauge(
            "damm_nats_connected", "1 while the NATS connection is up.", registry=r
        )
        self._enrollments = _CountFrom(
            "damm_enrollments",
            "Devices enrolled, as recorded in the event log (the fleet's count: every replica "
            "reports the same number).",
        )
        r.register(self._enrollments)

    def request(self, route: str, code: str, seconds: float) -> None:
        self.requests.labels(route, code).inc()
        self.request_seconds.labels(route).observe(seconds)

    def follow(
        self,
        *,
        leader: Callable[[], bool],
        nats_connected: Callable[[], bool],
        enrollments: Callable[[], int],
    ) -> None:
        """Read these values from their owners at scrape time."""
        self.leader.set_function(lambda: float(leader()))
        self.nats_connected.set_function(lambda: float(nats_connected()))
        self._enrollments.source = lambda: float(enrollments())

    def follow_projector(
        self, name: str, *, active: Callable[[], bool], lag: Callable[[], tuple[int, float]]
    ) -> None:
        """``lag`` gives (events waiting, seconds) for one projector, at scrape time."""
        self.projector_active.labels(name).set_function(lambda: float(active()))
        self.projector_lag_events.labels(name).set_function(lambda: float(lag()[0]))
        self.projector_lag_seconds.labels(name).set_function(lambda: lag()[1])


class AgentMetrics:
    """A gateway agent's series. One instance per agent."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.peers = Gauge(
            "damm_agent_peers", "Peers the agent keeps on its WireGuard interface.", registry=r
        )
        self.reconcile_seconds = Histogram(
            "damm_agent_reconcile_duration_seconds",
            "Time to bring the interface to the peer set: 'full' compares every peer (resync, "
            "drift repair), 'changes' only the peers a change touched.",
            ["kind"],
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.usage_reports_pending = Gauge(
            "damm_agent_usage_reports_pending",
            "Usage reports measured and kept on disk, not yet accepted by the control plane.",
            registry=r,
        )
        self.nats_connected = Gauge(
            "damm_nats_connected", "1 while the NATS connection is up.", registry=r
        )

    def follow(
        self,
        *,
        peers: Callable[[], int],
        usage_reports_pending: Callable[[], int],
        nats_connected: Callable[[], bool],
    ) -> None:
        """Read these values from their owners at scrape time."""
        self.peers.set_function(lambda: float(peers()))
        self.usage_reports_pending.set_function(lambda: float(usage_reports_pending()))
        self.nats_connected.set_function(lambda: float(nats_connected()))


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def series_names(registry: CollectorRegistry) -> Iterator[str]:
    """Every sample name a registry exports, whether or not a labelled series has values yet."""
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            yield family.name + suffix


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) to a bind address; ``ValueError`` if it is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclass
class MetricsServer:
    """The HTTP endpoint of one registry, serving ``/metrics`` (any path) from a thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.server.server_address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Start the endpoint; port 0 picks a free one. Raises ``OSError`` when it cannot bind."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
