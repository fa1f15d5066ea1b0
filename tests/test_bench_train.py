"""`scripts/bench_train --quick` end to end, so the benchmark cannot rot.

One quick run (N=2, 30 inner steps per peer, H=10) of all four systems: the swarm (real
`p2pmodel join` processes), torch DDP over gloo, hivemind.Optimizer with local updates, and one
peer alone. Checked: every system has a row with a finite eval loss; the multi-peer systems sent
bytes over loopback; the bench checked hivemind's averaging its three ways and reported the
verdict (and when hivemind averaged, its buffers agree); the swarm committed the rounds of its
budget and its byte counters were read; the markdown table was written.

Why hivemind's averaging verdict may be "failed" here and nowhere else: in these 1-second epochs
(H=10, ~0.12 s per step) both peers reach the target batch within one progress refresh, the
first to transition publishes the next epoch and the other one transitions as a catching-up peer
without averaging, so every later round finds no group (hivemind 1.1.12, seen in about half of
the quick runs on this machine, with matchmaking 0.5, 1.5 and 3 s). The full bench (H=50) still
marks such a row FAILED in its table; here the test keeps the path and its check from rotting.
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


def _hivemind_race(problem: str) -> bool:
    """The one problem tolerated in a quick run (see the module docstring)."""
    return problem.startswith("averaging failed: averaged with all")


def test_every_row_ran_without_problems(quick_run):
    proc, report, _ = quick_run
    problems = {
        r["system"]: [p for p in r["problems"] if not (r["system"] == "hivemind" and _hivemind_race(p))]
        for r in report["rows"]
    }
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"{problems}\n{proc.stdout[-3000:]}"
    raced = any(_hivemind_race(p) for r in report["rows"] for p in r["problems"])
    assert proc.returncode == (1 if raced else 0), proc.stdout[-3000:] + proc.stderr[-3000:]


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


def test_hivemind_averaging_was_checked_and_the_verdict_reported(quick_run):
    _, report, table = quick_run
    row = _rows(report)["hivemind"]
    averaging = row["averaging"]
    assert set(averaging) >= {"ok", "reason", "rounds_all_peers", "last_round_ok", "buffer_max_diff"}, averaging
    if averaging["ok"]:
        assert min(averaging["rounds_all_peers"]) >= 1  # every peer averaged with all the others
        if averaging["last_round_ok"]:  # an all-reduce that ran leaves the same buffers everywhere
            assert averaging["buffer_max_diff"] <= 1e-6
    else:  # said in the row and in the table, never passed off as a result
        assert averaging["reason"] and any(averaging["reason"] in p for p in row["problems"])
        assert "FAILED: averaging failed" in table


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


def test_a_warm_bench_puts_its_seed_model_in_the_founders_lineage_as_the_events_seed(tmp_path, monkeypatch):
    """--warm-steps: the swarm starts from the seed model the other systems load (`RunSpec.init`)."""
    import torch
    from safetensors.torch import save_file

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from _bench_train_systems import RunSpec, _seed_founder

    from p2pmodel.lineage import LineageStore
    from p2pmodel.protocols.signing import PeerIdentity

    state = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    save_file(state, str(tmp_path / "seed.safetensors"))
    spec = RunSpec(system="swarm", variant="default", peers=2, steps=10, inner_steps=10, batch_size=4, task_options={}, lr=1e-3,
                   lr_schedule={}, threads=1, peer_seeds=[1, 2], identity_seeds=["11" * 32, "22" * 32], workdir=str(tmp_path),
                   timeout_s=60, event={"name": "bench-default"}, init=str(tmp_path / "seed.safetensors"))  # fmt: skip
    named = _seed_founder(spec, tmp_path / "node0" / "lineage")
    assert named["seeder"] == PeerIdentity.from_seed(bytes.fromhex("11" * 32)).peer_id
    with LineageStore.open(tmp_path / "node0" / "lineage") as store:
        assert store.branches()["main"] == named["seed_version"]
        assert all(torch.equal(store.state_dict("main")[k], v) for k, v in state.items())
