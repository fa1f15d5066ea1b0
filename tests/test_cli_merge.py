"""`p2pmodel merge` passes its flags to the merge engine and reports errors as one line.

Two runs go through a real subprocess (the installed command, exit codes, stdout/stderr);
the flag-mapping checks call `p2pmodel.cli.main` in-process, which is the same code path
without the interpreter start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2pmodel.cli import main
from p2pmodel.merge import merge_tensor


@pytest.fixture
def zoo(tmp_path) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    tensors = [base] + [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    for name, t in zip(["base", "a", "b", "c"], tensors):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"name": name}))
    return tmp_path, tensors


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed `p2pmodel` command (next to this interpreter) as a child process."""
    command = Path(sys.executable).parent / "p2pmodel"
    argv = [str(command)] if command.exists() else [sys.executable, "-c", "import sys; from p2pmodel.cli import main; sys.exit(main())"]
    return subprocess.run([*argv, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_merge_subprocess_writes_the_merged_model(zoo):
    root, (base, *models) = zoo
    proc = run_cli("merge", "--method", "ties", "--base", "base", "a", "b", "c", "--weights", "1", "0.5", "0.25",
                   "--density", "0.5", "-o", "out", "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tensors"] == 2
    out = load_file(str(root / "out" / "model.safetensors"))
    want = merge_tensor("ties", [m["w"] for m in models], base["w"], weights=[1, 0.5, 0.25], density=0.5)
    torch.testing.assert_close(out["w"], want, rtol=0, atol=0)


def test_merge_subprocess_into_an_existing_folder_fails_with_one_line(zoo):
    root, _ = zoo
    (root / "out").mkdir()
    proc = run_cli("merge", "--method", "linear", "a", "b", "-o", "out", cwd=root)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["p2pmodel: error: output out already exists (pass --force to replace it)"]
    assert list((root / "out").iterdir()) == []


def test_no_normalize_flag_reaches_the_method(zoo, monkeypatch):
    root, (base, *models) = zoo
    monkeypatch.chdir(root)
    assert main(["merge", "--method", "linear", "a", "b", "--weights", "0.5", "0.25", "--no-normalize", "-o", "out"]) == 0
    want = merge_tensor("linear", [models[0]["w"], models[1]["w"]], None, weights=[0.5, 0.25], normalize=False)
    torch.testing.assert_close(load_file("out/model.safetensors")["w"], want, rtol=0, atol=0)


def test_seed_flag_makes_dare_reproducible(zoo, monkeypatch):
    root, _ = zoo
    monkeypatch.chdir(root)
    for out in ("x", "y"):
        assert main(["merge", "--method", "dare_ties", "--base", "base", "a", "b", "--density", "0.5",
                     "--seed", "9", "-o", out]) == 0
    assert torch.equal(load_file("x/model.safetensors")["w"], load_file("y/model.safetensors")["w"])


def test_a_flag_the_method_does_not_take_is_a_usage_error(zoo, monkeypatch, capsys):
    root, _ = zoo
    monkeypatch.chdir(root)
    assert main(["merge", "--method", "slerp", "a", "b", "--t", "0.5", "--density", "0.3", "-o", "out"]) == 2
    assert "takes: t" in capsys.readouterr().err
    assert not (root / "out").exists()


def test_robust_flags_reach_the_method(zoo, monkeypatch):
    root, (base, *models) = zoo
    monkeypatch.chdir(root)
    assert main(["merge", "--method", "centered_clip", "--base", "base", "a", "b", "c", "--tau", "0.05",
                 "--iterations", "2", "--init", "zero", "-o", "out"]) == 0
    want = merge_tensor("centered_clip", [m["w"] for m in models], base["w"], tau=0.05, iterations=2, init="zero")
    torch.testing.assert_close(load_file("out/model.safetensors")["w"], want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- lineage refs and --commit


@pytest.fixture
def repo(zoo, monkeypatch):
    """A repository: base on main, then `a` on main and `b` on branch feat (both from base)."""
    root, tensors = zoo
    monkeypatch.chdir(root)
    assert main(["init"]) == 0
    assert main(["commit", "base", "-m", "base"]) == 0
    assert main(["branch", "feat"]) == 0
    assert main(["commit", "a", "-m", "main work"]) == 0
    assert main(["commit", "b", "-m", "feature work", "--branch", "feat"]) == 0
    return root, tensors


def test_revisions_are_inputs_as_paths_are(repo):
    root, (base, a, b, _) = repo
    assert main(["merge", "--method", "ties", "--base", "main~1", "main", "feat", "--density", "0.5", "-o", "out"]) == 0
    want = merge_tensor("ties", [a["w"], b["w"]], base["w"], density=0.5)
    assert torch.equal(load_file("out/model.safetensors")["w"], want)


def test_commit_records_a_version_with_both_parents_and_its_merge_spec(repo):
    from p2pmodel.lineage import LineageStore

    root, (base, a, b, _) = repo
    store = LineageStore.open(".p2pmodel")
    main_tip, feat_tip, base_id = store.resolve("main"), store.resolve("feat"), store.resolve("main~1")
    store.close()
    assert main(["merge", "--method", "dare_ties", "--base", "main~1", "main", "feat", "--density", "0.5",
                 "--seed", "3", "--commit"]) == 0
    store = LineageStore.open(".p2pmodel")
    v = store.get_version("main")
    assert v.parents == (main_tip, feat_tip)  # the branch's own tip first, as git merge
    assert v.merge["method"] == "dare_ties" and list(v.merge["inputs"]) == [main_tip, feat_tip]
    assert v.merge["base"] == base_id and v.merge["seed"] == 3 and list(v.merge["params"]["density"]) == [0.5, 0.5]
    assert set(store.state_dict("main")) == {"w", "b"}
    assert not (root / "out").exists()  # without -o nothing is left outside the repository


def test_log_graph_draws_the_committed_merge_as_git_does(repo, capsys):
    assert main(["merge", "--method", "ties", "--base", "main~1", "main", "feat", "--commit"]) == 0
    capsys.readouterr()
    assert main(["log", "--graph"]) == 0
    shape = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()]
    assert shape == ["*", "|\\", "| *", "* |", "|/", "*"]


def test_commit_refuses_a_branch_whose_tip_is_not_merged(repo, capsys):
    assert main(["merge", "--method", "ties", "--base", "main~1", "main~1", "feat", "--commit", "--branch", "main"]) == 2
    assert "not among the merged versions" in capsys.readouterr().err


def test_an_input_that_is_neither_path_nor_revision_is_one_line(repo, capsys):
    assert main(["merge", "--method", "linear", "main", "nosuch", "-o", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nosuch' is neither a file or folder nor a version" in err[0]


# ----------------------------------------------------------------------------- mergekit recipes


def test_a_mergekit_recipe_runs_unchanged(zoo, monkeypatch):
    root, (base, *models) = zoo
    monkeypatch.chdir(root)
    (root / "r.yml").write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n"
        "  - model: a\n    parameters: {weight: 0.7, density: 0.5}\n"
        "  - model: b\n    parameters: {weight: 0.3}\n"
        "parameters: {density: 0.8, normalize: true, int8_mask: true}\ndtype: float32\n")
    assert main(["merge", "--config", "r.yml", "-o", "out"]) == 0
    want = merge_tensor("ties", [m["w"] for m in models[:2]], base["w"], weights=[0.7, 0.3], density=[0.5, 0.8], normalize=True)
    assert torch.equal(load_file("out/model.safetensors")["w"], want)


def test_a_recipe_key_we_cannot_honour_is_one_line_naming_it(zoo, monkeypatch, capsys):
    root, _ = zoo
    monkeypatch.chdir(root)
    (root / "r.yml").write_text("merge_method: ties\nbase_model: base\nmodels:\n"
                                "  - model: a\n    parameters: {weight: 1, densty: 0.5}\n")
    assert main(["merge", "--config", "r.yml", "-o", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["p2pmodel: error: r.yml: models[0].parameters.densty: not a per-model parameter of ties here "
                   "(it takes: density, weight)"]
