"""`p2pmodel join` as a volunteer meets it (issue 9, "Volunteers").

Guarantees:
- a bad flag (`--log-level verbose`, `--status-port 99999`, `--device cuda` without CUDA) is one
  line naming the flag, exit code 2, before the home folder is touched or any network starts;
- two nodes on one machine do not collide: the default status port, when taken, is replaced by
  a free one; a port asked for explicitly is not (one line naming it);
- a start that fails leaves the home as it was, plus the identity keys: nothing ties it to the
  event it failed to join, so the next start may join another;
- log lines never land inside the terminal's progress line: every `StatusLine` and every log
  line (hivemind's included) go through one writer;
- SIGINT to a running node's process group (Ctrl-C in a terminal, which reaches p2pd too) ends
  it within `--shutdown-timeout`, with exit code 0, no traceback, and no p2pd left behind.

The SIGINT scenario runs one real node (`--status-port 0`, 127.0.0.1) once per module and
waits on conditions under deadlines; the other tests run in-process.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from swarm_nodes import wait_for
from p2pmodel.daemon.identity import load_identity
from p2pmodel.daemon.config import (
    DEFAULT_STATUS_PORT,
    ConfigError,
    NodeConfig,
    node_config_from_args,
)
from p2pmodel.daemon.logs import StatusLine, configure_logging, get_logger
from p2pmodel.daemon.node import Node, NodeError, _open_status
from p2pmodel.daemon.status import StatusUnavailable, fetch_status

from p2pmodel.cli import build_parser, main

SHUTDOWN_TIMEOUT = 6.0  # seconds given to the node under test
# Interpreter exit after the node stopped (threads joined, modules torn down) on a loaded 2-core
# machine. Before the fix a node took >= 15 s (a fixed close timeout) whatever its own timeout.
EXIT_SLACK = 6.0


def _join_config(*flags: str) -> NodeConfig:
    return node_config_from_args(build_parser().parse_args(["join", *flags]))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- flags


def test_log_level_is_case_insensitive():
    assert _join_config("--log-level", "debug").log_level == "DEBUG"


@pytest.mark.parametrize("flag, value", [("--log-level", "verbose"), ("--status-port", "99999"), ("--status-port", "-1")])
def test_a_bad_flag_exits_2_with_one_line_naming_it_before_touching_the_home(flag, value, tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["join", "--home", str(home), flag, value]) == 2
    assert flag in _one_line_error(capsys)
    assert not home.exists()


def test_status_port_zero_means_any_free_port():
    assert _join_config("--status-port", "0").status_port == 0


def test_cuda_without_cuda_exits_2_with_one_line_before_the_home_or_the_dht(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    home = tmp_path / "home"
    assert main(["join", "--home", str(home), "--device", "cuda"]) == 2
    assert "--device" in _one_line_error(capsys)
    assert not home.exists()  # the DHT starts only after the home is opened


async def test_a_node_built_in_code_checks_its_device_too(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        await Node.create(NodeConfig(home=str(tmp_path / "home"), device="cuda:0"))
    assert err.value.source == "--device"
    assert not (tmp_path / "home").exists()


# ----------------------------------------------------------------------------- status port


def _hold_port(port: int) -> socket.socket | None:
    """Listen on 127.0.0.1:`port`; None when something else holds it already (taken either way)."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.listen()
    return s


async def test_a_second_node_on_the_machine_gets_a_free_status_port():
    holder = _hold_port(DEFAULT_STATUS_PORT)
    try:
        server = await _open_status(dict, DEFAULT_STATUS_PORT)
        try:
            assert server.port not in (0, DEFAULT_STATUS_PORT)
            assert server.url == f"http://127.0.0.1:{server.port}/status"
        finally:
            await server.close()
    finally:
        if holder is not None:
            holder.close()


async def test_a_taken_status_port_asked_for_explicitly_is_an_error_naming_the_flag():
    holder = _hold_port(0)
    assert holder is not None
    try:
        with pytest.raises(NodeError, match="--status-port"):
            await _open_status(dict, holder.getsockname()[1])
    finally:
        holder.close()


# ----------------------------------------------------------------------------- failed start


async def _fail_start(home: Path, event: str = "") -> None:
    """Start a node that fails at the last step of opening (its status port is taken)."""
    holder = _hold_port(0)
    assert holder is not None
    try:
        config = NodeConfig(home=str(home), event=event, device="cpu", cpu_threads=1, status_port=holder.getsockname()[1])
        with pytest.raises(NodeError, match="status port"):
            await Node.create(config)
    finally:
        holder.close()


@pytest.mark.multiprocess
async def test_a_failed_start_leaves_only_the_identity_keys(tmp_path):
    home = tmp_path / "home"
    await _fail_start(home)
    assert sorted(p.name for p in home.iterdir()) == ["identity.pem", "libp2p.key"]


@pytest.mark.multiprocess
async def test_a_failed_start_keeps_the_identity_and_frees_the_home_for_another_event(tmp_path):
    home = tmp_path / "home"
    await _fail_start(home)
    peer_id = load_identity(home / "identity.pem").peer_id
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"name": "other-event"}))
    node = await Node.create(NodeConfig(home=str(home), event=str(other), device="cpu", cpu_threads=1, status_port=0))
    try:
        assert node.identity.peer_id == peer_id
        assert node.event.name == "other-event"
    finally:
        assert await node._close_resources() == []


