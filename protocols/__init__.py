"""p2pmodel.protocols: everything that travels between peers, as pure code (no I/O, no clocks).

Map (source folder `protocols/`, installed as `p2pmodel.protocols`):

- `errors.py`       — `ProtocolError`; `LocalProtocolError` (our bug) vs `RemoteProtocolError`
                      (the peer misbehaved: drop the record, count it, keep running).
- `messages.py`     — every signed record (DHT and push) as a frozen dataclass; msgpack envelope
                      with a protocol version (`schema.py`: the field checks; `limits.py`: every
                      size bound).
- `signing.py`      — Ed25519 peer identities and signed envelopes (`sign`, `open_signed`).
- `certificate.py`  — the commit rule, written once, and the certificate blob a `Commit` names by
                      hash (`encode_certificate`, `certify`, `may_commit`, `vouches`).
- `stream.py`       — the object stream's framing: blobs fetched by sha256 from any offset
                      (`encode_request`, `decode_response`, `ObjectStatus`).
- `record_frame.py` — the record push stream's frames: batches of signed records, optionally
                      deflated (`encode_frame`, `decode_frame`, `FrameError`, `PushStatus`).
- `codec.py`        — `DeltaCodec` and `ErrorFeedback`: compressed parameter deltas
  (`quant.py`, `sparse.py`, `delta_format.py`, `codec_errors.py` hold its parts).
- `round.py`        — `RoundMachine`: the round's state machine; events in, actions out
                      (`round_io.py`: those events and actions, as plain data; `round_view.py`:
                      what it has seen of a round, vote tallies included).
- `sim.py`          — a virtual-clock network simulator that drives many `RoundMachine`s.
- `SPEC.md`, `vectors/` — the written wire specification and its test vectors.

The core (`p2pmodel.lineage`, `p2pmodel.merge`) never imports this package; the daemon does.
"""

from p2pmodel.protocols.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from p2pmodel.protocols.messages import LIMITS, PROTOCOL_VERSION, decode, encode, message_hash
from p2pmodel.protocols.signing import PeerIdentity, open_signed, sign

__all__ = [
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "LIMITS",
    "PROTOCOL_VERSION",
    "encode",
    "decode",
    "message_hash",
    "PeerIdentity",
    "sign",
    "open_signed",
]
