"""`--metrics-listen HOST:PORT`: the Prometheus endpoint of a long-running command.

Off unless asked for: an endpoint is one more open port on a gateway host, so the operator
chooses where it listens (loopback behind a scraper's tunnel, or a management address).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import click
from prometheus_client import CollectorRegistry

from damm.errors import Code, DammError
from damm.metrics import MetricsServer, parse_listen, serve

F = TypeVar("F", bound=Callable[..., Any])


def metrics_option(fn: F) -> F:
    return click.option(
        "--metrics-listen",
        "metrics_listen",
        envvar="DAMM_METRICS_LISTEN",
        default=None,
        metavar="HOST:PORT",
        help="Serve Prometheus metrics here (port 0 picks one; off by default).",
    )(fn)


@asynccontextmanager
async def metrics_endpoint(
    listen: str | None, registry: CollectorRegistry
) -> AsyncIterator[MetricsServer | None]:
    """Serve ``registry`` while the block runs, and say where on stderr; nothing if not asked."""
    if listen is None:
        yield None
        return
    try:
        host, port = parse_listen(listen)
        server = await asyncio.to_thread(serve, registry, host, port)
    except ValueError as exc:
        raise DammError(Code.INVALID_ARGUMENT, f"--metrics-listen: {exc}") from None
    except OSError as exc:
        raise DammError(
            Code.INVALID_ARGUMENT, f"--metrics-listen {listen}: {exc.strerror or exc}"
        ) from None
    click.echo(f"metrics: {server.url}", err=True)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.close)
