"""A node whose disk fills says so, stops training, follows the swarm, and resumes when space returns.

Real daemons on 127.0.0.1: a stock `hivemind-dht`, n0, and n1 whose home is a 256 MiB tmpfs in
its own mount namespace (`unshare -m`; the test reaches it through /proc/PID/root). Once a
round has committed, the test fills n1's tmpfs with a file: n1's status must say the disk is
full, versions committed meanwhile credit n0 alone (n1 still merges and votes, so the swarm
goes on), and after the file is removed n1 says it has room and is credited again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from swarm_nodes import SwarmNode, seeded_swarm, stop_stock_dht, wait_for

from p2pmodel.lineage import LineageStore

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(600)]

EVENT = {
    "name": "diskfull",
    "inner_steps": 8,
    "collect_window": 10.0,  # a paused n1 delivers nothing: rounds wait this long for it
    "proposal_timeout": 4.0,
    "round_deadline": 60.0,
    "min_members": 2,
    "task_options": {"train_bytes": 200_000, "eval_batches": 2},
}


def _can_mount_tmpfs(where: Path) -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"], capture_output=True)
    return probe.returncode == 0


class TmpfsNode(SwarmNode):
    """A SwarmNode whose home is a tmpfs mounted in the node's own mount namespace."""

    size = "256m"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.mount_point = self.home
        script = 'mkdir -p "$0" && mount -t tmpfs -o size=' + self.size + ' tmpfs "$0" && exec "$@"'
        self.args = ["unshare", "-m", "sh", "-c", script, str(self.mount_point), *self.args]

    def start(self) -> None:
        self.mount_point.mkdir(parents=True, exist_ok=True)
        super().start()
        # unshare and sh exec in place: the node keeps this pid, and its files are seen from here
        self.home = Path(f"/proc/{self.proc.pid}/root{self.mount_point}")


def credited(home: Path, peer: str, after_round: int) -> bool:
    with LineageStore.open(home / "lineage") as store:
        return any(peer in v.contributors for v in store.log("main", limit=20) if (v.round or -1) > after_round)


def versions_after(home: Path, after_round: int) -> list:
    with LineageStore.open(home / "lineage") as store:
        return [v for v in store.log("main", limit=50) if v.round is not None and v.round > after_round]


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diskfull")
    if shutil.which("unshare") is None or not _can_mount_tmpfs(root):
        pytest.skip("needs `unshare -m` and tmpfs mounts (CAP_SYS_ADMIN)")
    event, stock, addrs, seeder = seeded_swarm(root, EVENT)
    n0 = SwarmNode("n0", root, event, addrs, seeder)
    n1 = TmpfsNode("n1", root, event, addrs, seeder)
    out: dict = {}
    try:
        n0.start()
        n1.start()
        wait_for(lambda: (n0.head()[1] or -1) >= 0 and (n1.head()[1] or -1) >= 0, 240, "round 0 to commit on both")
        n1_peer = n1.status()["peer_id"]
        out["n1_peer"] = n1_peer
        wait_for(lambda: credited(n0.home, n1_peer, -1), 120, "n1 to be credited before its disk fills")
        # fill n1's disk to under its threshold
        disk = n1.status()["disk"]
        filler = n1.home / "filler"
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(1, disk["free_bytes"] - disk["min_free_bytes"] // 2))
        full = wait_for(lambda: (s := n1.status()) and s["disk"]["full"] and s, 60, "n1 to report a full disk")
        out["full_status"] = full
        full_round = n0.head()[1]
        # n1 still follows: versions keep coming, crediting n0 alone
        wait_for(lambda: len(versions_after(n0.home, full_round + 1)) >= 1, 180, "a round to commit while n1's disk is full")
        out["while_full"] = versions_after(n0.home, full_round + 1)
        out["n1_head_while_full"] = n1.head()
        filler.unlink()
        out["clear_status"] = wait_for(lambda: (s := n1.status()) and not s["disk"]["full"] and s, 60, "n1 to see room again")
        clear_round = n0.head()[1]
        wait_for(lambda: credited(n0.home, n1_peer, clear_round), 180, "n1 to be credited again")
        out["errors"] = n1.status()["errors"]
        # the dashboard's lineage API of a running node (daemon/lineage_api.py)
        url = json.loads((n0.home / "node.json").read_text())["status_url"].rsplit("/status", 1)[0]
        with urllib.request.urlopen(f"{url}/api/lineage?limit=50", timeout=10) as r:
            out["api_lineage"] = json.loads(r.read())
        with urllib.request.urlopen(f"{url}/api/credits", timeout=10) as r:
            out["api_credits"] = json.loads(r.read())
        yield out
    finally:
        for node in (n0, n1):
            node.stop(timeout=30)
        stop_stock_dht(stock)


def test_a_full_disk_is_reported_in_status_with_free_bytes_and_the_reason(disk_full_run):
    disk = disk_full_run["full_status"]["disk"]
    assert disk["full"] and disk["free_bytes"] < disk["min_free_bytes"] and "free" in disk["reason"]
    assert any("disk full" in e["message"] for e in disk_full_run["errors"])


def test_while_full_the_node_trains_nothing_but_the_swarm_goes_on(disk_full_run):
    peer = disk_full_run["n1_peer"]
    assert disk_full_run["while_full"]
    assert all(peer not in v.contributors for v in disk_full_run["while_full"])


def test_once_space_returns_it_trains_and_is_credited_again(disk_full_run):
    assert not disk_full_run["clear_status"]["disk"]["full"]


def test_a_running_node_serves_its_lineage_and_credits_to_the_dashboard(disk_full_run):
    lineage, credits = disk_full_run["api_lineage"], disk_full_run["api_credits"]
    assert len(lineage["versions"]) >= 3 and lineage["head"] == lineage["versions"][0]["id"]
    n1 = next(p for p in credits["peers"] if p["peer"] == disk_full_run["n1_peer"])
    assert n1["deltas_accepted"] >= 2 and n1["samples_merged"] > 0  # before its disk filled, and after
