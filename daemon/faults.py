"""Fault injection for multi-process tests: a transport that misbehaves, and peers that lie.

Selected with the hidden `join --fault NAME` flag (never set in normal use). Faults come from a
subclass plus an enum (STYLE.md §12), so the production `Transport` and `RoundRunner` carry no
test branches: a liar is a `RoundRunner` whose `_outgoing_delta` hook tampers with what it sends
(the delta before encoding, and the samples it announces), exactly what modified code could do.
"""

from __future__ import annotations

import asyncio
import enum
import struct

import msgpack
import torch
import zstandard

from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.rounds import RoundRunner
from p2pmodel.daemon.transport import Transport
from p2pmodel.errors import UsageError

__all__ = ["Fault", "Lie", "FaultyTransport", "LyingRoundRunner", "transport_class", "runner_class"]

logger = get_logger(__name__)


class Fault(enum.Enum):
    NONE = ""
    CUT_STREAMS = "cut_streams"  # the first stream serving each object is cut halfway through


class FaultyTransport(Transport):
    """A Transport whose object streams misbehave as `fault` says; `faults_injected` counts them."""

    fault: Fault = Fault.NONE
    faults_injected: int = 0
    _cut: set

    async def _send_range(self, writer: asyncio.StreamWriter, data: bytes, offset: int, kind: str) -> int:
        if self.fault is Fault.CUT_STREAMS and len(data) > 1024:
            cut = getattr(self, "_cut", None)
            if cut is None:
                cut = self._cut = set()
            key = hash(bytes(data[:64])) ^ len(data)
            if key not in cut:
                cut.add(key)
                half = offset + (len(data) - offset) // 2
                writer.write(memoryview(data)[offset:half])
                await writer.drain()
                writer.close()  # the reader sees EOF mid-object and must resume from `half`
                self.faults_injected += 1
                logger.info("fault: cut a stream", kind=kind, at=half, size=len(data))
                return half - offset
        return await super()._send_range(writer, data, offset, kind)


def transport_class(name: str) -> type[Transport]:
    """The transport class for a `--fault` value ("" for the real one).

    Raises:
        UsageError: unknown fault name.
    """
    if name in {lie.value for lie in Lie}:
        return Transport
    try:
        fault = Fault(name)
    except ValueError:
        known = [f.value for f in Fault if f.value] + [lie.value for lie in Lie]
        raise UsageError(f"unknown fault {name!r}; known: {known}") from None
    if fault is Fault.NONE:
        return Transport
    return type(f"Faulty{fault.name.title()}Transport", (FaultyTransport,), {"fault": fault})


class Lie(enum.Enum):
    """What a lying peer does to its delta (selected with `--fault lie_<name>`)."""

    NAN = "lie_nan"  # a NaN in its delta: the int8 block holding it decodes to NaN everywhere
    SCALE = "lie_scale"  # its delta times 100
    FLIP = "lie_flip"  # its delta times -10: slow poisoning, a little each round
    SAMPLES = "lie_samples"  # sign-flipped delta announced with 10^4 x the samples
    NOISE = "lie_noise"  # Gaussian noise of the delta's norm instead of a delta
    CYCLE = "lie_cycle"  # each delta tells the next of the lies above, in order (one swarm tries them all)


CYCLE = (Lie.NAN, Lie.SCALE, Lie.FLIP, Lie.SAMPLES, Lie.NOISE)


class LyingRoundRunner(RoundRunner):
    """A peer running modified code: it tampers with every delta it sends, as `lie` says."""

    lie: Lie

    def _outgoing_delta(self, delta: dict[str, torch.Tensor], samples: int) -> tuple[dict[str, torch.Tensor], int]:
        self.lies_told = getattr(self, "lies_told", 0) + 1
        lie = self.telling = CYCLE[(self.lies_told - 1) % len(CYCLE)] if self.lie is Lie.CYCLE else self.lie
        logger.info("fault: lying", lie=lie.value, round=self.machine.round if self.machine else None)
        if lie is Lie.NAN:
            return delta, samples  # the bytes are tampered with instead (the encoder refuses NaN)
        if lie is Lie.SCALE:
            return {k: v * 100 for k, v in delta.items()}, samples
        if lie is Lie.FLIP:
            return {k: v * -10 for k, v in delta.items()}, samples
        if lie is Lie.SAMPLES:
            return {k: -v for k, v in delta.items()}, samples * 10_000
        gen = torch.Generator().manual_seed(self.lies_told)
        return {k: torch.randn(v.shape, generator=gen) * (v.norm() / max(1, v.numel()) ** 0.5) for k, v in delta.items()}, samples


    def _outgoing_bytes(self, data: bytes) -> bytes:
        if getattr(self, "telling", self.lie) is not Lie.NAN:
            return data
        # Modified code can send any bytes: a NaN as the first float32 scale of the first
        # quantised tensor (payload layout: protocols/delta_format.py).
        payload = msgpack.unpackb(data, raw=False)
        for entry in payload["tensors"]:
            if entry["enc"] in ("int8", "lowbit", "topk"):
                i = 1 if entry["enc"] == "topk" else 0  # top-k: the index set comes first
                kind, raw_len, raw = entry["sections"][i]
                raw = bytearray(zstandard.ZstdDecompressor().decompress(raw, max_output_size=raw_len) if kind else raw)
                raw[0:4] = struct.pack("<f", float("nan"))
                entry["sections"][i] = [0, raw_len, bytes(raw)]
                break
        return msgpack.packb(payload, use_bin_type=True)


def runner_class(name: str) -> type[RoundRunner]:
    """The round runner class for a `--fault` value: a liar for `lie_*`, else the real one."""
    try:
        lie = Lie(name)
    except ValueError:
        return RoundRunner
    return type(f"Lying{lie.name.title()}RoundRunner", (LyingRoundRunner,), {"lie": lie})
