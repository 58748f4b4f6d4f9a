"""``gateway.peers``: the full peer set of the asking gateway, with its revision.

An agent takes this snapshot on start and after any gap in the changes it follows
(``publishers/peer_changes.py``). The revision is the stream sequence of the last event that changed
the set, so every control-plane process answers the same revision from the same log.
"""

from __future__ import annotations

from damm.control.context import Context
from damm.control.handlers.gateway import GatewayHandlers
from damm.control.publishers.peer_changes import entries
from damm.protocol import messages as p
from damm.protocol.router import Call, Route, route


class PeerSetHandlers:
    """``gateway.peers``: the full peer set of the asking gateway, with its revision."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.auth = GatewayHandlers(ctx)

    def routes(self) -> list[Route]:
        return [route("gateway.peers", p.PeerSnapshotRequest, self.snapshot)]

    async def snapshot(self, req: p.PeerSnapshotRequest, call: Call) -> p.PeerSnapshot:
        gw = await self.auth.authenticate(req.gateway_id, req.token)
        await self.ctx.follower.sync()  # a snapshot older than the agent's last change is useless
        state = self.ctx.state
        # No await between these two lines: the peers and the revision describe one state.
        peers = state.peer_entries(gw.gateway_id)
        revision = state.peer_revisions.get(gw.gateway_id, 0)
        nat = {key: address for key, _, address in peers if address is not None}
        wire = entries([(key, ips) for key, ips, _ in peers], nat)
        return p.PeerSnapshot(gw.gateway_id, revision, wire)
