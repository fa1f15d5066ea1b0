"""scripts/sweep_outer: the offline swarm simulation is the daemon's round, deterministic, and counts bytes right."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from p2pmodel.protocols.codec import CodecConfig, DeltaCodec
from p2pmodel.tasks import load_task
from p2pmodel.training import InnerTrainer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sweep_outer"
TINY = {"context": 16, "batch_size": 4, "n_layer": 1, "n_embd": 32, "train_bytes": 20_000, "eval_bytes": 8192, "eval_batches": 1}


@pytest.fixture(scope="module")
def sweep():
    loader = importlib.machinery.SourceFileLoader("sweep_outer_under_test", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up
    threads = torch.get_num_threads()
    try:
        loader.exec_module(module)
        yield module
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop(loader.name, None)


def _run(sweep, **kw):
    return sweep.Run(**{"name": "t", "steps": 6, "H": 3, "task": TINY, **kw})


def test_runs_are_deterministic(sweep):
    run = _run(sweep, codec={"encoder": "lowbit", "value_bits": 1, "block_size": 64, "feedback_decay": 0.9}, outer_lr=1.0, outer_mu=0.0)
    a, b = sweep.simulate(run), sweep.simulate(run)
    assert a["curve"] == b["curve"] and a["payload_bytes"] == b["payload_bytes"]
    assert a["rounds"] == 2 and len(a["curve"]) == 2


def test_one_peer_with_plain_averaging_is_plain_training(sweep):
    res = sweep.simulate(_run(sweep, peers=1, codec=None, outer_lr=1.0, outer_mu=0.0))
    task = load_task("charlm", **TINY)
    model = task.build_model()
    InnerTrainer(task, model, "cpu", peer_seed=0, amp="off", cpu_threads=1).train(6)
    alone = task.evaluate(model, "cpu")["eval_loss"]
    assert res["eval_loss"] == pytest.approx(alone, abs=2e-4)  # base + (theta - base) rounds once per round
    assert res["payload_bytes"] == 0 and res["total_bytes"] == 0


def test_payload_is_the_sum_of_encoded_sizes(sweep):
    codec = {"encoder": "int8", "zstd_level": 0}
    res = sweep.simulate(_run(sweep, codec=codec))
    task = load_task("charlm", **TINY)
    state = task.build_model().state_dict()
    one = len(DeltaCodec(CodecConfig(**codec)).encode_without_feedback({k: torch.zeros_like(v) for k, v in state.items()}))
    assert res["payload_bytes"] == 2 * 2 * one  # int8 without zstd: a size that depends on shapes only
    assert res["control_bytes"] == 2 * 2 * sweep.CONTROL_BYTES


def test_cache_keys_ignore_later_fields_at_their_default(sweep):
    assert "mode" not in _run(sweep).key() and "carry" not in _run(sweep).key()
    assert "carry" in _run(sweep, carry=1.0, codec={"feedback_decay": 0.0}).key()


def test_rounds_of_the_outer_warm_up_are_plain_averaging(sweep):
    average = sweep.simulate(_run(sweep, codec=None, outer_lr=1.0, outer_mu=0.0))
    held_back = sweep.simulate(_run(sweep, codec=None, outer_lr=0.7, outer_mu=0.9, outer_warmup=2))
    momentum = sweep.simulate(_run(sweep, codec=None, outer_lr=0.7, outer_mu=0.9, outer_warmup=1))
    assert held_back["curve"] == average["curve"]  # both rounds held back: averaging exactly
    assert momentum["curve"][0] == average["curve"][0] and momentum["curve"][1] != average["curve"][1]


def test_a_warm_run_starts_from_the_seed_model(sweep):
    warm = {"steps": 3, "lr": 3e-3}
    seed = sweep._seed_model(load_task("charlm", **TINY), {k: v.float() for k, v in load_task("charlm", **TINY).build_model().state_dict().items()}, 3, 3e-3)
    ddp = sweep.simulate(_run(sweep, mode="ddp", peers=1, steps=3, H=3, inner_lr=1e-12, warm=warm))
    task = load_task("charlm", **TINY)
    model = task.build_model()
    model.load_state_dict(seed)
    assert ddp["eval_loss"] == pytest.approx(task.evaluate(model, "cpu")["eval_loss"], abs=1e-4)  # lr ~0: the seed itself


def test_a_partitioned_reduction_sends_merged_slices_back_and_prices_the_owners_traffic(sweep):
    """reduce: the merged delta comes back re-encoded (a second compression: a different run),
    and traffic is each delta to its R owners plus the merged slices to the N - R others."""
    codec = {"encoder": "lowbit", "value_bits": 2, "block_size": 64}
    plain = sweep.simulate(_run(sweep, peers=4, codec=codec, outer_lr=1.0, outer_mu=0.0))
    part = sweep.simulate(_run(sweep, peers=4, codec=codec, outer_lr=1.0, outer_mu=0.0,
                               reduce={"value_bits": 2, "replicas": 2, "feedback": False}))  # fmt: skip
    assert part["curve"] != plain["curve"]  # the second compression changes the run (round 2 on)
    reduced = part["reduced_bytes_per_round"] * part["rounds"]
    expected = 2 * 3 / 4 * part["payload_bytes"] + (4 - 2) * reduced + part["control_bytes"]
    assert part["traffic_bytes"] == pytest.approx(expected, abs=1) and part["traffic_bytes"] < plain["traffic_bytes"]
