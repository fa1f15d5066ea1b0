"""The one progress display (p2pmodel.progress): silent off a terminal unless a log is asked for."""

from __future__ import annotations

import io

from p2pmodel.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_nothing_is_written_by_default():
    out = io.StringIO()
    with Progress(3, "export", unit="files", stream=out) as p:
        for name in "abc":
            p.update(1, name)
    assert out.getvalue() == ""


def test_off_a_terminal_a_long_job_logs_plain_lines_and_its_end():
    out = io.StringIO()
    with Progress(None, "merging", unit="tensors", stream=out, log_every=3600.0) as p:
        for done in range(1, 5):
            p.at(done, 4, f"t{done}")
    assert out.getvalue().splitlines() == ["merging 1 tensors/4 tensors t1", "merging 4 tensors/4 tensors t4"]


def test_on_a_terminal_the_line_is_redrawn_and_erased_at_the_end():
    out = _Terminal()
    with Progress(2, "export", unit="files", stream=out, min_interval=0.0) as p:
        p.update(1, "a")
        assert "export   50%  1 files / 2 files  a" in out.getvalue()
    assert out.getvalue().endswith("\r")
