"""`p2pmodel seed` and the event manifest it writes (p2pmodel.cli.seed, daemon.manifest,
daemon.config).

Guarantees:
- the manifest `seed` writes loads back (`load_event`) as exactly the default event plus the
  `--set` overrides, with the founder's identity as seeder and the seed version it committed:
  same `EventConfig`, same event_hash;
- it lists every setting with its field's help as a comment, and reads as TOML or JSON alike;
- the manifest names the seed version on `main` of the founder's lineage (joiners fetch it by id);
- seeding from a Hugging Face folder keeps the model, `config.json` and tokenizer files in the
  seed version (it exports as a folder `from_pretrained` loads) and no path in the event;
- every setting that cannot work is a `ConfigError` naming its key (`codec.densty`), one line;
- on the command line (`seed`, and `join` before it touches its home) such an error is one
  line on stderr and exit code 2; a failed seed leaves no folder behind.

No swarm runs here: the tasks are tiny and built in-process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from p2pmodel.daemon.identity import load_identity
from p2pmodel.cli import main
from p2pmodel.daemon.config import ConfigError, EventConfig, event_from_mapping, load_event
from p2pmodel.daemon.manifest import event_to_toml, with_settings
from p2pmodel.daemon.node import NodeError, seed_version
from p2pmodel.lineage import LineageStore
from p2pmodel.tasks import load_task

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "context": 16, "train_bytes": 20_000, "eval_bytes": 4096, "eval_batches": 1}
TINY_SETS = [a for k, v in TINY.items() for a in ("--set", f"task_options.{k}={v}")]
OVERRIDES = ["inner_steps=20", "codec.value_bits=1", "merge_method=ties", "merge_params.density=0.5", "collect_window=12.5"]
PEER = "ab" * 20  # a well-formed peer id


def seed(*args: str) -> int:
    return main(["seed", "--task", "charlm", "--name", "spec", *TINY_SETS, *args])


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seed") / "event"
    assert seed(*[a for o in OVERRIDES for a in ("--set", o)], "-o", str(out)) == 0
    return out


# ------------------------------------------------------------------ what seed writes


def test_manifest_loads_as_the_defaults_plus_the_overrides(seeded):
    founder = load_identity(seeded / "founder" / "identity.pem")
    with LineageStore.open(seeded / "founder" / "lineage") as store:
        seed_id = store.resolve("main")
    expected = dataclasses.replace(
        EventConfig(),
        name="spec",
        seeder=founder.peer_id,
        seed_version=seed_id,
        task_options=TINY,
        inner_steps=20,
        codec={"encoder": "lowbit", "value_bits": 1, "block_size": 1024},
        merge_method="ties",
        merge_params={"density": 0.5},
        collect_window=12.5,
    )
    event = load_event(str(seeded / "event.toml"))
    assert event == expected
    assert event.event_hash() == expected.event_hash()


def test_manifest_lists_every_setting_under_its_help_comment(seeded):
    text = (seeded / "event.toml").read_text()
    assert set(tomllib.loads(text)) == {f.name for f in dataclasses.fields(EventConfig)}
    for f in dataclasses.fields(EventConfig):
        assert f"# {f.metadata['help']}\n" in text, f.name


def test_manifest_shows_the_defaults_of_what_a_table_leaves_out(seeded):
    text = (seeded / "event.toml").read_text()
    assert "# topk_scope = \"tensor\"" in text  # a codec field the event does not set
    assert "# consensus = \"sum\"" in text  # a parameter of ties the event does not set
    assert "inner_steps = 20  # default: 50" in text


def test_the_manifest_names_the_seed_version_on_the_founders_main(seeded):
    event = load_event(str(seeded / "event.toml"))
    with LineageStore.open(seeded / "founder" / "lineage") as founder:
        seed = founder.get_version("main")
        assert (seed.id, seed.parents) == (event.seed_version, ())
        model = load_task(event.task, **event.task_options).build_model()
        assert set(seed.tensors) == set(model.state_dict())


def test_a_node_without_the_named_seed_version_refuses_to_build_one(seeded, tmp_path):
    # the seed comes from peers by id (daemon/joining.py); building it locally could differ
    event = load_event(str(seeded / "event.toml"))
    with LineageStore.init(tmp_path / "joiner") as joiner, pytest.raises(NodeError, match="seed version"):
        seed_version(joiner, load_task(event.task, **event.task_options), event)


def test_seed_prints_the_line_that_starts_the_founders_node(tmp_path, capsys):
    assert seed("-o", str(tmp_path / "ev")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1].strip()
    assert last == f"p2pmodel join --home {tmp_path / 'ev' / 'founder'} --event {tmp_path / 'ev' / 'event.toml'}"


def test_set_seeder_names_the_founder_and_writes_no_identity(tmp_path):
    assert seed("--set", f"seeder={PEER}", "-o", str(tmp_path / "ev")) == 0
    assert load_event(str(tmp_path / "ev" / "event.toml")).seeder == PEER
    assert not (tmp_path / "ev" / "founder" / "identity.pem").exists()


def test_seed_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "notes.txt").write_text("mine")
    assert seed("-o", str(tmp_path / "ev")) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "ev").iterdir()] == ["notes.txt"]


def test_a_failed_seed_leaves_no_folder_behind(tmp_path):
    # the task fails to build after the folder was created
    assert main(["seed", "--task", "no_such_module:task", "--name", "x", "-o", str(tmp_path / "ev")]) == 2
    assert not (tmp_path / "ev").exists()


# ------------------------------------------------------------------ the manifest format


@pytest.mark.parametrize(
    "event",
    [
        EventConfig(),
        EventConfig(name="q.x_1", inner_lr=1e-05, outer_lr=0.7, seeder=PEER, allowed_peers=[PEER, "cd" * 20]),
        EventConfig(task="pkg.mod:obj", task_options={"text": 'a "quoted" é\x7f\n', "nested": {"k": [1, 2.5]}}),
        EventConfig(codec={"encoder": "topk", "density": 0.05, "feedback_decay": 0.9}, train_ahead=False),
    ],
    ids=["defaults", "numbers-and-peers", "odd-strings", "topk"],
)
def test_toml_round_trips_the_event(event, tmp_path):
    path = tmp_path / "event.toml"
    path.write_text(event_to_toml(event))
    assert load_event(str(path)).event_hash() == event.event_hash()


def test_json_manifests_still_load(tmp_path):
    path = tmp_path / "event.json"
    path.write_text(json.dumps({"name": "j", "inner_steps": 7}))
    assert load_event(str(path)) == EventConfig(name="j", inner_steps=7)


def test_a_codec_number_written_as_integer_is_the_same_event():
    assert event_from_mapping({"codec": {"feedback_decay": 1}}) == event_from_mapping({"codec": {"feedback_decay": 1.0}})


def test_unparsable_toml_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "event.toml"
    path.write_text("inner_steps = = 3\n")
    with pytest.raises(ConfigError) as e:
        load_event(str(path))
    assert e.value.source == str(path) and "\n" not in str(e.value)


def test_a_nested_typo_in_a_toml_file_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "event.toml"
    path.write_text('name = "t"\n[codec]\nencoder = "topk"\ndensty = 0.1\n')
    with pytest.raises(ConfigError) as e:
        load_event(str(path))
    assert e.value.key == "codec.densty"
    assert str(e.value) == f"{path}: codec.densty: unknown key (did you mean density?)"


# ------------------------------------------------------------------ --set


@pytest.mark.parametrize(
    "item, key, value",
    [
        ("inner_steps=20", "inner_steps", 20),
        ("inner_lr=1e-3", "inner_lr", 1e-3),
        ("train_ahead=false", "train_ahead", False),
        ("name=my-event", "name", "my-event"),  # bare text is a string
        ("seeder=1234", "seeder", "1234"),  # a string setting stays text even when it looks like a number
        ('allowed_peers=["a", "b"]', "allowed_peers", ["a", "b"]),
        ('codec={ encoder = "int8" }', "codec", {"encoder": "int8"}),  # a whole table replaces the default
    ],
)
def test_set_reads_values_as_toml(item, key, value):
    assert with_settings(dataclasses.asdict(EventConfig()), [item])[key] == value


def test_set_with_a_dotted_key_changes_one_entry_of_a_table():
    data = with_settings(dataclasses.asdict(EventConfig()), ["codec.value_bits=1", "task_options.data_dir=/d"])
    assert data["codec"] == {"encoder": "lowbit", "value_bits": 1, "block_size": 1024}
    assert data["task_options"] == {"data_dir": "/d"}


@pytest.mark.parametrize("item, key", [("inner_steps", "inner_steps"), ("inner_steps.x=1", "inner_steps.x")])
def test_a_malformed_set_names_the_key(item, key):
    with pytest.raises(ConfigError) as e:
        with_settings(dataclasses.asdict(EventConfig()), [item])
    assert e.value.key == key


# ------------------------------------------------------------------ every invalid setting


INVALID = [
    ({"nme": "x"}, "nme"),
    ({"codec": {"densty": 0.1}}, "codec.densty"),
    ({"codec": {"encoder": "zip"}}, "codec.encoder"),
    ({"codec": {"encoder": "lowbit", "value_bits": 3}}, "codec.value_bits"),
    ({"codec": {"value_bits": "8"}}, "codec.value_bits"),
    ({"codec": []}, "codec"),
    ({"merge_method": "tie"}, "merge_method"),
    ({"merge_method": "slerp"}, "merge_method"),  # merges exactly two models
    ({"merge_method": "ties", "merge_params": {"density": 2.0}}, "merge_params.density"),
    ({"merge_method": "ties", "merge_params": {"density": [0.5, 0.5]}}, "merge_params.density"),
    ({"merge_method": "task_arithmetic", "merge_params": {"lambda": "big"}}, "merge_params.lambda"),
    ({"merge_params": {"densty": 0.5}}, "merge_params.densty"),
    ({"merge_params": {"weights": 1.0}}, "merge_params.weights"),  # the swarm weighs by samples
    ({"collect_window": 180.0}, "collect_window"),  # == round_deadline: no round could commit
    ({"collect_window": 0}, "collect_window"),
    ({"proposal_timeout": -1}, "proposal_timeout"),
    ({"round_deadline": 0}, "round_deadline"),
    ({"inner_steps": 0}, "inner_steps"),
    ({"inner_steps": 2.5}, "inner_steps"),
    ({"inner_steps": True}, "inner_steps"),
    ({"inner_lr": float("nan")}, "inner_lr"),
    ({"outer_lr": 0}, "outer_lr"),
    ({"outer_momentum": 1.0}, "outer_momentum"),
    ({"min_members": 0}, "min_members"),
    ({"lr_warmup_steps": -1}, "lr_warmup_steps"),
    ({"lr_decay_steps": -5}, "lr_decay_steps"),
    ({"lr_decay_steps": 100, "lr_warmup_steps": 100}, "lr_warmup_steps"),  # decay would start before warm-up ends
    ({"lr_final": 1.5}, "lr_final"),
    ({"ci_max_regression": -0.1}, "ci_max_regression"),
    ({"ci_window": 0}, "ci_window"),
    ({"screen_min_cosine": 2.0}, "screen_min_cosine"),
    ({"screen_relative_cosine": -0.5}, "screen_relative_cosine"),
    ({"screen_max_norm_ratio": 0.5}, "screen_max_norm_ratio"),
    ({"max_delta_bytes": 0}, "max_delta_bytes"),
    ({"seeder": "founder"}, "seeder"),
    ({"allowed_peers": ["x"]}, "allowed_peers"),
    ({"name": ""}, "name"),
    ({"name": "a/b"}, "name"),
    ({"task": " "}, "task"),
    ({"task_options": []}, "task_options"),
]


@pytest.mark.parametrize("overrides, key", INVALID, ids=[k for _, k in INVALID])
def test_an_invalid_setting_is_a_config_error_naming_its_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        event_from_mapping(overrides, source="m.toml")
    assert e.value.key == key
    assert str(e.value).startswith(f"m.toml: {key}: ") and "\n" not in str(e.value)


def test_the_default_event_and_the_demo_timing_are_valid():
    from p2pmodel.cli.swarm import _demo_event

    assert event_from_mapping({}) == EventConfig()
    event_from_mapping(_demo_event(30, 3, 6))


# ------------------------------------------------------------------ the command line


def test_seed_with_a_nested_typo_exits_2_with_one_line(tmp_path, capsys):
    assert seed("--set", "codec.densty=0.1", "-o", str(tmp_path / "ev")) == 2
    assert capsys.readouterr().err == "p2pmodel: error: event: codec.densty: unknown key (did you mean density?)\n"
    assert not (tmp_path / "ev").exists()


def test_join_with_a_nested_typo_exits_2_before_touching_its_home(tmp_path, capsys):
    bad = tmp_path / "event.toml"
    bad.write_text('[codec]\nencoder = "topk"\ndensty = 0.1\n')
    assert main(["join", "--event", str(bad), "--home", str(tmp_path / "home")]) == 2
    assert capsys.readouterr().err == f"p2pmodel: error: {bad}: codec.densty: unknown key (did you mean density?)\n"
    assert not (tmp_path / "home").exists()


def test_seed_error_in_a_real_process_is_one_line_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("p2pmodel")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "p2pmodel.cli"]
    proc = subprocess.run([*cmd, "seed", "--task", "charlm", "--name", "x", "--set", "merge_method=tie", "-o", str(tmp_path / "ev")], check=False,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "merge_method" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ seeding a task's event from a trained version


def _trained_repo(tmp_path: Path, **options) -> tuple[Path, dict]:
    """A lineage whose main holds task charlm's model, its weights moved as training would."""
    import torch

    state = {k: v + 0.01 for k, v in load_task("charlm", **{**TINY, **options}).build_model().state_dict().items()}
    repo = tmp_path / "repo"
    with LineageStore.init(repo) as store:
        store.commit(state, parents=[], message="trained alone")
    return repo, state


