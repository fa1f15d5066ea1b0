"""Fuzzing the decoders: no input makes them raise anything but ProtocolError, or hang.

- Any valid message (generated from the schemas in protocols/messages.py) round-trips, bare
  and signed.
- Random byte flips, truncations and insertions of valid encodings, arbitrary bytes, and
  arbitrary msgpack structures inside well-formed envelopes make `decode` and `open_signed`
  either return a valid message or raise a ProtocolError subclass; nothing else escapes.

Inputs are kept small (the size limits themselves are checked in test_messages.py), and the
example counts are sized so the whole file runs in a few seconds on one core.
"""

from __future__ import annotations

import typing

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pmodel.protocols import messages as m
from p2pmodel.protocols.errors import ProtocolError
from p2pmodel.protocols.signing import PeerIdentity, open_signed, sign

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDENTITY = PeerIdentity.from_seed(b"\x07" * 32)
SMALL = 8  # items per generated array or map, bytes per generated blob / 8


def strategy_for(check: m._Check) -> st.SearchStrategy:
    """A strategy producing values that pass `check` (small ones)."""
    if isinstance(check, m.UInt):
        return st.one_of(st.integers(check.min, min(check.max, 1 << 20)), st.just(check.max), st.just(check.min))
    if isinstance(check, m.Real):
        lo = check.min if check.min is not None else None
        return st.floats(min_value=lo, allow_nan=False, allow_infinity=False)
    if isinstance(check, m.Hex):
        return st.text("0123456789abcdef", min_size=2 * check.nbytes, max_size=2 * check.nbytes)
    if isinstance(check, m.Text):
        if check._re is not None:
            return st.from_regex(check._re, fullmatch=True).filter(lambda s: check.min_len <= len(s) <= check.max_len)
        return st.text(max_size=check.max_len // 4).filter(lambda s: len(s.encode("utf-8", "replace")) >= check.min_len)
    if isinstance(check, m.Blob):
        return st.binary(min_size=check.min_len, max_size=max(check.min_len, min(check.max_len, 8 * SMALL)))
    if isinstance(check, m.Scalar):
        finite = st.floats(allow_nan=False, allow_infinity=False)
        return st.one_of(st.booleans(), st.integers(0, 1 << 62), finite, st.text(max_size=20))
    if isinstance(check, m.Seq):
        return st.lists(strategy_for(check.item), min_size=check.min_items, max_size=SMALL, unique=check.unique)
    if isinstance(check, m.Record):
        return st.tuples(*(strategy_for(c) for c in check.items))
    if isinstance(check, m.Map):
        keys = st.text(min_size=1, max_size=16)
        return st.dictionaries(keys, strategy_for(check.value), max_size=min(SMALL, check.max_items))
    raise AssertionError(f"no strategy for {type(check).__name__}")


def _fix(cls: type[m.Message], kw: dict) -> dict:
    """Make cross-field rules hold for generated fields."""
    if cls is m.PeerAnnouncement:
        kw["peer_id"] = m.peer_id_of(kw["public_key"])
    if cls is m.Proposal:
        kw["deltas"] = list({d[1]: d for d in kw["deltas"]}.values())  # unique delta hashes
    if cls is m.DeltaAnnouncement:
        kw["carried"] = min(kw["carried"], kw["samples"])  # carried samples are some of its samples
    if cls.SENDER:
        kw[cls.SENDER] = IDENTITY.peer_id if cls is not m.PeerAnnouncement else kw[cls.SENDER]
    return kw


def messages_of(cls: type[m.Message]) -> st.SearchStrategy[m.Message]:
    fields = st.fixed_dictionaries({name: strategy_for(c) for name, c in m.schema_of(cls).items()})
    return fields.map(lambda kw: cls(**_fix(cls, kw)))


def signable(msg: m.Message) -> bool:
    return msg.SENDER is None or m.sender_of(msg) == IDENTITY.peer_id


ANY_MESSAGE = st.one_of(*(messages_of(cls) for cls in m.MESSAGE_TYPES.values()))


def _base_type(cls: type[m.Message], name: str) -> type:
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    base = typing.get_origin(hint.__origin__) or hint.__origin__  # Annotated[tuple[str, ...], ...] -> tuple
    return float if base is float else base


def assert_valid(msg: m.Message) -> None:
    """An accepted message has well-typed fields and re-encodes to itself."""
    for name in m.schema_of(type(msg)):
        assert isinstance(getattr(msg, name), _base_type(type(msg), name)), name
    assert m.decode(m.encode(msg)) == msg


def decodes_or_raises_protocol_error(data: bytes) -> None:
    """The property under test: a valid message, or a ProtocolError. Anything else fails."""
    try:
        assert_valid(m.decode(data))
    except ProtocolError:
        pass
    try:
        msg, _ = open_signed(data)
        assert_valid(msg)
    except ProtocolError:
        pass


@FUZZ
@given(ANY_MESSAGE)
def test_any_valid_message_round_trips(msg):
    assert m.decode(m.encode(msg), expected=type(msg)) == msg


@FUZZ
@given(ANY_MESSAGE.filter(signable))
def test_any_valid_message_round_trips_signed(msg):
    assert open_signed(sign(msg, IDENTITY)) == (msg, IDENTITY.peer_id)


@FUZZ
@given(ANY_MESSAGE, st.data())
def test_byte_mutations_of_valid_encodings_raise_only_protocol_errors(msg, data):
    raw = bytearray(m.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    decodes_or_raises_protocol_error(bytes(raw))


@FUZZ
@given(ANY_MESSAGE.filter(signable), st.data())
def test_byte_mutations_of_signed_envelopes_raise_only_protocol_errors(msg, data):
    raw = bytearray(sign(msg, IDENTITY))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    decodes_or_raises_protocol_error(bytes(raw))


@FUZZ
@given(ANY_MESSAGE, st.data())
def test_truncations_and_insertions_raise_only_protocol_errors(msg, data):
    raw = m.encode(msg)
    cut = data.draw(st.integers(0, len(raw)))
    decodes_or_raises_protocol_error(raw[:cut])
    decodes_or_raises_protocol_error(raw[:cut] + data.draw(st.binary(min_size=1, max_size=16)) + raw[cut:])


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_protocol_errors(raw):
    decodes_or_raises_protocol_error(raw)


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(st.sampled_from(sorted(m.MESSAGE_TYPES)), st.dictionaries(st.text(max_size=16), MSGPACK_VALUES, max_size=8))
def test_arbitrary_bodies_in_valid_envelopes_raise_only_protocol_errors(type_name, body):
    decodes_or_raises_protocol_error(msgpack.packb({"b": body, "t": type_name, "v": [1, 0]}, use_bin_type=True))


@FUZZ
@given(ANY_MESSAGE, st.data())
def test_valid_bodies_with_one_field_replaced_raise_only_protocol_errors(msg, data):
    body = msgpack.unpackb(m.encode(msg), raw=False)["b"]
    body[data.draw(st.sampled_from(sorted(body)))] = data.draw(MSGPACK_VALUES)
    decodes_or_raises_protocol_error(msgpack.packb({"b": body, "t": msg.TYPE, "v": [1, 0]}, use_bin_type=True))


@FUZZ
@given(MSGPACK_VALUES)
def test_arbitrary_msgpack_documents_raise_only_protocol_errors(doc):
    decodes_or_raises_protocol_error(msgpack.packb(doc, use_bin_type=True))
