"""What the wire messages guarantee (protocols/messages.py).

- Every message type round-trips through encode/decode, and its largest valid instance fits
  its size limit in `LIMITS`.
- The encoding is canonical: equal messages give equal bytes, so `message_hash` agrees.
- Forward compatibility: unknown body fields and newer minor versions are read; another
  major version, an unknown type or an unexpected type is refused with its own error.
- Building a message with a bad field is our bug (`InvalidMessage`, a LocalProtocolError);
  receiving one is the peer's fault (`SchemaError`, a RemoteProtocolError).
"""

from __future__ import annotations

import hashlib
import math

import msgpack
import pytest

from p2pmodel.errors import P2PModelError
from p2pmodel.protocols import messages as m
from p2pmodel.protocols.errors import (
    InvalidMessage,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
    SchemaError,
    UnexpectedMessage,
    UnknownMessageType,
    UnsupportedVersion,
)

KEY = bytes(range(32))
PEER = m.peer_id_of(KEY)
OTHER = "ab" * 20
H1, H2, H3 = (hashlib.sha256(bytes([i])).hexdigest() for i in range(3))


def examples() -> dict[str, m.Message]:
    """One ordinary instance of every message type."""
    return {
        "peer_announcement": m.PeerAnnouncement(
            PEER, KEY, "QmPeer", ("/ip4/127.0.0.1/tcp/4001",), {"device": "cpu", "gpus": 0}, H1, 3, 1.5
        ),
        "departure": m.Departure(PEER, 3, 2.0),
        "delta_announcement": m.DeltaAnnouncement(3, H1, PEER, H2, 1000, 64),
        "proposal": m.Proposal(3, H1, PEER, (OTHER, PEER), ((PEER, H2, 64.0),), 9.0, "linear", {"k": 1}),
        "vote": m.Vote(3, H1, H2, H3, PEER, {"eval_loss": 1.25}),
        "commit": m.Commit(3, "ab" * 32, H2, 1),
    }


def raw_envelope(type_name: str, body: dict, version=(1, 0), **extra) -> bytes:
    return msgpack.packb({"b": body, "t": type_name, "v": list(version), **extra}, use_bin_type=True)


def body_of(msg: m.Message) -> dict:
    return msgpack.unpackb(m.encode(msg), raw=False)["b"]


# --- round trips and limits --------------------------------------------------------------


def test_examples_cover_every_message_type():
    assert set(examples()) == set(m.MESSAGE_TYPES) == set(m.LIMITS)


@pytest.mark.parametrize("type_name", sorted(m.MESSAGE_TYPES))
def test_every_message_type_round_trips(type_name):
    msg = examples()[type_name]
    assert m.decode(m.encode(msg)) == msg


@pytest.mark.parametrize("type_name", sorted(m.MESSAGE_TYPES))
def test_decode_with_expected_type_returns_that_type(type_name):
    msg = examples()[type_name]
    assert type(m.decode(m.encode(msg), expected=type(msg))) is type(msg)


