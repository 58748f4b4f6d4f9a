"""Property tests of the log's wire format: what is written is read back, and nothing a reader
might find in the log (garbage, future event types, future fields) breaks it."""

from __future__ import annotations

import contextlib
import json
import types
import typing
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from damm.events import codec
from damm.events import model as m

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
DATETIMES = st.datetimes(timezones=st.just(UTC))


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for one annotated field type, built from the model rather than listed by hand,
    so a field added later is covered without touching this file."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return st.one_of(*(strategy_for(arg) for arg in typing.get_args(tp)))
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin is tuple:
        item, _ = typing.get_args(tp)
        return st.lists(strategy_for(item), max_size=4).map(tuple)
    if tp is type(None):
        return st.none()
    if tp is str:
        return st.text(max_size=20)
    if tp is bytes:
        return st.binary(max_size=64)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return INT64
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if tp is datetime:
        return DATETIMES
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return struct_strategy(tp)
    raise TypeError(f"no strategy for {tp!r}")


def struct_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: strategy_for(hints[f.name]) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


EVENTS = st.one_of(*(struct_strategy(cls) for cls in m.EVENT_TYPES))


@st.composite
def envelopes(draw: st.DrawFn, events: st.SearchStrategy[Any] = EVENTS) -> m.Envelope:
    event = draw(events)
    return m.Envelope(
        id=draw(st.text(max_size=32)),
        type=m.event_type_name(event),
        schema=draw(st.integers(min_value=1, max_value=9)),
        aggregate=draw(st.text(max_size=40)),
        occurred_at=draw(DATETIMES),
        actor=m.Actor(
            draw(st.sampled_from(["admin", "device", "gateway", "policy"])),
            draw(st.text(max_size=16)),
        ),
        correlation_id=draw(st.text(max_size=32)),
        event=event,
    )


JSON = st.recursive(
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def test_every_event_type_has_a_strategy() -> None:
    assert len(m.EVENT_TYPES) >= 20
    for cls in m.EVENT_TYPES:
        struct_strategy(cls)


@pytest.mark.parametrize("cls", m.EVENT_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_each_event_type_round_trips(cls: type[msgspec.Struct], data: st.DataObject) -> None:
    env = data.draw(envelopes(struct_strategy(cls)))
    back = codec.decode(codec.encode(env))
    assert back == env
    assert type(back.event) is cls
    assert back.occurred_at.utcoffset() is not None


@given(envelopes(), st.integers(min_value=1, max_value=2**40))
def test_seq_is_filled_on_read_and_never_encoded(env: m.Envelope, seq: int) -> None:
    data = codec.encode(msgspec.structs.replace(env, seq=seq))
    assert codec.decode(data).seq == seq  # writers leave it 0; a stray value still decodes
    assert codec.decode(codec.encode(env), seq=seq) == msgspec.structs.replace(env, seq=seq)


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_codec_error(data: bytes) -> None:
    with contextlib.suppress(codec.CodecError):
        codec.decode(data)


@given(JSON)
def test_random_json_raises_only_codec_error(value: Any) -> None:
    with contextlib.suppress(codec.CodecError):
        codec.decode(json.dumps(value).encode())


@given(
    envelopes(),
    st.sampled_from(
        ["id", "type", "aggregate", "occurred_at", "actor", "event", "correlation_id", "schema"]
    ),
    JSON,
)
def test_damaged_envelopes_raise_only_codec_error(env: m.Envelope, key: str, value: Any) -> None:
    """Plausible corruption: one header field replaced by arbitrary JSON, or dropped."""
    doc = json.loads(codec.encode(env))
    for damaged in ({**doc, key: value}, {k: v for k, v in doc.items() if k != key}):
        with contextlib.suppress(codec.CodecError):
            codec.decode(json.dumps(damaged).encode())


@given(
    envelopes(),
    st.dictionaries(st.text(min_size=1, max_size=8).map(lambda k: "x_" + k), JSON, max_size=3),
)
def test_unknown_fields_are_ignored(env: m.Envelope, extra: dict[str, Any]) -> None:
    doc = json.loads(codec.encode(env))
    doc.update(extra)
    doc["event"] = {**doc["event"], **extra}
    assert codec.decode(json.dumps(doc).encode()) == env


@given(envelopes(), st.from_regex(r"[a-z]{1,10}\.[a-z_]{1,12}", fullmatch=True), JSON)
def test_unknown_event_type_decodes_to_unknown_event(env: m.Envelope, tag: str, body: Any) -> None:
    known = {cls.__struct_config__.tag for cls in m.EVENT_TYPES}
    if tag in known:
        return
    doc = json.loads(codec.encode(env))
    doc["type"] = tag
    doc["event"] = {"type": tag, "payload": body, "future_field": 1}
    back = codec.decode(json.dumps(doc).encode(), seq=9)
    assert back.event == m.UnknownEvent(original_type=tag)
    assert m.event_type_name(back.event) == tag
    assert (back.id, back.aggregate, back.actor, back.seq) == (env.id, env.aggregate, env.actor, 9)


def test_known_type_with_broken_event_is_an_error_not_unknown() -> None:
    """A known type that fails validation is corruption: skipping it silently would lose state."""
    doc = {
        "id": "e1",
        "type": "device.revoked",
        "aggregate": "device/d",
        "actor": {"kind": "admin", "id": "a"},
        "correlation_id": "c",
        "occurred_at": datetime(2025, 1, 1, tzinfo=UTC).isoformat(),
        "event": {"type": "device.revoked"},
    }
    with pytest.raises(codec.CodecError):
        codec.decode(json.dumps(doc).encode())
