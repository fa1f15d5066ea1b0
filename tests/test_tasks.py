"""Task plugins: what every peer must agree on without talking, and how specs fail.

Guarantees checked here:
- charlm builds the identical seed model every time, without touching the global RNG;
- a peer's batch stream is a function of its peer seed, and different peers get different
  shards; no peer ever trains on an eval file; evaluation is deterministic;
- `load_task` accepts built-in names and `module:object` (instance, class, factory) and
  rejects everything else with a `TaskError`;
- the Hugging Face adapter trains and evaluates a tiny local GPT-2 with no network.
"""

from __future__ import annotations

import itertools
import json
import sys
import types

import pytest
import torch

from p2pmodel.errors import P2PModelError
from p2pmodel.tasks import Task, TaskError, batch_size_of, load_task
from p2pmodel.tasks.charlm import CharLMTask

SMALL = dict(n_layer=1, n_embd=32, n_head=2, context=16, batch_size=4, train_bytes=50_000, eval_batches=2)


@pytest.fixture(scope="module")
def charlm() -> CharLMTask:
    return CharLMTask(**SMALL)


def _take(it, n):
    return list(itertools.islice(it, n))


# ---------------------------------------------------------------- charlm


def test_charlm_is_a_task(charlm):
    assert isinstance(charlm, Task)


def test_charlm_builds_identical_models(charlm):
    a, b = charlm.build_model().state_dict(), charlm.build_model().state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_charlm_seed_changes_the_model():
    a = CharLMTask(**SMALL).build_model().state_dict()
    b = CharLMTask(**SMALL, seed=1).build_model().state_dict()
    assert not torch.equal(a["tok_emb.weight"], b["tok_emb.weight"])


def test_charlm_build_leaves_global_rng_alone(charlm):
    before = torch.get_rng_state()
    charlm.build_model()
    assert torch.equal(torch.get_rng_state(), before)


def test_charlm_ties_output_to_input_embedding(charlm):
    model = charlm.build_model()
    assert not any("head" in k for k in model.state_dict())  # one tensor, stored once
    with torch.no_grad():
        model.tok_emb.weight.zero_()
        logits = model(torch.zeros(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, 256) and not logits.any()  # the output projection is tok_emb


def test_same_peer_seed_gives_same_batches(charlm):
    a = _take(charlm.batches(3, "cpu"), 3)
    b = _take(charlm.batches(3, "cpu"), 3)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_targets_are_inputs_shifted_by_one(charlm):
    x, y = next(charlm.batches(0, "cpu"))
    assert x.shape == y.shape == (SMALL["batch_size"], SMALL["context"])
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_different_peer_seeds_read_different_files(charlm):
    assert charlm.train_files(0)[:20] != charlm.train_files(1)[:20]


def test_different_peer_seeds_give_different_batches(charlm):
    (xa, _), (xb, _) = next(charlm.batches(0, "cpu")), next(charlm.batches(1, "cpu"))
    assert not torch.equal(xa, xb)


def test_eval_files_are_never_training_files(charlm):
    evals = set(charlm.eval_files())
    assert evals, "the eval shard must not be empty"
    for peer in range(4):
        assert evals.isdisjoint(charlm.train_files(peer))


def test_eval_shard_is_a_small_share_of_the_corpus(charlm):
    n_eval, n_train = len(charlm.eval_files()), len(charlm.train_files(0))
    assert 0.02 < n_eval / (n_eval + n_train) < 0.15


def test_evaluate_is_deterministic_and_restores_mode(charlm):
    model = charlm.build_model().train()
    first, second = charlm.evaluate(model, "cpu"), charlm.evaluate(model, "cpu")
    assert first == second
    assert model.training


def test_untrained_eval_loss_is_near_uniform(charlm):
    loss = charlm.evaluate(charlm.build_model(), "cpu")["eval_loss"]
    assert abs(loss - torch.log(torch.tensor(256.0)).item()) < 0.5


def test_charlm_config_round_trips_through_json(charlm):
    rebuilt = load_task("charlm", **json.loads(json.dumps(charlm.config())))
    assert rebuilt.config() == charlm.config()


def test_charlm_rejects_heads_that_do_not_divide_width():
    with pytest.raises(TaskError, match="divisible"):
        CharLMTask(n_embd=30, n_head=4)


def test_charlm_reads_a_given_corpus_folder(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 50)
    task = CharLMTask(**SMALL, data_dir=str(tmp_path))
    x, _ = next(task.batches(0, "cpu"))
    assert bytes(x[0].tolist()).decode().isascii()


def test_batch_size_of_counts_the_leading_dimension(charlm):
    assert batch_size_of(next(charlm.batches(0, "cpu"))) == SMALL["batch_size"]


# ---------------------------------------------------------------- load_task


def _plugin_module(monkeypatch) -> types.ModuleType:
    mod = types.ModuleType("fake_plugins")
    mod.instance = CharLMTask(**SMALL)
    mod.TaskClass = CharLMTask
    mod.factory = lambda width=32: CharLMTask(**{**SMALL, "n_embd": width})
    mod.not_a_task = 42
    mod.builds_junk = lambda: object()
    monkeypatch.setitem(sys.modules, "fake_plugins", mod)
    return mod


def test_load_task_returns_an_instance_as_is(monkeypatch):
    mod = _plugin_module(monkeypatch)
    assert load_task("fake_plugins:instance") is mod.instance


def test_load_task_calls_a_class_with_options(monkeypatch):
    _plugin_module(monkeypatch)
    assert load_task("fake_plugins:TaskClass", **SMALL).config()["n_embd"] == SMALL["n_embd"]


def test_load_task_calls_a_factory_with_options(monkeypatch):
    _plugin_module(monkeypatch)
    assert load_task("fake_plugins:factory", width=64).config()["n_embd"] == 64


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("", "expected"),
        ("no_such_builtin", "not a built-in"),
        ("fake_plugins:", "not a built-in"),
        (":instance", "not a built-in"),
        ("no_such_module_xyz:task", "not found"),
        ("fake_plugins:missing", "no attribute"),
        ("fake_plugins:not_a_task", "not a task"),
        ("fake_plugins:builds_junk", "lacks"),
    ],
)
def test_load_task_rejects_bad_specs_with_a_task_error(monkeypatch, spec, reason):
    _plugin_module(monkeypatch)
    with pytest.raises(TaskError, match=reason) as info:
        load_task(spec)
    assert isinstance(info.value, P2PModelError) and info.value.spec == spec


