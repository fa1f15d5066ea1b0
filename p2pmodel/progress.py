"""A one-line progress display for long operations (commit, export, diff, verify).

It writes to stderr, and only when stderr is a terminal: piped or captured output (scripts,
tests, `--json` consumers) never sees it. The line is redrawn at most every `min_interval`
seconds and erased on close, so what remains on screen is the command's real output. A long
job whose log matters off a terminal (a merge of a large model) asks for `log_every`: a plain
line every so many seconds, and one at the end.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_bytes"]


def format_bytes(n: float) -> str:
    """`1536` -> `"1.5 KiB"`; binary units, as `du -h` and `git` print them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """`with Progress(total, "export") as p: p.update(nbytes, name)`. A no-op off a terminal.

    Args:
        total: the amount of work (bytes if `unit == "B"`, else items); None if unknown.
        desc: a short label printed first.
        unit: "B" to format amounts as bytes, anything else to print counts with that unit.
        stream: where to draw (default stderr); drawing happens only if it is a TTY.
        min_interval: seconds between redraws.
        log_every: off a terminal, write a line every this many seconds and when done reaches
            total (None: write nothing off a terminal).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "B", *, stream: TextIO | None = None,
                 min_interval: float = 0.1, log_every: float | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self.done = 0
        self._last = 0.0
        self._start = time.monotonic()
        self._drawn = False
        self._log_every, self._logged = log_every, -math.inf
        try:
            self.enabled = bool(self.stream.isatty())
        except (AttributeError, ValueError):  # closed or odd streams
            self.enabled = False

    def update(self, amount: int = 1, item: str = "") -> None:
        """Record `amount` more work done; `item` names what was just done."""
        self.done += amount
        if not self.enabled:
            self._log(item)
            return
        now = time.monotonic()
        if now - self._last < self.min_interval and (self.total is None or self.done < self.total):
            return
        self._last = now
        self._draw(item)

    def at(self, done: int, total: int | None, item: str = "") -> None:
        """Record progress given as counts (`done` of `total`), as callbacks report it."""
        self.total = total
        self.update(done - self.done, item)

    def _log(self, item: str) -> None:
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if self._log_every is None or (now - self._logged < self._log_every and not finished):
            return
        self._logged = now
        total = f"/{self._amount(self.total)}" if self.total else ""
        self.stream.write(f"{self.desc} {self._amount(self.done)}{total} {item}".rstrip() + "\n")
        self.stream.flush()

    def _amount(self, n: float) -> str:
        return format_bytes(n) if self.unit == "B" else f"{n:.0f} {self.unit}"

    def _draw(self, item: str) -> None:
        parts = [self.desc]
        if self.total:
            parts.append(f"{100 * self.done / self.total:3.0f}%")
            parts.append(f"{self._amount(self.done)} / {self._amount(self.total)}")
        else:
            parts.append(self._amount(self.done))
        elapsed = time.monotonic() - self._start
        if self.unit == "B" and elapsed > 0.5:
            parts.append(f"{format_bytes(self.done / elapsed)}/s")
        if item:
            parts.append(item)
        width = shutil.get_terminal_size((80, 20)).columns - 1
        line = "  ".join(parts)[:width]
        self.stream.write("\r" + line.ljust(width))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the line, if one was drawn."""
        if self.enabled and self._drawn:
            width = shutil.get_terminal_size((80, 20)).columns - 1
            self.stream.write("\r" + " " * width + "\r")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
