"""Bytes <-> envelopes. The only place that knows the wire format of the log."""

from __future__ import annotations

from datetime import datetime

import msgspec

from damm.errors import Code, DammError
from damm.events.model import EVENT_TYPES, Actor, Envelope, UnknownEvent


class CodecError(DammError):
    """The bytes are not an envelope this build can read."""

    def __init__(self, detail: str) -> None:
        super().__init__(Code.UNDECODABLE_EVENT, detail)


class _Header(msgspec.Struct, frozen=True, kw_only=True):
    """The envelope without its event: enough to carry an unknown event type through."""

    id: str
    type: str
    schema: int = 1
    aggregate: str
    occurred_at: datetime
    actor: Actor
    correlation_id: str


_encoder = msgspec.json.Encoder()
_header = msgspec.json.Decoder(_Header)
_full = msgspec.json.Decoder(Envelope)
_known_types = frozenset(t.__struct_config__.tag for t in EVENT_TYPES)
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode(data: bytes, seq: int = 0) -> Envelope:
    """Decode one stored message; unknown event types survive as ``UnknownEvent``."""
    try:
        try:
            env = _full.decode(data)
        except msgspec.ValidationError:
            head = _header.decode(data)
            if head.type in _known_types:
                raise
            env = Envelope(
                id=head.id,
                type=head.type,
                schema=head.schema,
                aggregate=head.aggregate,
                occurred_at=head.occurred_at,
                actor=head.actor,
                correlation_id=head.correlation_id,
                event=UnknownEvent(original_type=head.type),
            )
    except _DECODE_ERRORS as exc:
        raise CodecError(str(exc)) from exc
    if seq:
        env = msgspec.structs.replace(env, seq=seq)
    return env
