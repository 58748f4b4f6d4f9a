"""``gateway.peers``: the peer set of the asking gateway, in pages, with its revision.

An agent takes this snapshot on start and after any gap in the changes it follows
(``publishers/peer_changes.py``). The revision is the stream sequence of the last event that changed
the set, so every control-plane process answers the same revision from the same log.

A set of any size crosses the bus: peers go out in key order, in pages that each fit one bus
message, and the agent asks for the next page with the last key it got.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict

from damm.control.context import Context
from damm.control.handlers.gateway import GatewayHandlers
from damm.protocol import messages as p
from damm.protocol.router import Call, Route, route

# Room for the reply envelope around the entries: {"ok":true,"result":{"gateway_id":...}}.
ENVELOPE_BYTES = 1024
# A page never grows past this, however large the bus allows messages to be: a smaller page
# keeps one reply from holding the event loop for long.
MAX_PAGE_BYTES = 512 * 1024
# Sorted peer sets kept for the gateways that paged last, so a page costs no sort.
CACHED_SETS = 16

Entry = tuple[str, tuple[str, ...], str | None]


def entry_bytes(entry: Entry) -> int:
    """The exact JSON size of one ``PeerEntry`` plus its comma: keys and IPs need no escaping."""
    key, ips, egress = entry
    ip_bytes = sum(len(ip) + 3 for ip in ips) - (1 if ips else 0)  # quotes and commas
    return len(key) + ip_bytes + (len(egress) + 2 if egress else 4) + 9


class SortedSet:
    """One gateway's peer set at one revision, in key order, with running byte counts.

    Built once per revision, so each page is two binary searches and a slice.
    """

    def __init__(self, revision: int, entries: list[Entry]) -> None:
        self.revision = revision
        entries = sorted(entries)
        self.keys = [key for key, _, _ in entries]
        self.wire = [p.PeerEntry(key, ips, egress) for key, ips, egress in entries]
        self.ends = list(itertools.accumulate(map(entry_bytes, entries)))

    def page(self, after: str | None, budget: int) -> tuple[list[p.PeerEntry], str | None]:
        """Entries after ``after`` within ``budget`` bytes (at least one), and the next cursor."""
        start = 0 if after is None else bisect.bisect_right(self.keys, after)
        if start >= len(self.keys):
            return [], None
        used = self.ends[start - 1] if start else 0
        end = max(bisect.bisect_right(self.ends, used + budget), start + 1)
        if end >= len(self.keys):
            return self.wire[start:], None
        return self.wire[start:end], self.keys[end - 1]


def page(entries: list[Entry], after: str | None, budget: int) -> tuple[list[Entry], str | None]:
    """``SortedSet.page`` over plain entries (sorted by key): what the tests reason about."""
    chunk, next_after = SortedSet(0, entries).page(after, budget)
    return [(e.public_key, e.allowed_ips, e.egress) for e in chunk], next_after


class PeerSetHandlers:
    """``gateway.peers``: one page of the asking gateway's peer set, with its revision."""

    def __init__(self, ctx: Context, max_reply_bytes: int = MAX_PAGE_BYTES) -> None:
        self.ctx = ctx
        self.auth = GatewayHandlers(ctx)
        self.page_bytes = max(min(max_reply_bytes, MAX_PAGE_BYTES) - ENVELOPE_BYTES, 1)
        self._sets: OrderedDict[str, SortedSet] = OrderedDict()

    def routes(self) -> list[Route]:
        return [route("gateway.peers", p.PeerSnapshotRequest, self.snapshot)]

    async def snapshot(self, req: p.PeerSnapshotRequest, call: Call) -> p.PeerSnapshot:
        gw = await self.auth.authenticate(req.gateway_id, req.token)
        await self.ctx.follower.sync()  # a snapshot older than the agent's last change is useless
        # No await from here on: the peers and the revision describe one state.
        revision = self.ctx.state.peer_revisions.get(gw.gateway_id, 0)
        peers, next_after = self._set(gw.gateway_id, revision).page(req.after, self.page_bytes)
        return p.PeerSnapshot(gw.gateway_id, revision, tuple(peers), next_after)

    def _set(self, gateway_id: str, revision: int) -> SortedSet:
        cached = self._sets.get(gateway_id)
        if cached is None or cached.revision != revision:
            cached = SortedSet(revision, self.ctx.state.peer_entries(gateway_id))
            self._sets[gateway_id] = cached
        self._sets.move_to_end(gateway_id)
        while len(self._sets) > CACHED_SETS:
            self._sets.popitem(last=False)
        return cached