# ----------------------------------------------------------------------------- progress line


def _screen(output: str) -> list[str]:
    """What a terminal shows for `output`: \\r returns to column 0, ESC[2K erases the line."""
    lines, col = [""], 0
    for token in re.split(r"(\r|\n|\x1b\[2K)", output):
        if token == "\r":
            col = 0
        elif token == "\n":
            lines.append("")
            col = 0
        elif token == "\x1b[2K":
            lines[-1] = ""
        elif token:
            line = lines[-1]
            lines[-1] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return [line for line in lines if line]


@pytest.fixture
def terminal():
    """A fake terminal stream; p2pmodel's and hivemind's loggers are restored afterwards."""
    saved = {}
    for name in ("p2pmodel", "hivemind"):
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.level, lg.propagate)
    yield io.StringIO()
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_a_log_line_is_printed_above_the_progress_line_never_inside_it(terminal):
    configure_logging("INFO", stream=terminal)
    rounds_progress = StatusLine(stream=terminal, enabled=True)  # as the round runner makes its own
    rounds_progress.update("round 3 | collecting | train 10/50")
    get_logger("test").info("peer joined", peer="abc")
    rounds_progress.update("round 3 | collecting | train 11/50")
    screen = _screen(terminal.getvalue())
    assert len(screen) == 2 and screen[0].endswith("test: peer joined peer=abc")
    assert screen[1] == "round 3 | collecting | train 11/50"


def test_every_progress_on_one_stream_draws_the_same_line(terminal):
    a, b = StatusLine(stream=terminal, enabled=True), StatusLine(stream=terminal, enabled=True)
    a.update("from a")
    b.update("from b")
    assert _screen(terminal.getvalue()) == ["from b"]


def test_hivemind_log_lines_go_through_the_same_writer(terminal):
    configure_logging("INFO", stream=terminal)
    StatusLine(stream=terminal, enabled=True).update("round 1")
    logging.getLogger("hivemind.p2p").error("p2pd said something")
    screen = _screen(terminal.getvalue())
    assert screen[-1] == "round 1" and screen[0].endswith("p2pd said something")


def test_closing_the_progress_leaves_only_the_log_lines(terminal):
    configure_logging("INFO", stream=terminal)
    p = StatusLine(stream=terminal, enabled=True)
    p.update("round 1")
    get_logger("test").info("bye")
    p.close()
    screen = _screen(terminal.getvalue())
    assert len(screen) == 1 and screen[0].endswith("test: bye")


# ----------------------------------------------------------------------------- SIGINT


@dataclass
class SigintRun:
    status_line: str  # what the node printed as its status URL
    status_url: str  # what node.json names
    exit_code: int
    seconds_to_exit: float  # from SIGINT to the process's exit
    stderr: str
    children_left: list[int]  # pids of the node's children (p2pd) still alive after it exited


def _read_stdout_until(proc: subprocess.Popen, pattern: str, deadline: float, buf: bytearray) -> str:
    """The first stdout line matching `pattern`, read without blocking past `deadline`."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while True:
        for line in buf.decode(errors="replace").splitlines():
            if re.search(pattern, line):
                return line
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            pytest.fail(f"no stdout line matching {pattern!r} (exit code {proc.poll()}); stdout so far: {bytes(buf)!r}")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            buf += os.read(fd, 65536)


@pytest.fixture(scope="module")
def sigint_run(tmp_path_factory) -> SigintRun:
    root = tmp_path_factory.mktemp("sigint")
    home, err_path = root / "home", root / "stderr.log"
    args = [sys.executable, "-m", "p2pmodel.cli", "join", "--home", str(home), "--status-port", "0", "--device", "cpu",
            "--cpu-threads", "1", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(err_path, "wb") as err:
        # its own process group, as a terminal gives it: the SIGINT below reaches it and p2pd, not pytest
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
    try:
        status_line = _read_stdout_until(proc, r"^Status: http://", time.monotonic() + 240, bytearray())
        status_url = json.loads((home / "node.json").read_text())["status_url"]

        def in_a_round() -> bool:  # the run loop (and its signal handlers) is up
            try:
                return fetch_status(status_url, timeout=5).get("round") is not None
            except StatusUnavailable:
                return False

        wait_for(in_a_round, 120, "the node to enter its first round", interval=0.2)
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert children, "the node runs p2pd as its child"
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=SHUTDOWN_TIMEOUT + 60)  # only so that a hang cannot stall the suite
        except subprocess.TimeoutExpired:
            code = -1
        seconds = time.monotonic() - start
        _, alive = psutil.wait_procs([psutil.Process(pid) for pid in children if psutil.pid_exists(pid)], timeout=2)
        return SigintRun(status_line, status_url, code, seconds, err_path.read_text(), [p.pid for p in alive])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_node_prints_its_status_url(sigint_run):
    assert sigint_run.status_line.split()[1] == sigint_run.status_url


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigint_to_the_process_group_exits_0_within_the_shutdown_timeout(sigint_run):
    assert sigint_run.exit_code == 0, sigint_run.stderr[-3000:]
    assert sigint_run.seconds_to_exit < SHUTDOWN_TIMEOUT + EXIT_SLACK


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigint_prints_no_traceback(sigint_run):
    assert "Traceback" not in sigint_run.stderr
    assert "never retrieved" not in sigint_run.stderr


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigint_leaves_no_p2pd_behind(sigint_run):
    assert sigint_run.children_left == []