def test_load_task_rejects_unknown_options():
    with pytest.raises(TaskError, match="bad options"):
        load_task("charlm", no_such_option=1)


def test_load_task_rejects_options_for_an_instance(monkeypatch):
    _plugin_module(monkeypatch)
    with pytest.raises(TaskError, match="takes no options"):
        load_task("fake_plugins:instance", seed=1)


# ---------------------------------------------------------------- Hugging Face adapter


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    config = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "model")
    text = root / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    return root / "model", text


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_hf_task_loads_through_load_task(tiny_gpt2, offline):
    model_dir, text = tiny_gpt2
    task = load_task("hf", model_dir=str(model_dir), text_files=[str(text)], context=16, batch_size=4)
    assert isinstance(task, Task) and task.tokenizer is None  # no tokenizer files: bytes


def test_hf_task_trains_a_tiny_gpt2(tiny_gpt2, offline):
    from p2pmodel.training import InnerTrainer

    model_dir, text = tiny_gpt2
    task = load_task("hf", model_dir=str(model_dir), text_files=[str(text)], context=16, batch_size=8)
    model = task.build_model()
    before = task.evaluate(model, "cpu")["eval_loss"]
    InnerTrainer(task, model, "cpu", lr=1e-2, cpu_threads=1).train(15)
    assert task.evaluate(model, "cpu")["eval_loss"] < before - 0.5


def test_hf_task_builds_identical_models(tiny_gpt2, offline):
    model_dir, text = tiny_gpt2
    task = load_task("hf", model_dir=str(model_dir), text_files=[str(text)], context=16)
    a, b = task.build_model().state_dict(), task.build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_task_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(TaskError, match="no config.json"):
        load_task("hf", model_dir=str(tmp_path), text_files=[])


def test_hf_task_rejects_too_little_text(tiny_gpt2, offline, tmp_path):
    model_dir, _ = tiny_gpt2
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(TaskError, match="tokens of text"):
        load_task("hf", model_dir=str(model_dir), text_files=[str(tmp_path / "short.txt")], context=16)
