"""Real `p2pmodel join` processes for multi-process tests: start, watch, stop.

Shared by test_swarm, test_disk_full, test_cli_join and the partition driver (partition_swarm.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from p2pmodel.daemon.identity import save_identity
from p2pmodel.daemon.status import StatusUnavailable, fetch_status
from p2pmodel.protocols.signing import PeerIdentity

JOIN = [sys.executable, "-c", "import sys; from p2pmodel.cli import main; sys.exit(main())", "join"]


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    """Poll `predicate()` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class SwarmNode:
    """One `p2pmodel join` process with its home folder and log."""

    def __init__(self, name: str, root: Path, event: Path, peers: list[str], seeder: str, fault: str = "", log_stdout: bool = False):
        self.name, self.home, self.log = name, root / name, root / f"{name}.log"
        self.log_stdout = log_stdout  # a founder prints its join line on stdout
        self.args = [*JOIN, "--home", str(self.home), "--event", str(event), "--peers", *peers, "--seeder", seeder]
        self.args += ["--status-port", "0", "--device", "cpu", "--cpu-threads", "1", "--log-level", "INFO"]
        if fault:
            self.args += ["--fault", fault]
        self.proc: subprocess.Popen | None = None
        self.p2pd: list[psutil.Process] = []

    def start(self) -> None:
        (self.home / "node.json").unlink(missing_ok=True)
        with open(self.log, "a") as log:
            out = log if self.log_stdout else subprocess.DEVNULL
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def status(self) -> dict | None:
        try:
            url = json.loads((self.home / "node.json").read_text())["status_url"]
            return fetch_status(url, timeout=5)
        except (OSError, ValueError, KeyError, StatusUnavailable):
            return None

    def head(self) -> tuple[str | None, int | None]:
        s = self.status() or {}
        head = s.get("head") or {}
        return head.get("id"), head.get("round")

    def kill(self) -> None:
        """SIGKILL the node, and its p2pd too (an orphaned p2pd would hold the libp2p identity)."""
        assert self.proc is not None
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()
        self.proc.wait()
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass

    def stop(self, timeout: float = 60, signal_it: bool = True) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        if signal_it:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


def start_stock_dht(log: Path) -> tuple[subprocess.Popen, list[str]]:
    exe = Path(sys.executable).with_name("hivemind-dht")
    proc = subprocess.Popen([str(exe), "--host_maddrs", "/ip4/127.0.0.1/tcp/0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    with open(log, "w") as out:
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            out.write(line)
            clean = re.sub(r"\x1b\[[0-9;]*m", "", line)
            if "--initial_peers" in clean:
                return proc, clean.split("--initial_peers", 1)[1].split()
    proc.kill()
    pytest.fail("the stock hivemind-dht did not print its multiaddrs")




def seeded_swarm(root: Path, event: dict) -> tuple[Path, subprocess.Popen, list[str], str]:
    """The event file, a stock DHT and the founder's identity in `root/n0`: (event path, DHT process,
    its addresses, seeder peer id)."""
    path = root / "event.json"
    path.write_text(json.dumps(event))
    stock, addrs = start_stock_dht(root / "stock.log")
    (root / "n0").mkdir()
    seeder = PeerIdentity.generate()
    save_identity(seeder, root / "n0" / "identity.pem")
    return path, stock, addrs, seeder.peer_id


def stop_stock_dht(stock: subprocess.Popen) -> None:
    stock.terminate()
    try:
        stock.wait(timeout=10)
    except subprocess.TimeoutExpired:
        stock.kill()
