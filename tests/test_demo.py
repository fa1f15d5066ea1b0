"""`p2pmodel demo`, the README's main job, run end to end as a user would (a small one).

It must start real nodes on 127.0.0.1, report every committed round with where its time
went, and finish with a lineage whose eval loss went down from the seed's.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "p2pmodel.cli", "demo", "--nodes", "2", "--rounds", "2", "--inner-steps", "10",
           "--dir", str(root), "--timeout", "300"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_demo_prints_the_join_line_others_would_run(demo_output):
    assert re.search(r"p2pmodel join --peers /ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+ --event-id [0-9a-f]{64}$", demo_output, re.M)


def test_demo_reports_each_round_with_its_time_split(demo_output):
    rounds = re.findall(r"round (\d+) committed: .*2 contributors.*\[train .*wait .* of .*s; sent \d+ kB\]", demo_output)
    assert rounds == ["0", "1"]


def test_demo_lineage_ends_below_the_seeds_eval_loss(demo_output):
    losses = [float(x) for x in re.findall(r"eval_loss (\d+\.\d+)", demo_output)]
    assert len(losses) == 3 and losses[0] < losses[-1]  # newest first: head, ..., seed
