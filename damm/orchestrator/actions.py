"""What a plan asks for: one frozen Struct per kind of change, each with its reason in words.

``reason`` is written for the operator reading the plan ("eu load 0.82 over target 0.60"), and
it travels into the step events, so the audit says why the fleet changed, not only that it did.
"""

from __future__ import annotations

from datetime import datetime

import msgspec


class _Action(msgspec.Struct, frozen=True, tag_field="kind", kw_only=True):
    region: str
    provider: str
    reason: str


class AddGateway(_Action, frozen=True, tag="add_gateway"):
    gateway_id: str
    front_doors: tuple[str, ...]


class ReplaceGateway(_Action, frozen=True, tag="replace_gateway"):
    """A new gateway first, then the dead one's host destroyed and the gateway disabled."""

    gateway_id: str  # the dead one
    new_gateway_id: str
    front_doors: tuple[str, ...]


class RetireGateway(_Action, frozen=True, tag="retire_gateway"):
    """Disabled first (placement stops using it), then its host destroyed."""

    gateway_id: str


class AddFrontDoor(_Action, frozen=True, tag="add_front_door"):
    gateway_id: str
    front_door_id: str


class DeactivateFrontDoor(_Action, frozen=True, tag="deactivate_front_door"):
    gateway_id: str
    front_door_id: str


class AddEgress(_Action, frozen=True, tag="add_egress"):
    pool_id: str
    country: str


Action = (
    AddGateway | ReplaceGateway | RetireGateway | AddFrontDoor | DeactivateFrontDoor | AddEgress
)


def kind_of(action: Action) -> str:
    tag = type(action).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def target_of(action: Action) -> str:
    """The object a step changes, as the step events name it."""
    match action:
        case AddEgress():
            return action.pool_id
        case ReplaceGateway():
            return f"{action.gateway_id}->{action.new_gateway_id}"
        case AddFrontDoor() | DeactivateFrontDoor():
            return f"{action.gateway_id}/{action.front_door_id}"
        case _:
            return action.gateway_id


def touched_ids(action: Action) -> set[str]:
    match action:
        case AddEgress():
            return {action.pool_id}
        case ReplaceGateway():
            return {action.gateway_id, action.new_gateway_id}
        case _:
            return {action.gateway_id}


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """An action the planner wanted and a guardrail refused: listed, never silently dropped."""

    code: str  # an error-catalog slug, guardrail_*
    detail: str
    action: Action


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    plan_id: str
    created_at: datetime
    topology_digest: str
    fleet_digest: str  # of the fleet without the plan's own targets; see fleet.fingerprint
    actions: tuple[Action, ...] = ()
    refusals: tuple[Refusal, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.actions and not self.refusals

    def targets(self) -> frozenset[str]:
        out: set[str] = set()
        for action in (*self.actions, *(r.action for r in self.refusals)):
            out |= touched_ids(action)
        return frozenset(out)
