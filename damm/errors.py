"""One catalog of every deliberate failure in DAMM.

Handlers, the agent and the CLI all speak these codes, so an operator can grep a code from a CLI
line to the handler that raised it. Nobody invents an error string at a call site: raise
``DammError(Code.X, detail)`` and the catalog supplies the stable code and the exit status.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# Enrollment (dmt_) and gateway (dmg_) token secrets: an operator who pastes one where an id
# belongs must not see it echoed into a terminal, a log or a CI transcript.
_SECRET = re.compile(r"\b(dm[tg]_)[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    return _SECRET.sub(r"\1…", text)


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    message: str
    retryable: bool = False
    exit_status: int = 1


class Code(enum.Enum):
    # request layer
    USAGE = ErrorSpec("the command line is not valid", exit_status=2)
    MALFORMED_REQUEST = ErrorSpec("the request could not be decoded", exit_status=2)
    REQUEST_TOO_LARGE = ErrorSpec("the request body is larger than the limit")
    REQUEST_TOO_DEEP = ErrorSpec("the request body nests deeper than the decoder allows")
    BAD_HEADER = ErrorSpec("a request header is too long or uses characters outside its alphabet")
    BAD_REPLY_SUBJECT = ErrorSpec("the reply subject is not an inbox; no answer was sent")
    REPLY_TOO_LARGE = ErrorSpec("the reply would be larger than the bus carries in one message")
    UNAVAILABLE = ErrorSpec("the control plane is unavailable", True, exit_status=3)
    INTERNAL = ErrorSpec("internal error in the control plane", True)
    DEADLINE_EXCEEDED = ErrorSpec(
        "the request's deadline passed before it was recorded; nothing was", True, exit_status=3
    )
    CONFLICT = ErrorSpec("a concurrent change won; retry the request", True)
    NOT_FOUND = ErrorSpec("no such object")
    AMBIGUOUS_ID = ErrorSpec("that id prefix matches more than one object")
    ALREADY_EXISTS = ErrorSpec("an object with that id already exists")
    INVALID_ARGUMENT = ErrorSpec("an argument is invalid", exit_status=2)
    UNAUTHORIZED = ErrorSpec("the credentials were not accepted")
    # identities and throttling on the bus
    IDENTITY_REFUSED = ErrorSpec("the connection's identity did not verify")
    NOT_YOUR_DEVICE = ErrorSpec("this connection's identity belongs to another device")
    RATE_LIMITED_CONNECTION = ErrorSpec("too many requests on this connection; slow down", True)
    RATE_LIMITED_SOURCE = ErrorSpec("too many requests from this address; slow down", True)
    TOO_MANY_CONNECTIONS = ErrorSpec("the server refused another unauthenticated connection", True)
    TOO_MANY_SUBSCRIPTIONS = ErrorSpec("the server refused another subscription", True)
    # enrollment tokens
    TOKEN_UNKNOWN = ErrorSpec("the enrollment token is unknown")
    TOKEN_EXPIRED = ErrorSpec("the enrollment token has expired")
    TOKEN_USED_UP = ErrorSpec("the enrollment token has no uses left")
    TOKEN_REVOKED = ErrorSpec("the enrollment token was revoked")
    # devices
    MALFORMED_KEY = ErrorSpec("the public key is not a valid WireGuard key")
    DEVICE_REVOKED = ErrorSpec("the device was revoked")
    DEVICE_SUSPENDED = ErrorSpec("the device is suspended")
    OVER_QUOTA = ErrorSpec("the device is over its byte limit")
    KEY_EXPIRED = ErrorSpec("the device key is past its lifetime; rotate it")
    KEY_REUSED = ErrorSpec("that public key belongs to a revoked or other device")
    SESSION_LIMIT = ErrorSpec("the tier's session limit is reached for this token")
    # placement and addresses
    OUT_OF_POLICY = ErrorSpec("the region or exit country is outside the tier")
    NO_HEALTHY_GATEWAY = ErrorSpec("no healthy gateway can take this device", True)
    NO_EGRESS = ErrorSpec("no egress pool serves that exit country", True)
    POOL_EXHAUSTED = ErrorSpec("the address pool is exhausted")
    EGRESS_IN_USE = ErrorSpec("devices still leave from an egress address the change would drop")
    # gateways
    GATEWAY_NOT_REGISTERED = ErrorSpec("the gateway has not registered")
    WG_BACKEND = ErrorSpec("the WireGuard interface refused or failed an operation", True)
    EGRESS_BACKEND = ErrorSpec("nftables refused or failed an egress NAT change", True)
    # catalogs and failover
    CATALOG_STALE = ErrorSpec("the catalog has expired")
    CATALOG_BAD_SIGNATURE = ErrorSpec("the catalog signature does not verify")
    CATALOG_UNKNOWN_KEY = ErrorSpec("the catalog is signed by an unknown key")
    CATALOG_ROLLBACK = ErrorSpec("the catalog is older than one already accepted")
    CATALOG_WRONG_REGION = ErrorSpec("the catalog is for another region")
    CATALOG_NO_GATEWAY = ErrorSpec("the device's gateway is missing from the catalog")
    NO_ALTERNATE_FRONT_DOOR = ErrorSpec("the gateway has no other active front door")
    # the log and the read models
    UNDECODABLE_EVENT = ErrorSpec("an event in the log cannot be decoded")
    REPLAY_FAILED = ErrorSpec("the log could not be replayed into the read models")
    EVENT_QUARANTINED = ErrorSpec(
        "an event could not be applied to the read models and was quarantined", exit_status=4
    )
    # keys sealed in the log
    KEK_MISSING = ErrorSpec(
        "no key-encryption key is configured: set DAMM_KEK or DAMM_KEK_FILE", exit_status=2
    )
    KEK_MISMATCH = ErrorSpec("the key-encryption key does not open the keys sealed in the log")
    NOT_LEADER = ErrorSpec(
        "this control-plane process no longer leads; a newer term took over", True
    )
    # local state
    STATE_MISSING = ErrorSpec("the device state directory is missing or incomplete")
    # orchestrator: topology, plans, providers and guardrail refusals
    TOPOLOGY_INVALID = ErrorSpec("the topology file is invalid")
    PLAN_STALE = ErrorSpec("the plan's inputs changed since it was made; plan again")
    PLAN_INVALID = ErrorSpec("the plan file is unreadable or not a plan")
    PROVIDER_FAILED = ErrorSpec("the provider failed an operation", True)
    LEASE_HELD = ErrorSpec("another orchestrator holds the lease", True)
    GUARDRAIL_REGION_CAP = ErrorSpec("guardrail: the region is at its maximum of gateways")
    GUARDRAIL_PROVIDER_CAP = ErrorSpec("guardrail: the provider is at its maximum of gateways")
    GUARDRAIL_PROVIDER_REGION = ErrorSpec("guardrail: the provider may not serve that region")
    GUARDRAIL_COST = ErrorSpec("guardrail: the change would exceed the monthly cost limit")
    GUARDRAIL_CHANGE_BUDGET = ErrorSpec("guardrail: the apply's budget of changes is spent")
    GUARDRAIL_COOLDOWN = ErrorSpec("guardrail: the region scaled too recently")
    GUARDRAIL_MIN_HEALTHY = ErrorSpec("guardrail: the region would fall below its healthy minimum")
    GUARDRAIL_LAST_GATEWAY = ErrorSpec("guardrail: that is the region's last gateway")
    GUARDRAIL_ACTIVE_DEVICES = ErrorSpec("guardrail: the gateway still carries active devices")

    @property
    def message(self) -> str:
        return self.value.message

    @property
    def retryable(self) -> bool:
        return self.value.retryable

    @property
    def exit_status(self) -> int:
        return self.value.exit_status

    @property
    def slug(self) -> str:
        return self.name.lower()


class DammError(Exception):
    """A deliberate failure: carries a catalog code plus a specific detail for this occurrence."""

    def __init__(self, code: Code, detail: str = "") -> None:
        self.code = code
        self.detail = redact(detail)
        super().__init__(self.line())

    def line(self) -> str:
        """The one line a CLI prints: stable code, the catalog message, then the specifics."""
        if self.detail:
            return f"{self.code.slug}: {self.code.message}: {self.detail}"
        return f"{self.code.slug}: {self.code.message}"

    @classmethod
    def from_slug(cls, slug: str, detail: str = "") -> DammError:
        try:
            code = Code[slug.upper()]
        except KeyError:
            code = Code.INTERNAL
            detail = f"{slug}: {detail}"
        return cls(code, detail)
