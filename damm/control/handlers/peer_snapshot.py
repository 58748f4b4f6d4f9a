"""``gateway.peers``: the peer set of the asking gateway, in pages, with its revision.

An agent takes this snapshot on start and after any gap in the changes it follows
(``publishers/peer_changes.py``). The revision is the stream sequence of the last event that changed
the set, so every control-plane process answers the same revision from the same log.

A set of any size crosses the bus: peers go out in key order, in pages that each fit one bus
message, and the agent asks for the next page with the last key it got.
"""

from __future__ import annotations

import bisect
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


def page(entries: list[Entry], after: str | None, budget: int) -> tuple[list[Entry], str | None]:
    """The entries after ``after`` (sorted by key) that fit ``budget`` bytes, and the next cursor.

    A page holds at least one entry, so paging always moves forward.
    """
    start = 0 if after is None else bisect.bisect_right(entries, (after,))
    while start < len(entries) and after is not None and entries[start][0] <= after:
        start += 1
    out: list[Entry] = []
    used = 0
    for entry in entries[start:]:
        size = entry_bytes(entry)
        if out and used + size > budget:
            return out, out[-1][0]
        out.append(entry)
        used += size
    return out, None


class PeerSetHandlers:
    """``gateway.peers``: one page of the asking gateway's peer set, with its revision."""

    def __init__(self, ctx: Context, max_reply_bytes: int = MAX_PAGE_BYTES) -> None:
        self.ctx = ctx
        self.auth = GatewayHandlers(ctx)
        self.page_bytes = max(min(max_reply_bytes, MAX_PAGE_BYTES) - ENVELOPE_BYTES, 1)
        self._sorted: OrderedDict[str, tuple[int, list[Entry]]] = OrderedDict()

    def routes(self) -> list[Route]:
        return [route("gateway.peers", p.PeerSnapshotRequest, self.snapshot)]

    async def snapshot(self, req: p.PeerSnapshotRequest, call: Call) -> p.PeerSnapshot:
        gw = await self.auth.authenticate(req.gateway_id, req.token)
        await self.ctx.follower.sync()  # a snapshot older than the agent's last change is useless
        # No await from here on: the peers and the revision describe one state.
        revision = self.ctx.state.peer_revisions.get(gw.gateway_id, 0)
        peers, next_after = page(self._entries(gw.gateway_id, revision), req.after, self.page_bytes)
        wire = tuple(p.PeerEntry(key, ips, egress) for key, ips, egress in peers)
        return p.PeerSnapshot(gw.gateway_id, revision, wire, next_after)

    def _entries(self, gateway_id: str, revision: int) -> list[Entry]:
        cached = self._sorted.get(gateway_id)
        if cached is not None and cached[0] == revision:
            self._sorted.move_to_end(gateway_id)
            return cached[1]
        entries = sorted(self.ctx.state.peer_entries(gateway_id))
        self._sorted[gateway_id] = (revision, entries)
        self._sorted.move_to_end(gateway_id)
        while len(self._sorted) > CACHED_SETS:
            self._sorted.popitem(last=False)
        return entries
