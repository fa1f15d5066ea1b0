"""The CI gate (p2pmodel/ci.py): what may be committed. A version fails on a NaN anywhere, on a
regression against its parent, on slow drift against the best recent version, on a parameter
norm past the event's bound, or on a custom check; the report says why."""

from __future__ import annotations

import math

import torch

from p2pmodel.ci import CIGate, median_metrics, run_gate

GATE = CIGate(max_regression=0.10, max_regression_best=0.20, window=4)


def test_a_version_no_worse_than_its_parent_passes():
    r = run_gate(GATE, {"eval_loss": 2.05}, parent={"eval_loss": 2.0}, recent=[{"eval_loss": 2.0}])
    assert r.passed and r.failures == ()


def test_one_bad_round_fails_against_the_parent():
    r = run_gate(GATE, {"eval_loss": 2.5}, parent={"eval_loss": 2.0})
    assert not r.passed and "parent" in r.reason


def test_slow_drift_fails_against_the_best_of_the_window():
    # each step +8% (under the 10% parent limit) — the drift from the best is what fails
    history = [{"eval_loss": 2.0 * 1.08**i} for i in range(3)][::-1]  # newest first
    new = history[0]["eval_loss"] * 1.08
    r = run_gate(GATE, {"eval_loss": new}, parent=history[0], recent=history)
    assert not r.passed and "drifted" in r.reason
    # the best that left the window no longer counts
    r = run_gate(CIGate(window=1, max_regression_best=0.2), {"eval_loss": new}, parent=history[0], recent=history)
    assert r.passed


def test_non_finite_metrics_and_parameters_fail():
    assert "non-finite" in run_gate(GATE, {"eval_loss": math.nan}).reason
    params = {"w": torch.tensor([1.0, math.inf])}
    assert "not finite" in run_gate(GATE, {"eval_loss": 1.0}, params=params).reason


def test_parameter_norm_bound():
    params = {"w": torch.full((4,), 3.0), "steps": torch.tensor([7])}  # integer tensors do not count
    r = run_gate(CIGate(max_param_norm=5.0), {"eval_loss": 1.0}, params=params)
    assert not r.passed and r.param_norm == 6.0


def always_red(metrics, params):
    return "red because the test says so"


def test_custom_checks_run_and_a_broken_one_is_a_red_run():
    r = run_gate(CIGate(checks=(f"{__name__}:always_red", "no_such_module_xyz:f", "nocolon")), {"eval_loss": 1.0})
    assert not r.passed and len(r.failures) == 3
    assert "red because" in r.failures[0]


def test_recorded_metrics_are_the_voters_median():
    votes = [{"eval_loss": 2.0}, {"eval_loss": 100.0}, {"eval_loss": 2.1}, {"eval_loss": 1.9, "acc": 0.5}]
    assert median_metrics(votes) == {"acc": 0.5, "eval_loss": 2.1}


def test_p2pmodel_ci_runs_the_gate_offline_and_exits_1_when_red(tmp_path, capsys):
    from p2pmodel.cli import main
    from p2pmodel.lineage import LineageStore
    from p2pmodel.tasks import load_task

    opts = '{"train_bytes": 20000, "eval_batches": 1, "eval_bytes": 8192}'
    model = load_task("charlm", train_bytes=20000, eval_batches=1, eval_bytes=8192).build_model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    repo = tmp_path / "repo"
    with LineageStore.init(repo) as store:
        seed = store.commit(state, message="seed")
        broken = {k: (v * 50 if v.is_floating_point() else v) for k, v in state.items()}
        store.commit(broken, parents=(seed.id,), message="scaled x50")
    assert main(["--repo", str(repo), "ci", "main~1", "--task-options", opts]) == 0
    assert "CI: passed" in capsys.readouterr().out
    assert main(["--repo", str(repo), "ci", "main", "--task-options", opts]) == 1
    assert "regressed past the parent" in capsys.readouterr().out
