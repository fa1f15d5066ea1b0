"""The inner loop and DiLoCo's outer step.

Guarantees checked here:
- `outer_step` is the written formula, in float32, pure, and with lr=1, mu=0 it is exactly
  plain averaging (base + merged delta); momentum accumulates across rounds;
- `InnerTrainer` lowers the loss, reports what it did, keeps AdamW state across
  `load_base`, computes `delta = theta_local - base`, and stops when told to;
- `LRSchedule` warms up linearly, decays by a cosine to its final factor and stays there;
  `InnerTrainer` applies it on the swarm's step clock (`trainer.step`), not its own count;
- `scripts/gpu_check`'s CPU path runs and reports throughput and loss.
"""

from __future__ import annotations

import importlib.util
import json
import math
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest
import torch

from p2pmodel.tasks.charlm import CharLMTask
from p2pmodel.training import InnerTrainer, LRSchedule, TrainingError, outer_step

SMALL = dict(n_layer=1, n_embd=32, n_head=2, context=16, batch_size=8, train_bytes=50_000, eval_batches=2)


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g) * scale, "b.bias": torch.randn(5, generator=g) * scale}


@pytest.fixture(scope="module")
def task() -> CharLMTask:
    return CharLMTask(**SMALL)


@pytest.fixture()
def trainer(task) -> InnerTrainer:
    return InnerTrainer(task, task.build_model(), "cpu", lr=1e-2, cpu_threads=1)


# ---------------------------------------------------------------- outer_step


def test_outer_step_with_lr_one_and_no_momentum_is_plain_averaging():
    base, delta = _tensors(0), _tensors(1, 1e-3)
    new, _ = outer_step(base, delta, None, lr=1.0, mu=0.0)
    for k in base:
        assert torch.equal(new[k], base[k] + delta[k])


def test_outer_step_follows_the_nesterov_formula():
    base, delta, m = _tensors(0), _tensors(1, 1e-2), _tensors(2, 1e-2)
    lr, mu = 0.7, 0.9
    new, new_m = outer_step(base, delta, m, lr=lr, mu=mu)
    for k in base:
        g = -delta[k].double()
        m2 = mu * m[k].double() + g
        expected = base[k].double() - lr * (g + mu * m2)
        torch.testing.assert_close(new_m[k].double(), m2, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(new[k].double(), expected, rtol=1e-6, atol=1e-7)


def test_outer_step_plain_momentum_applies_the_buffer():
    base, delta, m = _tensors(0), _tensors(1, 1e-2), _tensors(2, 1e-2)
    new, new_m = outer_step(base, delta, m, lr=0.5, mu=0.9, nesterov=False)
    for k in base:
        torch.testing.assert_close(new[k], base[k] - 0.5 * new_m[k])


def test_outer_momentum_accumulates_over_rounds():
    base, delta = _tensors(0), _tensors(1, 1e-2)
    _, m1 = outer_step(base, delta, None, lr=0.7, mu=0.9)
    _, m2 = outer_step(base, delta, m1, lr=0.7, mu=0.9)
    for k in base:
        torch.testing.assert_close(m1[k], -delta[k])
        torch.testing.assert_close(m2[k], -1.9 * delta[k])


def test_outer_step_matches_torch_sgd_nesterov():
    base, delta = _tensors(0), _tensors(1, 1e-2)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in base.items()}
    sgd = torch.optim.SGD(params.values(), lr=0.7, momentum=0.9, nesterov=True)
    ours, m = dict(base), None
    for _ in range(3):
        for k, p in params.items():
            p.grad = -delta[k].clone()
        sgd.step()
        ours, m = outer_step(ours, delta, m, lr=0.7, mu=0.9)
    for k in base:
        torch.testing.assert_close(ours[k], params[k].detach(), rtol=1e-6, atol=1e-6)


def test_outer_step_does_not_modify_its_inputs():
    base, delta, m = _tensors(0), _tensors(1), _tensors(2)
    copies = [{k: v.clone() for k, v in d.items()} for d in (base, delta, m)]
    outer_step(base, delta, m, lr=0.7, mu=0.9)
    for original, copy in zip((base, delta, m), copies):
        assert all(torch.equal(original[k], copy[k]) for k in copy)


def test_outer_step_returns_float32_in_base_order():
    base = {k: v.to(torch.bfloat16) for k, v in reversed(_tensors(0).items())}
    new, m = outer_step(base, _tensors(1), None, lr=0.7, mu=0.9)
    assert list(new) == list(base) and list(m) == list(base)
    assert all(t.dtype == torch.float32 for t in [*new.values(), *m.values()])


def test_outer_step_is_bitwise_reproducible():
    base, delta, m = _tensors(0), _tensors(1, 1e-2), _tensors(2, 1e-2)
    a, b = outer_step(base, delta, m, 0.7, 0.9), outer_step(base, delta, m, 0.7, 0.9)
    assert all(torch.equal(a[0][k], b[0][k]) and torch.equal(a[1][k], b[1][k]) for k in base)


