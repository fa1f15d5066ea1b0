"""Fault injection for multi-process tests: a transport that misbehaves on purpose.

Selected with the hidden `join --fault NAME` flag (never set in normal use). Faults come from a
subclass plus an enum (STYLE.md §12), so the production `Transport` carries no test branches.
"""

from __future__ import annotations

import asyncio
import enum

from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.transport import Transport
from p2pmodel.errors import UsageError

__all__ = ["Fault", "FaultyTransport", "transport_class"]

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
    try:
        fault = Fault(name)
    except ValueError:
        raise UsageError(f"unknown fault {name!r}; known: {[f.value for f in Fault if f.value]}") from None
    if fault is Fault.NONE:
        return Transport
    return type(f"Faulty{fault.name.title()}Transport", (FaultyTransport,), {"fault": fault})
