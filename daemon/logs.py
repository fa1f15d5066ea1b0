"""Structured, one-line logs for the daemon, and a progress line when stderr is a terminal.

Every event is one line: `time level logger: message key=value key=value`. Fields are passed as
keyword arguments (`log.info("round committed", round=3, version=vid[:12])`), so lines stay
greppable and machine-splittable. Values containing spaces are quoted.

On a TTY, `StatusLine` keeps one status line at the bottom of the terminal (round, phase, training
progress); log lines are printed above it. One writer per stream (`_Line`) draws both, so a log
line never lands in the middle of the progress text. When stderr is not a terminal the
progress line is off and nothing but log lines is written.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["get_logger", "configure_logging", "StatusLine", "StructuredLogger"]

_ROOT = "p2pmodel"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    if not text or any(c in text for c in ' "='):
        text = '"' + text.replace('"', '\\"') + '"'
    return text


class StructuredLogger(logging.LoggerAdapter):
    """A logger whose methods take `message, **fields` and render them as key=value pairs."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        fields = {k: v for k, v in kwargs.items() if k not in ("exc_info", "stack_info", "stacklevel", "extra")}
        for k in fields:
            kwargs.pop(k)
        if fields:
            msg = f"{msg} " + " ".join(f"{k}={_format_value(v)}" for k, v in fields.items())
        return msg, kwargs


def get_logger(name: str) -> StructuredLogger:
    """A structured logger under the `p2pmodel` hierarchy (module names are shortened)."""
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return StructuredLogger(logging.getLogger(name), {})


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        name = record.name.removeprefix(f"{_ROOT}.")
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<5} {name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _Line:
    """The bottom line of one terminal stream, and the one thing that writes to that stream.

    Log lines and progress text both go through it under one lock: a log line first erases
    the progress text, then the text is drawn again below it. Two writers, each with its own
    idea of what is on the line, are what garbled the terminal.
    """

    def __init__(self, stream: TextIO):
        self.stream = stream
        try:
            self.enabled = bool(stream.isatty())
        except (AttributeError, ValueError):  # closed or odd streams
            self.enabled = False
        self.lock = threading.RLock()
        self.text = ""

    def show(self, text: str) -> None:
        with self.lock:
            self.text = text
            self._draw()

    def write_above(self, line: str) -> None:
        """Write one log line (ending in a newline) above the progress text."""
        with self.lock:
            if self.enabled and self.text:
                self.stream.write("\r\x1b[2K")
            self.stream.write(line)
            self._draw()
            self.stream.flush()

    def hide(self) -> None:
        with self.lock:
            if self.enabled and self.text:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
            self.text = ""

    def _draw(self) -> None:
        if self.enabled and self.text:
            try:
                width = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError, AttributeError):  # not a real terminal (tests)
                width = 120
            self.stream.write("\r\x1b[2K" + self.text[: max(10, width - 1)])
            self.stream.flush()


_lines: dict[int, _Line] = {}  # id(stream) -> its one writer (the _Line keeps the stream alive)
_lines_lock = threading.Lock()


def _line_of(stream: TextIO) -> _Line:
    with _lines_lock:
        line = _lines.get(id(stream))
        if line is None or line.stream is not stream:
            line = _lines[id(stream)] = _Line(stream)
        return line


class _LineHandler(logging.StreamHandler):
    """Writes each record through the stream's `_Line`, so it never splits the progress text."""

    def __init__(self, stream: TextIO):
        super().__init__(stream)
        self.line = _line_of(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.line.write_above(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)


class StatusLine:
    """The status line at the bottom of a terminal; inert elsewhere.

    Not `p2pmodel.progress.Progress` (an amount done out of a total, for the CLI's long
    commands): this one shows whatever text it is given. Every `StatusLine` on one stream
    draws through that stream's single writer, the same one log lines go through
    (`configure_logging`), however many parts of the node create one.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None):
        self._line = _line_of(stream if stream is not None else sys.stderr)
        if enabled is not None:  # tests draw on a StringIO
            self._line.enabled = enabled

    @property
    def enabled(self) -> bool:
        return self._line.enabled

    def update(self, text: str) -> None:
        """Replace the status line's text."""
        if self.enabled:
            self._line.show(text)

    def close(self) -> None:
        """Remove the line (leave the terminal clean on exit)."""
        self._line.hide()


def configure_logging(level: str = "INFO", *, stream: TextIO | None = None) -> None:
    """Send p2pmodel's logs, and hivemind's from WARNING up, to `stream` (default stderr) at `level`.

    Every line goes through the stream's one writer, which keeps a `StatusLine` below them.
    Calling it again replaces the previous handler (tests and `demo` call it more than once).
    """
    handler = _LineHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger(_ROOT)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    _route_hivemind(handler)


def _route_hivemind(handler: logging.Handler) -> None:
    # hivemind has a stderr handler of its own (p2pd's output comes through it too), which
    # would write past our writer; and it logs every bootstrap hiccup at INFO/WARNING, while
    # our own lines say what matters
    try:
        from hivemind.utils.logging import use_hivemind_log_handler
    except ImportError:  # pragma: no cover - hivemind is a dependency
        return
    use_hivemind_log_handler("nowhere")
    hm = logging.getLogger("hivemind")
    for old in list(hm.handlers):
        hm.removeHandler(old)
    hm.addHandler(handler)
    hm.propagate = False
    hm.setLevel(os.environ.get("P2PMODEL_HIVEMIND_LOG", "ERROR"))