def test_outer_step_rejects_mismatched_names():
    delta = _tensors(1)
    delta["extra"] = torch.zeros(1)
    with pytest.raises(TrainingError, match="names") as info:
        outer_step(_tensors(0), delta, None, 0.7, 0.9)
    assert info.value.names == ("extra",)


def test_outer_step_rejects_mismatched_shapes():
    m = _tensors(2)
    m["b.bias"] = torch.zeros(6)
    with pytest.raises(TrainingError, match="shapes"):
        outer_step(_tensors(0), _tensors(1), m, 0.7, 0.9)


# ---------------------------------------------------------------- InnerTrainer


def test_short_training_lowers_the_eval_loss(task, trainer):
    before = task.evaluate(trainer.model, "cpu")["eval_loss"]
    trainer.train(30)
    assert task.evaluate(trainer.model, "cpu")["eval_loss"] < before - 1.0


def test_train_reports_steps_samples_and_loss(trainer):
    result = trainer.train(3)
    assert (result.steps, result.samples) == (3, 3 * SMALL["batch_size"])
    assert math.isfinite(result.mean_loss) and result.seconds > 0


def test_train_stops_when_told(trainer):
    calls = []
    result = trainer.train(100, should_stop=lambda: len(calls) >= 2, on_step=lambda i, loss: calls.append(i))
    assert result.steps == 2 and calls == [1, 2]


def test_delta_is_local_minus_base(trainer):
    base = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(2)
    delta = trainer.delta()
    assert list(delta) == list(base)
    for k, v in trainer.model.state_dict().items():
        assert delta[k].dtype == torch.float32
        torch.testing.assert_close(delta[k], v - base[k])
    assert any(d.abs().sum() > 0 for d in delta.values())


def test_load_base_resets_parameters_and_zeroes_the_delta(trainer):
    base = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(2)
    trainer.load_base(base)
    assert all(torch.equal(v, base[k]) for k, v in trainer.model.state_dict().items())
    assert all(not d.any() for d in trainer.delta().values())


def test_load_base_keeps_the_adamw_state(trainer):
    trainer.train(2)
    step_before = {id(p): s["step"].item() for p, s in trainer.optimizer.state.items()}
    trainer.load_base(trainer.model.state_dict())
    trainer.train(1)
    assert all(s["step"].item() == step_before[id(p)] + 1 for p, s in trainer.optimizer.state.items())


def test_load_base_rejects_a_foreign_state(trainer):
    with pytest.raises(TrainingError, match="does not match"):
        trainer.load_base({"not.a.param": torch.zeros(1)})


def test_amp_is_off_on_cpu_by_default(trainer):
    assert trainer.amp == "off"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_paths_train(task, amp):
    # CUDA picks one of these; on CPU autocast exercises the same code (fp16: with GradScaler)
    trainer = InnerTrainer(task, task.build_model(), "cpu", lr=1e-2, amp=amp, cpu_threads=1)
    result = trainer.train(5)
    assert trainer.amp == amp and math.isfinite(result.mean_loss)
    assert (trainer.scaler is not None) == (amp == "fp16")


def test_unknown_amp_mode_is_rejected(task):
    with pytest.raises(TrainingError, match="amp"):
        InnerTrainer(task, task.build_model(), "cpu", amp="fp8", cpu_threads=1)


# ---------------------------------------------------------------- scripts/gpu_check (CPU path)


