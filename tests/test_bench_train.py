"""`scripts/bench_train --quick` end to end, so the benchmark cannot rot.

One quick run (N=2, 30 inner steps per peer, H=10) of all four systems: the swarm (real
`p2pmodel join` processes), torch DDP over gloo, hivemind.Optimizer with local updates, and one
peer alone. Checked: every system has a row with a finite eval loss; the multi-peer systems sent
bytes over loopback; hivemind really averaged (the bench's own three-way check); the swarm
committed the rounds of its budget and its byte counters were read; the markdown table was written.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_train"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path_factory.mktemp("bench_train")
    # the bench enforces its own per-system deadlines; this one only guards against a hang
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=840)
    if not (out / "train.json").exists():
        pytest.fail(f"bench_train wrote no results (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc, json.loads((out / "train.json").read_text()), (out / "train.md").read_text()


def _rows(report: dict) -> dict[str, dict]:
    return {row["system"]: row for row in report["rows"]}


def test_every_row_ran_without_problems(quick_run):
    proc, report, _ = quick_run
    problems = {r["system"]: r["problems"] for r in report["rows"] if r["problems"]}
    assert not problems, f"{problems}\n{proc.stdout[-3000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_every_system_has_a_finite_eval_loss(quick_run):
    _, report, _ = quick_run
    rows = _rows(report)
    assert set(rows) == {"swarm", "ddp", "hivemind", "single"}
    for system, row in rows.items():
        assert row["eval_loss"] is not None and math.isfinite(row["eval_loss"]), system
        # 30 steps from a random init (ln 256 ~ 5.55): every system must have learned something
        assert row["eval_loss"] < 5.5, (system, row["eval_loss"])


def test_multi_peer_systems_used_loopback(quick_run):
    _, report, _ = quick_run
    rows = _rows(report)
    for system in ("swarm", "ddp", "hivemind"):
        assert rows[system]["loopback_bytes"] and rows[system]["loopback_bytes"] > 0, system
    # all-reducing every gradient every step moves far more than the swarm's compressed deltas
    assert rows["ddp"]["loopback_bytes"] > 10 * rows["swarm"]["loopback_bytes"]


def test_hivemind_really_averaged(quick_run):
    _, report, _ = quick_run
    averaging = _rows(report)["hivemind"]["averaging"]
    assert averaging["ok"], averaging
    assert min(averaging["rounds_all_peers"]) >= 1  # every peer averaged with all the others
    if averaging["last_round_ok"]:  # an all-reduce that ran leaves the same buffers everywhere
        assert averaging["buffer_max_diff"] <= 1e-6


def test_swarm_committed_its_rounds(quick_run):
    _, report, _ = quick_run
    swarm = _rows(report)["swarm"]["swarm"]
    assert all(t is not None and t >= 1 for t in swarm["target_rounds"]), swarm
    assert swarm["rounds_evaluated"] >= 1
    assert all(swarm["counters_read"]), swarm
    assert swarm["bytes_by_group"].get("deltas", 0) > 0
    if swarm["samples_merged"] is not None:  # logged by the daemon
        assert swarm["samples_merged"] > 0


def test_table_has_a_row_per_system(quick_run):
    _, _, table = quick_run
    assert "| system | N | variant |" in table
    assert "Machine:" in table
    for name in ("p2pmodel swarm", "torch DDP (gloo)", "hivemind.Optimizer", "single peer"):
        assert f"| {name} | 2 |" in table, name
