"""A 3|2 partition of five real nodes commits nothing while split and heals to one head after.

The scenario runs in tests/partition_swarm.py inside a private network namespace (`unshare -n`):
five `p2pmodel join` processes on 127.0.0.1, the two groups running as different Unix users so
that iptables can drop every packet between them (see the driver's docstring). After a round
has committed on all five, the link is cut until every node has seen a round fail (neither
side holds the 4 of 5 signatures a commit needs), then restored: all five must reach one head,
past the split, within 2 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(600)]

DRIVER = Path(__file__).with_name("partition_swarm.py")


def _usable() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespace, iptables, setpriv)"
    for tool in ("unshare", "iptables", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup installs iptables where apt-get is available)"
    probe = subprocess.run(["unshare", "-n", "iptables", "-S"], capture_output=True)
    if probe.returncode != 0:
        return "iptables does not work in a network namespace here"
    # the groups' nodes run as uids 1001/1002: they must be able to run this interpreter
    runs = subprocess.run(["setpriv", "--reuid=1001", "--regid=1001", "--clear-groups", sys.executable, "-c", "import p2pmodel"],
                          capture_output=True, text=True)  # fmt: skip
    if runs.returncode != 0:
        return f"uid 1001 cannot run {sys.executable} here (a folder on its path is private?): {runs.stderr.strip()[-200:]}"
    return ""


@pytest.fixture(scope="module")
def healed():
    why = _usable()
    if why:
        pytest.skip(why)
    # not under pytest's tmp folder: that one is private to root, and the nodes run as other users
    out = Path(tempfile.mkdtemp(prefix="p2pmodel-partition-"))
    os.chmod(out, 0o755)
    try:
        proc = subprocess.run(["unshare", "-n", sys.executable, str(DRIVER), str(out / "run")], capture_output=True, text=True, timeout=560)
        result = json.loads((out / "run" / "result.json").read_text()) if (out / "run" / "result.json").exists() else {}
        logs = {p.name: p.read_text()[-1500:] for p in (out / "run").glob("*.log")} if not result.get("ok") else {}
        assert proc.returncode == 0 and result.get("ok"), (result, proc.stderr[-3000:], logs)
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_nothing_commits_while_neither_side_holds_a_quorum(healed):
    assert healed["committed_while_split"] is False


def test_all_five_reach_one_head_within_two_minutes_of_the_link_returning(healed):
    heads = healed["heads"]
    assert len({h[0] for h in heads.values()}) == 1
    assert healed["heal_s"] < 120