def test_seed_task_from_a_trained_version_starts_the_event_from_its_tensors(tmp_path):
    import torch

    from p2pmodel.daemon.config import TRAINED_SEED_OUTER

    repo, state = _trained_repo(tmp_path)
    assert main(["--repo", str(repo), "seed", "--task", "charlm", "--from", "main", "--name", "warm", *TINY_SETS, "-o", str(tmp_path / "ev")]) == 0
    event = load_event(str(tmp_path / "ev" / "event.toml"))
    assert event.task == "charlm" and event.outer_momentum == TRAINED_SEED_OUTER["outer_momentum"]
    with LineageStore.open(tmp_path / "ev" / "founder" / "lineage") as store:
        seed_state = store.state_dict(event.seed_version)
    assert seed_state.keys() == state.keys() and all(torch.equal(seed_state[k], v) for k, v in state.items())


def test_seed_task_from_a_version_of_another_model_is_refused_and_writes_nothing(tmp_path, capsys):
    repo, _ = _trained_repo(tmp_path, n_embd=16)
    assert main(["--repo", str(repo), "seed", "--task", "charlm", "--from", "main", "--name", "warm", *TINY_SETS, "-o", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "--from: tensor" in err and "task charlm's model has" in err and not (tmp_path / "ev").exists()


def test_seed_needs_a_task_or_a_model(tmp_path, capsys):
    assert main(["seed", "--name", "x", "-o", str(tmp_path / "ev")]) == 2
    assert "--task" in capsys.readouterr().err


# ------------------------------------------------------------------ seeding from a Hugging Face model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny GPT-2 folder (built here, nothing downloaded) and a text file to train on."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    import torch

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "tiny")
    (root / "data.txt").write_text("a tiny corpus for a tiny model. " * 100)
    return root / "tiny", root / "data.txt"


def _seed_hf(model: Path, out: Path, *extra: str) -> int:
    return main(["seed", "--from", str(model), "--name", "hf", "--set", "task_options.context=32", *extra, "-o", str(out)])


def test_seed_from_a_hf_folder_holds_the_model_and_no_path_in_the_event(hf_folder, tmp_path):
    model, _ = hf_folder
    out = tmp_path / "ev"
    assert _seed_hf(model, out) == 0
    event = load_event(str(out / "event.toml"))
    assert event.task == "hf" and event.task_options == {"context": 32}  # no model_dir, no text_files
    with LineageStore.open(out / "founder" / "lineage") as store:
        seed = store.get_version(event.seed_version)
        assert store.get_file(seed.files["config.json"]) == (model / "config.json").read_bytes()
        assert "lm_head.weight" in seed.tensors  # tied: under both names, as from_config's model has it


def test_the_hf_seed_version_exports_as_a_folder_from_pretrained_loads(hf_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    model, _ = hf_folder
    out = tmp_path / "ev"
    assert _seed_hf(model, out) == 0
    assert main(["--repo", str(out / "founder" / "lineage"), "export", "main", "-o", str(tmp_path / "x"), "--format", "hf"]) == 0
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "x").eval()(ids).logits
        want = transformers.AutoModelForCausalLM.from_pretrained(model).eval()(ids).logits
    assert torch.equal(got, want)


def test_seed_from_a_ref_holds_that_versions_model(hf_folder, tmp_path):
    model, _ = hf_folder
    repo, out = tmp_path / "repo", tmp_path / "ev"
    assert main(["--repo", str(repo), "init"]) == 0
    assert main(["--repo", str(repo), "commit", str(model), "-m", "base"]) == 0
    assert main(["--repo", str(repo), "seed", "--from", "main", "--name", "hf", "--set", "task_options.context=32", "-o", str(out)]) == 0
    event = load_event(str(out / "event.toml"))
    with LineageStore.open(repo) as src, LineageStore.open(out / "founder" / "lineage") as dst:
        base, seed = src.get_version("main"), dst.get_version(event.seed_version)
        assert all(seed.tensors[n].oid == e.oid for n, e in base.tensors.items())
        assert seed.files["config.json"] == base.files["config.json"]
    assert sorted(p.name for p in out.iterdir()) == ["event.toml", "founder"]  # no model folder: the seed holds it


def test_an_event_seeded_from_a_trained_model_takes_outer_momentum_unless_set(hf_folder, tmp_path):
    from p2pmodel.daemon.config import TRAINED_SEED_OUTER

    assert _seed_hf(hf_folder[0], tmp_path / "a") == 0
    event = load_event(str(tmp_path / "a" / "event.toml"))
    assert (event.outer_lr, event.outer_momentum) == (TRAINED_SEED_OUTER["outer_lr"], TRAINED_SEED_OUTER["outer_momentum"])
    assert event.outer_momentum > 0 and EventConfig().outer_momentum == 0  # a --task event averages
    assert _seed_hf(hf_folder[0], tmp_path / "b", "--set", "outer_momentum=0", "--set", "outer_lr=1") == 0
    event = load_event(str(tmp_path / "b" / "event.toml"))
    assert (event.outer_lr, event.outer_momentum) == (1.0, 0.0)


@pytest.mark.parametrize("key", ["text_files", "model_dir"])
def test_a_path_in_an_hf_events_task_options_is_refused(hf_folder, tmp_path, capsys, key):
    model, text = hf_folder
    assert _seed_hf(model, tmp_path / "ev", "--set", f'task_options.{key}=["{text}"]') == 2
    assert key in capsys.readouterr().err and not (tmp_path / "ev").exists()


def test_an_hf_context_beyond_the_models_positions_is_refused_at_seed(hf_folder, tmp_path, capsys):
    assert _seed_hf(hf_folder[0], tmp_path / "ev", "--set", "task_options.context=1000") == 2
    assert "context 1000" in capsys.readouterr().err
