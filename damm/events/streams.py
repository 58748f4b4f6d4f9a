"""Stream definitions, chosen on purpose.

The event stream keeps everything forever (history is the product), refuses deletes and purges,
dedupes retried requests for five minutes, and accepts atomic batches so a multi-aggregate
decision lands whole or not at all. Heartbeats are high-volume telemetry that only placement's
freshness check needs, so they live apart with an age limit; nothing a replay needs is there.
"""

from __future__ import annotations

from typing import Any

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from damm.subjects import (
    EVENT_PREFIX,
    EVENTS_STREAM,
    TELEMETRY_PREFIX,
    TELEMETRY_STREAM,
)

DUPLICATE_WINDOW_S = 300.0
MAX_EVENT_BYTES = 1024 * 1024
TELEMETRY_MAX_AGE_S = 24 * 3600.0


def events_stream(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        num_replicas=replicas,
        name=EVENTS_STREAM,
        description="DAMM event log: the source of truth",
        subjects=[f"{EVENT_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_msg_size=MAX_EVENT_BYTES,
        duplicate_window=DUPLICATE_WINDOW_S,
        deny_delete=True,
        deny_purge=True,
        allow_rollup_hdrs=False,
        allow_atomic=True,
        # Any replica answers a direct get: a follower whose consumer died with its node reads
        # the events it misses without waiting for a new consumer (damm.control.follower).
        allow_direct=True,
    )


def telemetry_stream(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        num_replicas=replicas,
        name=TELEMETRY_STREAM,
        description="DAMM gateway heartbeats (age-limited telemetry)",
        subjects=[f"{TELEMETRY_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=TELEMETRY_MAX_AGE_S,
        max_msgs_per_subject=1000,
        max_msg_size=64 * 1024,
        duplicate_window=60.0,
        deny_delete=True,
        deny_purge=True,
    )


async def ensure_streams(js: Any, replicas: int = 1) -> None:
    """Create the streams if missing; update them when this build's definition changed.

    ``replicas`` applies on creation and may raise an existing stream's count, never lower it:
    a replica started without the cluster setting must not shrink an R3 log to R1.
    """
    for config in (events_stream(replicas), telemetry_stream(replicas)):
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
        else:
            config.num_replicas = max(replicas, int(info.config.num_replicas or 1))
            await js.update_stream(config)
