"""Structured, one-line logs for the daemon, and a progress line when stderr is a terminal.

Every event is one line: `time level logger: message key=value key=value`. Fields are passed as
keyword arguments (`log.info("round committed", round=3, version=vid[:12])`), so lines stay
greppable and machine-splittable. Values containing spaces are quoted.

On a TTY, `Progress` keeps one status line at the bottom of the terminal (round, phase, training
progress); log lines are printed above it. When stderr is not a terminal the progress line is
off and nothing but log lines is written.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["get_logger", "configure_logging", "Progress", "StructuredLogger"]

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


class _ProgressAwareHandler(logging.StreamHandler):
    """Clears the progress line before a log line and redraws it after."""

    def __init__(self, stream: TextIO, progress: "Progress | None"):
        super().__init__(stream)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        if self.progress is not None:
            with self.progress.lock:
                self.progress.clear()
                super().emit(record)
                self.progress.redraw()
        else:
            super().emit(record)


class Progress:
    """A single status line redrawn in place on a terminal; inert elsewhere."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool | None = None):
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.lock = threading.Lock()
        self._text = ""

    def update(self, text: str) -> None:
        """Replace the status line's text."""
        if not self.enabled:
            return
        with self.lock:
            self._text = text
            self.redraw()

    def clear(self) -> None:
        if self.enabled and self._text:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def redraw(self) -> None:
        if self.enabled and self._text:
            width = os.get_terminal_size(self.stream.fileno()).columns if self.stream.isatty() else 120
            self.stream.write("\r\x1b[2K" + self._text[: max(10, width - 1)])
            self.stream.flush()

    def close(self) -> None:
        """Remove the line (leave the terminal clean on exit)."""
        with self.lock:
            self.clear()
            self._text = ""


def configure_logging(level: str = "INFO", *, stream: TextIO = sys.stderr, progress: Progress | None = None) -> None:
    """Send p2pmodel's logs to `stream` at `level`; hivemind's own logs only from WARNING up.

    Calling it again replaces the previous handler (tests and `demo` call it more than once).
    """
    root = logging.getLogger(_ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = _ProgressAwareHandler(stream, progress)
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    # hivemind logs every bootstrap hiccup at INFO/WARNING; our own lines say what matters
    logging.getLogger("hivemind").setLevel(os.environ.get("P2PMODEL_HIVEMIND_LOG", "ERROR"))
