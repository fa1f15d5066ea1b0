"""The test vectors in protocols/vectors/ hold, so another implementation can check itself.

- For every example: building the message from its JSON fields and encoding it gives exactly
  `encoded_hex`; decoding those bytes gives the fields back; `message_hash` matches; signing
  with the file's fixed key gives exactly `signed_hex`, which opens to the message and key.
- Every case in decoding.json decodes to its fields or fails with its named error.
- certificate.json: the commit certificate blob built from its votes is exactly its bytes, hashes
  to the id its commit names, and opens back to those votes.
- Every message type has a vector file, and the files match what scripts/gen_vectors writes.
- SPEC.md names every message type, every field and every size limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pmodel.protocols import errors
from p2pmodel.protocols import messages as m
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
