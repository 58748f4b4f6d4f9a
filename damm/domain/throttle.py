"""Token buckets for requests nobody vouches for: one per connection, one per source address.

A guess at an enrollment token costs a request; without a limit one anonymous connection tried
about 6,000 a second. The decision is pure (buckets, key, now) so it is tested without a
server; the router keeps the buckets and asks before decoding anything.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: float


@dataclass
class Bucket:
    tokens: float
    at: float


class Buckets:
    """At most ``capacity`` buckets, the least recently used dropped first, so a flood of new
    sources cannot grow memory without bound (a dropped source starts again with a full burst,
    which only costs what one burst costs)."""

    def __init__(self, rate: Rate, capacity: int = 100_000) -> None:
        self.rate = rate
        self.capacity = capacity
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def take(self, key: str, now: float) -> bool:
        """Spend one token for ``key`` at time ``now`` (seconds, monotonic); False if empty."""
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = Bucket(self.rate.burst, now)
        bucket.tokens = min(
            self.rate.burst, bucket.tokens + max(0.0, now - bucket.at) * self.rate.per_second
        )
        bucket.at = now
        allowed = bucket.tokens >= 1.0
        if allowed:
            bucket.tokens -= 1.0
        self._buckets[key] = bucket
        if len(self._buckets) > self.capacity:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