def test_gpu_check_cpu_path_reports_throughput_and_loss(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check"
    loader = SourceFileLoader("gpu_check", str(script))  # no .py suffix: name the loader
    gpu_check = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(gpu_check)
    out = tmp_path / "report.json"
    argv = ["--cpu-only", "--skip-swarm", "--no-large", "--cpu-steps", "3", "--warmup", "1", "--cpu-threads", "1"]
    assert gpu_check.main([*argv, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["device"], row["steps"], row["amp"]) == ("cpu", 3, "off")
    assert row["tokens_per_s"] > 0 and math.isfinite(row["train_loss"])


def test_rebase_moves_the_steps_taken_onto_a_new_base(trainer):
    # training ahead from the local model, then the committed version lands: the steps taken
    # are kept (theta = new + done) and the delta is now relative to the new base
    trainer.train(3)
    done = trainer.delta()
    new_base = {k: torch.full_like(v, 0.01) for k, v in trainer.model.state_dict().items()}
    trainer.rebase(new_base)
    for k, d in trainer.delta().items():
        torch.testing.assert_close(d, done[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(trainer.model.state_dict()[k].float(), new_base[k] + done[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- LRSchedule


def test_lr_schedule_warms_up_then_decays_by_a_cosine_to_its_final_factor():
    s = LRSchedule(total_steps=110, warmup_steps=10, final=0.1)
    assert [s.factor(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.55)  # half way: the cosine's midpoint between 1 and 0.1
    assert s.factor(110) == pytest.approx(0.1) and s.factor(10_000) == pytest.approx(0.1)
    assert all(s.factor(i) >= s.factor(i + 1) for i in range(10, 200))


@pytest.mark.parametrize("args", [(0, 0, 0.1), (10, 10, 0.1), (10, -1, 0.1), (10, 0, 1.5)])
def test_a_schedule_that_cannot_work_is_refused(args):
    with pytest.raises(TrainingError):
        LRSchedule(*args)


def test_the_trainer_follows_the_schedule_on_the_swarms_clock(task):
    schedule = LRSchedule(total_steps=100, final=0.1)
    trainer = InnerTrainer(task, task.build_model(), "cpu", lr=1e-2, cpu_threads=1, lr_schedule=schedule)
    trainer.step = 100  # a round late in the event: its steps run at the final lr
    trainer.train(2)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert trainer.step == 102
    trainer.step = 50
    trainer.train(1)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * schedule.factor(50))


def test_the_event_turns_its_lr_settings_into_a_schedule():
    from p2pmodel.daemon.config import event_from_mapping

    assert event_from_mapping({}).lr_schedule() is None  # open-ended: a constant lr
    decay = event_from_mapping({"lr_decay_steps": 600, "lr_warmup_steps": 30}).lr_schedule()
    assert decay == LRSchedule(total_steps=600, warmup_steps=30, final=0.1)
    flat = event_from_mapping({"lr_warmup_steps": 30}).lr_schedule()
    assert flat.factor(0) == pytest.approx(1 / 30) and flat.factor(30) == flat.factor(10_000) == pytest.approx(1.0)


def test_the_nodes_trainer_starts_each_round_at_its_place_on_the_clock(task):
    import asyncio

    from p2pmodel.daemon.trainer import Trainer

    async def main() -> float:
        trainer = Trainer(task, "cpu", lr=1e-2, peer_seed=0, cpu_threads=1, lr_schedule=LRSchedule(total_steps=100, final=0.1))
        try:
            base = task.build_model().state_dict()
            await trainer.start(base)
            await trainer.train_round(base, 2, first_step=4 * 25)  # round 4 of H=25: the decay is over
            return trainer._inner.optimizer.param_groups[0]["lr"]
        finally:
            trainer.close()

    assert asyncio.run(main()) == pytest.approx(1e-3)


def test_steps_taken_ahead_count_as_the_next_rounds_first_on_the_clock(task):
    import asyncio
    import time

    from p2pmodel.daemon.trainer import Trainer

    async def main() -> tuple[int, int]:
        trainer = Trainer(task, "cpu", lr=1e-2, peer_seed=0, cpu_threads=1, lr_schedule=LRSchedule(total_steps=1000))
        try:
            base = task.build_model().state_dict()
            await trainer.start(base)
            await trainer.train_round(base, 2, first_step=0)
            before = time.monotonic()
            trainer.train_ahead(50)
            deadline = before + 60
            p = trainer.progress
            while not (p.started > before and p.step >= 1):  # a step taken ahead (a condition, not a sleep)
                assert time.monotonic() < deadline, "no step was taken ahead"
                await asyncio.sleep(0.01)
            ahead = p.step
            result, _ = await trainer.train_round(base, 60, first_step=500)  # the swarm is at step 500
            return trainer._inner.step, result.steps, ahead
        finally:
            trainer.close()

    step, steps, ahead = asyncio.run(main())
    assert ahead >= 1 and steps == 60
    assert step == 500 + steps  # ahead steps and this round's own, on the swarm's clock


def test_busy_seconds_count_training_in_progress_so_steps_taken_ahead_count_in_the_round_they_ran(task):
    """The training share reads busy_seconds at a round's commit: time spent training ahead while
    the round merges belongs to that round, even though the training call has not ended."""
    import asyncio
    import time

    from p2pmodel.daemon.trainer import Trainer

    async def main() -> tuple[float, float, float]:
        trainer = Trainer(task, "cpu", lr=1e-2, peer_seed=0, cpu_threads=1)
        try:
            base = task.build_model().state_dict()
            await trainer.start(base)
            await trainer.train_round(base, 1)
            finished = trainer.busy_seconds
            trainer.train_ahead(10_000)  # runs until the next train_round stops it
            p, deadline = trainer.progress, time.monotonic() + 60
            while p.step < 2:  # two steps taken ahead (a condition, not a sleep)
                assert time.monotonic() < deadline, "no steps were taken ahead"
                await asyncio.sleep(0.01)
            during = trainer.busy_seconds
            await trainer.train_round(base, 1)
            return finished, during, trainer.busy_seconds
        finally:
            trainer.close()

    finished, during, after = asyncio.run(main())
    assert finished < during <= after