def _largest(type_name: str) -> m.Message:
    """The largest valid instance of a type: every string, map and array at its bound."""
    n = m.MAX_MEMBERS
    peers = tuple(f"{i:040x}" for i in range(n))
    hashes = tuple(f"{i:064x}" for i in range(n))
    big = 2.0**1000  # float64 always takes 9 bytes; the value does not matter
    key = lambda i, size=m.MAX_KEY_LEN: f"{i:02d}" + "é" * ((size - 2) // 2)  # noqa: E731  2-byte chars
    scalars = {key(i): "€" * (m.MAX_TEXT // 3) + "x" for i in range(m.MAX_MAP_ITEMS)}
    metrics = {key(i): big for i in range(m.MAX_METRICS)}
    vote = m.Vote(m.MAX_U63, H1, H2, H3, PEER, metrics)
    return {
        "peer_announcement": m.PeerAnnouncement(
            PEER, KEY, "z" * m.MAX_LIBP2P_ID, tuple("/" + "a" * (m.MAX_ADDR_LEN - 1) for _ in range(m.MAX_ADDRS)),
            scalars, H1, m.MAX_U63, big,
        ),
        "departure": m.Departure(PEER, m.MAX_U63, big),
        "delta_announcement": m.DeltaAnnouncement(m.MAX_U63, H1, PEER, H2, m.MAX_PAYLOAD, m.MAX_U63, m.MAX_U63),
        "proposal": m.Proposal(
            m.MAX_U63, H1, PEER, peers, tuple(zip(peers, hashes, [big] * n)), big, "m" * m.MAX_NAME, scalars
        ),
        "vote": vote,
        "commit": m.Commit(m.MAX_U63, H3, H2, m.MAX_MEMBERS),
    }[type_name]


@pytest.mark.parametrize("type_name", sorted(m.MESSAGE_TYPES))
def test_largest_valid_message_fits_its_limit(type_name):
    msg = _largest(type_name)
    assert len(m.encode(msg)) <= m.LIMITS[type_name]


def test_a_signed_vote_of_the_largest_size_fits_a_certificate_entry():
    from p2pmodel.protocols.signing import PeerIdentity, sign

    me = PeerIdentity.from_seed(KEY)
    vote = m.Vote(m.MAX_U63, H1, H2, H3, me.peer_id, dict(_largest("vote").metrics))
    assert len(sign(vote, me)) <= m.MAX_SIGNED_VOTE


# --- canonical encoding and hashes -------------------------------------------------------


def test_encoding_does_not_depend_on_dict_insertion_order():
    a = m.Vote(1, H1, H2, H3, PEER, {"a": 1.0, "b": 2.0})
    b = m.Vote(1, H1, H2, H3, PEER, {"b": 2.0, "a": 1.0})
    assert m.encode(a) == m.encode(b)


def test_integers_given_for_floats_encode_like_the_floats():
    assert m.encode(m.Departure(PEER, 1, 5)) == m.encode(m.Departure(PEER, 1, 5.0))


def test_message_hash_is_sha256_of_the_encoding():
    msg = examples()["proposal"]
    assert m.message_hash(msg) == hashlib.sha256(m.encode(msg)).hexdigest()


def test_message_hash_changes_when_a_field_changes():
    a = examples()["proposal"]
    b = m.Proposal(a.round, a.base_version, a.proposer, a.members, a.deltas, a.time, a.method, {"k": 2})
    assert m.message_hash(a) != m.message_hash(b)


def test_proposal_accepts_plain_tuples_and_reads_them_as_named_deltas():
    p = m.Proposal(1, H1, PEER, (PEER,), [(PEER, H2, 3)], 0.0, "linear", {})
    assert p.deltas == (m.ProposalDelta(PEER, H2, 3.0),) and isinstance(p.deltas[0].weight, float)


def test_a_message_does_not_share_the_callers_dict():
    metrics = {"eval_loss": 1.0}
    vote = m.Vote(1, H1, H2, H3, PEER, metrics)
    metrics["eval_loss"] = 99.0
    assert vote.metrics == {"eval_loss": 1.0}


# --- versions, types, sizes ---------------------------------------------------------------


def test_a_field_added_with_a_default_is_omitted_at_its_default_so_old_bytes_and_hashes_hold():
    """`carried` came after 1.0: an announcement without carried work encodes as before it
    existed, one with carried work says so, and more carried than samples is refused."""
    plain = m.DeltaAnnouncement(7, H1, PEER, H2, 1000, 4096)
    assert b"carried" not in m.encode(plain)
    carrying = m.DeltaAnnouncement(7, H1, PEER, H2, 1000, 4096, carried=1024)
    assert m.decode(m.encode(carrying)) == carrying and m.message_hash(carrying) != m.message_hash(plain)
    with pytest.raises(InvalidMessage, match="carried"):
        m.DeltaAnnouncement(7, H1, PEER, H2, 1000, 4096, carried=4097)


def test_unknown_body_fields_are_ignored():
    msg = examples()["vote"]
    assert m.decode(raw_envelope("vote", {**body_of(msg), "added_in_1_1": [1, "x"]})) == msg


def test_unknown_envelope_fields_are_ignored():
    msg = examples()["vote"]
    assert m.decode(raw_envelope("vote", body_of(msg), z=1)) == msg


def test_a_newer_minor_version_is_read():
    msg = examples()["vote"]
    assert m.decode(raw_envelope("vote", body_of(msg), version=(1, 7))) == msg


def test_another_major_version_is_refused_with_both_versions():
    with pytest.raises(UnsupportedVersion) as e:
        m.decode(raw_envelope("vote", body_of(examples()["vote"]), version=(2, 0)))
    assert (e.value.theirs, e.value.ours) == ((2, 0), m.PROTOCOL_VERSION)


def test_an_unknown_message_type_is_refused():
    with pytest.raises(UnknownMessageType):
        m.decode(raw_envelope("gossip", {}))


def test_a_message_of_another_type_than_expected_is_refused():
    with pytest.raises(UnexpectedMessage) as e:
        m.decode(m.encode(examples()["vote"]), expected=m.Proposal)
    assert (e.value.expected, e.value.got) == ("proposal", "vote")


def test_oversized_input_is_refused_before_parsing():
    with pytest.raises(MessageTooLarge) as e:
        m.decode(b"\xc1" * (m.LIMITS["vote"] + 1), expected=m.Vote)  # 0xc1 is never valid msgpack
    assert (e.value.kind, e.value.size, e.value.limit) == ("vote", m.LIMITS["vote"] + 1, m.LIMITS["vote"])


def test_a_message_over_its_own_types_limit_is_refused_even_when_not_expected():
    padded = raw_envelope("vote", {**body_of(examples()["vote"]), "pad": b"\0" * m.LIMITS["vote"]})
    with pytest.raises(MessageTooLarge) as e:
        m.decode(padded)
    assert e.value.kind == "vote"


def test_encoding_a_message_over_its_limit_is_a_local_error(monkeypatch):
    monkeypatch.setitem(m.LIMITS, "vote", 50)
    with pytest.raises(InvalidMessage):
        m.encode(examples()["vote"])


# --- malformed envelopes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"t": "vote", "b": {}}),  # no version
        msgpack.packb({"v": [1], "t": "vote", "b": {}}),
        msgpack.packb({"v": [1, 0], "t": 5, "b": {}}),
        msgpack.packb({"v": [1, 0], "t": "vote", "b": [1]}),
        msgpack.packb({1: 2}),  # integer map key
        msgpack.packb(msgpack.ExtType(5, b"xx")),
        b"\x80\x00",  # trailing bytes after an empty map
        b"\x91" * 5000,  # deep nesting
    ],
    ids=["empty", "reserved", "array", "no_v", "short_v", "int_t", "array_b", "int_key", "ext", "trailing", "deep"],
)
def test_malformed_envelopes_raise_remote_protocol_errors(data):
    with pytest.raises(RemoteProtocolError):
        m.decode(data)


def test_trailing_bytes_after_a_valid_message_are_refused():
    with pytest.raises(MalformedMessage):
        m.decode(m.encode(examples()["vote"]) + b"\x00")


def test_decoding_something_that_is_not_bytes_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        m.decode("not bytes")  # type: ignore[arg-type]


# --- schemas: local vs remote -------------------------------------------------------------

BAD_FIELDS = {
    "negative_round": ("vote", "round", -1),
    "bool_round": ("vote", "round", True),
    "round_over_u63": ("vote", "round", 1 << 63),
    "uppercase_hash": ("vote", "version_id", H3.upper()),
    "short_hash": ("vote", "version_id", H3[:-2]),
    "short_peer_id": ("vote", "voter", PEER[:-1]),
    "nan_metric": ("vote", "metrics", {"x": math.nan}),
    "inf_metric": ("vote", "metrics", {"x": math.inf}),
    "str_metric": ("vote", "metrics", {"x": "1.0"}),
    "too_many_metrics": ("vote", "metrics", {f"m{i}": 0.0 for i in range(m.MAX_METRICS + 1)}),
    "empty_metric_name": ("vote", "metrics", {"": 0.0}),
    "long_metric_name": ("vote", "metrics", {"x" * (m.MAX_KEY_LEN + 1): 0.0}),
    "negative_time": ("departure", "time", -1.0),
    "duplicate_members": ("proposal", "members", (PEER, PEER)),
    "no_members": ("proposal", "members", ()),
    "duplicate_delta_hashes": ("proposal", "deltas", ((PEER, H2, 1.0), (OTHER, H2, 1.0))),
    "negative_weight": ("proposal", "deltas", ((PEER, H2, -1.0),)),
    "short_delta_entry": ("proposal", "deltas", ((PEER, H2),)),
    "bad_method_name": ("proposal", "method", "Linear Merge"),
    "nested_param": ("proposal", "params", {"k": [1, 2]}),
    "long_param_text": ("proposal", "params", {"k": "x" * (m.MAX_TEXT + 1)}),
    "lone_surrogate": ("proposal", "params", {"k": "\ud800"}),
    "peer_id_not_of_key": ("peer_announcement", "peer_id", OTHER),
    "short_public_key": ("peer_announcement", "public_key", KEY[:31]),
    "public_key_as_str": ("peer_announcement", "public_key", "k" * 32),
    "addr_without_slash": ("peer_announcement", "addrs", ("ip4/1.2.3.4",)),
    "libp2p_id_not_base58": ("peer_announcement", "libp2p_id", "Qm0OIl"),
    "version_id_not_hex": ("commit", "version_id", "zz" * 32),
    "commit_without_signers": ("commit", "signers", 0),
    "commit_signers_over_members": ("commit", "signers", m.MAX_MEMBERS + 1),
}


def _with(type_name: str, field: str, value) -> dict:
    msg = examples()[type_name]
    return {**{k: getattr(msg, k) for k in m.schema_of(type(msg))}, field: value}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_building_a_message_with_a_bad_field_raises_invalid_message(case):
    type_name, field, value = BAD_FIELDS[case]
    with pytest.raises(InvalidMessage) as e:
        m.MESSAGE_TYPES[type_name](**_with(type_name, field, value))
    assert e.value.kind == type_name and e.value.field.startswith(field)


@pytest.mark.parametrize(
    "case", sorted(c for c in BAD_FIELDS if c not in ("round_over_u63", "lone_surrogate"))  # not packable
)
def test_receiving_a_message_with_a_bad_field_raises_schema_error(case):
    type_name, field, value = BAD_FIELDS[case]
    body = _with(type_name, field, value)
    with pytest.raises(SchemaError) as e:
        m.decode(raw_envelope(type_name, body))
    assert e.value.kind == type_name


def test_a_missing_field_is_a_schema_error_naming_it():
    body = body_of(examples()["vote"])
    del body["voter"]
    with pytest.raises(SchemaError) as e:
        m.decode(raw_envelope("vote", body))
    assert (e.value.field, e.value.reason) == ("voter", "missing")


def test_local_and_remote_errors_are_told_apart_by_class():
    assert issubclass(InvalidMessage, LocalProtocolError) and not issubclass(InvalidMessage, RemoteProtocolError)
    assert issubclass(SchemaError, RemoteProtocolError) and not issubclass(SchemaError, LocalProtocolError)
    assert issubclass(ProtocolError, P2PModelError)


def test_error_messages_are_one_line():
    with pytest.raises(SchemaError) as e:
        m.decode(raw_envelope("vote", {**body_of(examples()["vote"]), "round": -1}))
    assert "\n" not in str(e.value) and "vote.round" in str(e.value)


def test_expecting_something_that_is_not_a_message_class_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        m.decode(m.encode(examples()["vote"]), expected=m.Message)
