"""The test vectors in protocols/vectors/ hold, so another implementation can check itself.

- For every example: building the message from its JSON fields and encoding it gives exactly
  `encoded_hex`; decoding those bytes gives the fields back; `message_hash` matches; signing
  with the file's fixed key gives exactly `signed_hex`, which opens to the message and key.
- Every case in decoding.json decodes to its fields or fails with its named error.
- certificate.json: the commit certificate blob built from its votes is exactly its bytes, hashes
  to the id its commit names, and opens back to those votes.
- object_stream.json: every request and response header encodes to its bytes and decodes to its
  fields (and says whether the stream stays open); the whole exchange is a request and the bytes
  from its offset, of a blob that hashes to its oid; bad requests and responses are refused.
- record_frame.json: each frame encodes from its envelopes (a compressed one inflates to the same
  records: deflate's bytes may differ between zlib builds) and decodes back to them, each a signed
  record that opens; every malformed frame fails with its FrameError reason.
- Every message type has a vector file, and the files match what scripts/gen_vectors writes.
- SPEC.md names every message type, every field and every size limit.
- SPEC.md names every stream status, frame error reason, magic and protocol id.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from p2pmodel.protocols import errors
from p2pmodel.protocols import messages as m
from p2pmodel.protocols import record_frame as rf
from p2pmodel.protocols import stream
from p2pmodel.protocols.signing import PeerIdentity, open_signed, sign

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "protocols" / "vectors"


def from_json(v):
    """Inverse of scripts/gen_vectors' to_json: {"hex": ...} -> bytes, lists -> tuples."""
    if isinstance(v, dict):
        if set(v) == {"hex"}:
            return bytes.fromhex(v["hex"])
        return {k: from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return tuple(from_json(x) for x in v)
    return v


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def build(type_name: str, fields: dict) -> m.Message:
    return m.MESSAGE_TYPES[type_name](**{k: from_json(v) for k, v in fields.items()})


VECTOR_CASES = [
    pytest.param(t, i, id=f"{t}-{v['name']}")
    for t in sorted(m.MESSAGE_TYPES)
    if (VECTORS / f"{t}.json").exists()
    for i, v in enumerate(load(f"{t}.json")["vectors"])
]
DECODING_CASES = [pytest.param(c, id=c["name"]) for c in load("decoding.json")["cases"]]


def test_every_message_type_has_vectors():
    assert {p.values[0] for p in VECTOR_CASES} == set(m.MESSAGE_TYPES)


@pytest.mark.parametrize("type_name,index", VECTOR_CASES)
def test_encoding_the_fields_gives_the_vector_bytes(type_name, index):
    v = load(f"{type_name}.json")["vectors"][index]
    assert m.encode(build(type_name, v["fields"])).hex() == v["encoded_hex"]


@pytest.mark.parametrize("type_name,index", VECTOR_CASES)
def test_decoding_the_vector_bytes_gives_the_fields(type_name, index):
    v = load(f"{type_name}.json")["vectors"][index]
    assert m.decode(bytes.fromhex(v["encoded_hex"])) == build(type_name, v["fields"])


@pytest.mark.parametrize("type_name,index", VECTOR_CASES)
def test_the_message_hash_matches_the_vector(type_name, index):
    v = load(f"{type_name}.json")["vectors"][index]
    assert m.message_hash(build(type_name, v["fields"])) == v["message_hash"]


@pytest.mark.parametrize("type_name,index", VECTOR_CASES)
def test_signing_with_the_fixed_key_gives_the_vector_envelope(type_name, index):
    doc = load(f"{type_name}.json")
    key = PeerIdentity.from_seed(bytes.fromhex(doc["key"]["seed_hex"]))
    assert (key.public_key.hex(), key.peer_id) == (doc["key"]["public_key_hex"], doc["key"]["peer_id"])
    v = doc["vectors"][index]
    assert sign(build(type_name, v["fields"]), key).hex() == v["signed_hex"]


@pytest.mark.parametrize("type_name,index", VECTOR_CASES)
def test_the_vector_envelope_verifies_as_the_fixed_key(type_name, index):
    doc = load(f"{type_name}.json")
    v = doc["vectors"][index]
    assert open_signed(bytes.fromhex(v["signed_hex"])) == (build(type_name, v["fields"]), doc["key"]["peer_id"])


@pytest.mark.parametrize("case", DECODING_CASES)
def test_decoding_cases_give_their_expected_outcome(case):
    data = bytes.fromhex(case["hex"])
    read = open_signed if case["signed"] else m.decode
    if "error" in case:
        with pytest.raises(getattr(errors, case["error"])) as e:
            read(data)
        assert type(e.value).__name__ == case["error"]
    else:
        result = read(data)
        msg = result[0] if case["signed"] else result
        assert msg == build(case["type"], case["fields"])
        if case["signed"]:
            assert result[1] == case["signer"]


def test_the_certificate_vector_is_the_blob_its_commit_names():
    from p2pmodel.protocols.certificate import certificate_limit, certify, encode_certificate

    doc = load("certificate.json")
    votes = [bytes.fromhex(v) for v in doc["votes_hex"]]
    blob = bytes.fromhex(doc["blob_hex"])
    commit = build("commit", doc["commit"])
    assert encode_certificate(reversed(votes)) == blob and len(blob) <= doc["max_blob_bytes"] == certificate_limit(2)
    assert (commit.certificate_id, commit.signers) == (doc["certificate_id"], doc["signers"])
    assert certify(commit, blob).certificate == tuple(votes)


# --- the object stream ----------------------------------------------------------------------

OBJECT = load("object_stream.json")
RECORDS = load("record_frame.json")


def test_the_object_stream_constants_match_the_vector():
    assert (OBJECT["protocol"], OBJECT["magic_hex"]) == (stream.OBJECT_PROTOCOL, stream.MAGIC.hex())
    assert (OBJECT["request_size"], OBJECT["response_size"]) == (stream.REQUEST_SIZE, stream.RESPONSE_SIZE)
    assert OBJECT["statuses"] == {s.name: int(s) for s in stream.ObjectStatus}


@pytest.mark.parametrize("v", OBJECT["requests"], ids=lambda v: v["name"])
def test_an_object_request_encodes_to_its_bytes_and_decodes_to_its_fields(v):
    oid = bytes.fromhex(v["oid"])
    assert stream.encode_request(oid, v["offset"]).hex() == v["hex"]
    assert stream.decode_request(bytes.fromhex(v["hex"])) == (oid, v["offset"])


@pytest.mark.parametrize("v", OBJECT["responses"], ids=lambda v: v["name"])
def test_an_object_response_header_encodes_to_its_bytes_and_decodes_to_its_fields(v):
    status = stream.ObjectStatus[v["status"]]
    assert stream.encode_response(status, v["total"]).hex() == v["hex"]
    assert stream.decode_response(bytes.fromhex(v["hex"])) == (status, v["total"])
    assert stream.keeps_stream_open(status) is v["keeps_stream_open"]


def test_the_object_exchange_is_a_request_and_the_blob_from_its_offset():
    x = OBJECT["exchange"]
    blob, oid = bytes.fromhex(x["blob_hex"]), bytes.fromhex(x["oid"])
    assert hashlib.sha256(blob).digest() == oid
    assert stream.decode_request(bytes.fromhex(x["request_hex"])) == (oid, x["offset"])
    response = bytes.fromhex(x["response_hex"])
    header, body = response[: stream.RESPONSE_SIZE], response[stream.RESPONSE_SIZE :]
    assert stream.decode_response(header) == (stream.ObjectStatus.OK, len(blob))
    assert body == blob[x["offset"] :]


@pytest.mark.parametrize(
    "read, v",
    [(stream.decode_request, v) for v in OBJECT["bad_requests"]]
    + [(stream.decode_response, v) for v in OBJECT["bad_responses"]],
    ids=lambda x: x["name"] if isinstance(x, dict) else x.__name__,
)
def test_bad_object_stream_bytes_are_refused_with_their_error(read, v):
    with pytest.raises(getattr(stream, v["error"])):
        read(bytes.fromhex(v["hex"]))


# --- the record push stream ---------------------------------------------------------------


def test_the_record_frame_constants_match_the_vector():
    assert (RECORDS["protocol"], RECORDS["magic_hex"]) == (rf.RECORD_PROTOCOL, rf.MAGIC.hex())
    assert RECORDS["compressed_flag"] == rf.COMPRESSED
    assert RECORDS["statuses"] == {s.name: int(s) for s in rf.PushStatus}


def _section(frame: bytes) -> bytes:
    """The uncompressed records of a frame (what a compressed one inflates to)."""
    body = frame[rf.HEADER_SIZE :]
    return zlib.decompress(body[rf.LENGTH_SIZE :]) if frame[8] & rf.COMPRESSED else body


@pytest.mark.parametrize("v", RECORDS["frames"], ids=lambda v: v["name"])
def test_a_record_frame_encodes_from_its_envelopes(v):
    envelopes = [bytes.fromhex(e) for e in v["envelopes_hex"]]
    got, want = rf.encode_frame(envelopes, compress=v["compress"]), bytes.fromhex(v["hex"])
    assert got[: rf.HEADER_SIZE] == want[: rf.HEADER_SIZE] and got[8] == v["flags"]
    assert _section(got) == _section(want)
    if not v["flags"] & rf.COMPRESSED:
        assert got == want


@pytest.mark.parametrize("v", RECORDS["frames"], ids=lambda v: v["name"])
def test_a_record_frame_decodes_to_signed_records(v):
    envelopes = rf.decode_frame(bytes.fromhex(v["hex"]), **RECORDS["node_bounds"])
    assert [e.hex() for e in envelopes] == v["envelopes_hex"]
    assert all(open_signed(e) for e in envelopes)


@pytest.mark.parametrize("v", RECORDS["malformed"], ids=lambda v: v["name"])
def test_a_malformed_record_frame_fails_with_its_reason(v):
    with pytest.raises(rf.FrameError) as e:
        rf.decode_frame(bytes.fromhex(v["hex"]), **RECORDS["malformed_bounds"])
    assert e.value.reason == v["reason"]


def test_the_vector_files_are_what_the_generator_writes():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_vectors"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_the_spec_names_every_message_type_field_and_limit():
    spec = (ROOT / "protocols" / "SPEC.md").read_text()
    missing = [t for t in m.MESSAGE_TYPES if f"`{t}`" not in spec]
    missing += [f"{t}.{f}" for t, cls in m.MESSAGE_TYPES.items() for f in m.schema_of(cls) if f"`{f}`" not in spec]
    missing += [f"LIMITS[{t}]={n}" for t, n in m.LIMITS.items() if str(n) not in spec]
    assert missing == []


def test_the_spec_names_every_stream_status_and_frame_error_reason():
    spec = (ROOT / "protocols" / "SPEC.md").read_text()
    names = [s.name for s in stream.ObjectStatus] + [s.name for s in rf.PushStatus]
    names += sorted({v["reason"] for v in RECORDS["malformed"]})
    names += [stream.MAGIC.decode(), rf.MAGIC.decode(), stream.OBJECT_PROTOCOL, rf.RECORD_PROTOCOL]
    assert [n for n in names if n not in spec] == []
