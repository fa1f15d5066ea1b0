"""Every bound of the wire format, in one place.

A reader checks a message's size against `LIMITS` before parsing it, and hands
`UNPACK_LIMITS` to msgpack so that no declared length can make it allocate more.
"""

from __future__ import annotations


KiB = 1024
MiB = 1024 * KiB

MAX_PAYLOAD = 1 << 40  # bytes: the largest encoded delta a DeltaAnnouncement may announce
MAX_MEMBERS = 1024  # peers in one round's proposal (and votes in one certificate)
MAX_ADDRS = 16  # multiaddrs in one PeerAnnouncement
MAX_ADDR_LEN = 256  # bytes of one multiaddr (ASCII)
MAX_MAP_ITEMS = 32  # entries of capabilities / merge params
MAX_METRICS = 16  # entries of a metrics map (a vote must stay small: certificates hold 1024)
MAX_KEY_LEN = 64  # UTF-8 bytes of a map key (capability, metric or parameter name)
MAX_TEXT = 256  # UTF-8 bytes of a free-text scalar (capability or parameter value)
MAX_NAME = 64  # bytes of a merge method name (ASCII)
MAX_LIBP2P_ID = 128  # bytes of a base58 libp2p peer id (ASCII)
MAX_RECORD = 4 * MiB  # bytes of one lineage version record
MAX_MANIFEST = 256 * KiB  # bytes of an event manifest (canonical JSON) a joiner fetches by its id
MAX_U63 = (1 << 63) - 1  # integers are non-negative and fit a signed 64-bit int

# Largest encoded message, in bytes, per type. A reader checks the size before parsing.
LIMITS: dict[str, int] = {
    "peer_announcement": 16 * KiB,
    "departure": 512,
    "delta_announcement": 1 * KiB,
    "proposal": 256 * KiB,
    "vote": 2 * KiB,
    "commit": 512,  # ids, round and signer count: the record and the certificate travel by stream
}
MAX_MESSAGE = max(LIMITS.values())
SIGNED_OVERHEAD = 128  # bytes a signed envelope adds around its payload (key, signature, framing)
MAX_SIGNED_VOTE = LIMITS["vote"] + SIGNED_OVERHEAD  # one entry of a quorum certificate
# A certificate blob (msgpack array of bin, fetched by the hash a Commit names): an array header
# of at most 5 bytes, then per vote a bin header of 3 bytes and the envelope.
MAX_CERTIFICATE = 5 + MAX_MEMBERS * (3 + MAX_SIGNED_VOTE)

# Parser bounds handed to msgpack, so that no declared length can make it allocate more.
UNPACK_LIMITS = dict(
    max_str_len=4 * KiB,
    max_array_len=4 * MAX_MEMBERS,
    max_map_len=4 * MAX_MAP_ITEMS,
    max_ext_len=0,
)
