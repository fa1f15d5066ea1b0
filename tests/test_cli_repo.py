"""The repository commands of the `p2pmodel` command line (p2pmodel.cli.repo).

Guarantees: init/commit/log/show/diff/export/branch/tag/verify/gc work end to end on a real
repository folder; `--json` output has the documented fields and values (`log --json`
lists each version's contributors); `log --graph` draws branches and merges and shows per
version its round, eval loss, contributor count, CI result (a certificate's votes) and the
deltas its merge screened out, each only when recorded; user errors (pickle input, unknown ref, existing output, bad
flags, damaged repository) exit non-zero with one line naming the problem and no traceback.

Starting Python with torch costs seconds, so the process-level properties (entry point,
exit codes, stderr without tracebacks) are checked with real `p2pmodel` subprocesses, and
the remaining behaviour through `p2pmodel.cli.main` in-process, which is the same code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from p2pmodel.cli import main
from p2pmodel.cli.repo import draw_graph
from p2pmodel.lineage import LineageStore

EXE = Path(sys.executable).with_name("p2pmodel")
CMD = [str(EXE)] if EXE.exists() else [sys.executable, "-c", "import sys; from p2pmodel.cli import main; sys.exit(main())"]


def run(*args: str, repo: Path, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run `p2pmodel --repo REPO ARGS` as a subprocess; assert its exit code if `check` is set."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*CMD, "--repo", str(repo), *args], capture_output=True, text=True, env=env, timeout=120)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def call(capsys, *args: str, repo: Path) -> tuple[int, str, str]:
    """Run the same command in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["--repo", str(repo), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(16, 8, generator=g), "head.bias": torch.zeros(16),
            "layer.weight": torch.randn(8, 8, generator=g)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A repository with two versions on main: v1 (a folder with config.json), v2 (one tensor changed)."""
    base = tmp_path_factory.mktemp("cli")
    repo = base / "repo"
    (base / "v1").mkdir()
    save_file(_model(0), base / "v1" / "model.safetensors")
    (base / "v1" / "config.json").write_text('{"model_type": "toy"}')
    v2 = _model(0)
    v2["layer.weight"][0, :4] += 1.0
    save_file(v2, base / "v2.safetensors")
    assert main(["--repo", str(repo), "init"]) == 0
    assert main(["--repo", str(repo), "commit", str(base / "v1"), "-m", "first"]) == 0
    assert main(["--repo", str(repo), "commit", str(base / "v2.safetensors"), "-m", "second",
                 "--metric", "eval_loss=2.5"]) == 0
    return repo


@pytest.fixture
def scratch(repo, tmp_path):
    """A private copy of the module repository, for commands that change or damage it."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    return copy


# ----------------------------------------------------------------------------- subprocess


def test_commit_prints_branch_and_short_id(repo, tmp_path):
    save_file(_model(1), tmp_path / "m.safetensors")
    scratch = tmp_path / "r"
    shutil.copytree(repo, scratch)
    proc = run("commit", str(tmp_path / "m.safetensors"), "-m", "third", repo=scratch)
    head = LineageStore.open(scratch).resolve("main")
    assert proc.stdout.splitlines()[0] == f"[main {head[:12]}] third"


def test_pickle_checkpoint_is_refused_with_a_conversion_hint(repo, tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    proc = run("commit", str(tmp_path / "model.pt"), "-m", "x", repo=repo, check=1)
    assert "weights_only=True" in proc.stderr and "safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_unknown_ref_is_one_line_error_without_traceback(repo):
    proc = run("show", "no-such-branch", repo=repo, check=1)
    assert proc.stderr.startswith("p2pmodel: error:") and "no-such-branch" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_verify_exits_nonzero_naming_a_corrupted_object(scratch):
    store = LineageStore.open(scratch)
    oid = store.get_version("main").tensors["layer.weight"].oid
    path = Path(store._path(oid))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = run("verify", repo=scratch, check=1)
    assert oid in proc.stderr and "corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_repair_from_another_repository_restores_corrupt_and_missing_objects(capsys, repo, scratch):
    store = LineageStore.open(scratch)
    v = store.get_version("main")
    corrupt, missing = v.tensors["layer.weight"].oid, v.tensors["emb.weight"].oid
    store.close()
    path = Path(scratch) / "objects" / corrupt[:2] / corrupt[2:]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    (Path(scratch) / "objects" / missing[:2] / missing[2:]).unlink()
    code, out, _ = call(capsys, "verify", "--json", "--repair-from", str(repo), repo=scratch)
    report = json.loads(out)
    assert code == 0 and report["ok"] and sorted(report["repaired"]) == sorted([corrupt, missing])
    code, out, _ = call(capsys, "verify", repo=scratch)
    assert code == 0 and out.strip().endswith("ok")


def test_verify_repair_from_a_repository_without_the_objects_still_fails(capsys, scratch, tmp_path):
    empty = tmp_path / "empty"
    assert call(capsys, "init", repo=empty)[0] == 0
    oid = LineageStore.open(scratch).get_version("main").tensors["layer.weight"].oid
    (Path(scratch) / "objects" / oid[:2] / oid[2:]).unlink()
    code, out, err = call(capsys, "verify", "--repair-from", str(empty), repo=scratch)
    assert code == 1 and oid in err and "repaired" not in out


# ----------------------------------------------------------------------------- in-process


def test_second_init_is_refused(capsys, repo):
    code, _, err = call(capsys, "init", repo=repo)
    assert code == 1 and "already exists" in err


def test_command_on_missing_repository_says_to_run_init(capsys, tmp_path):
    code, _, err = call(capsys, "log", repo=tmp_path / "nothing")
    assert code == 1 and "p2pmodel init" in err


def test_log_json_lists_versions_newest_first_with_metrics_and_refs(capsys, repo):
    code, out, _ = call(capsys, "log", "--json", repo=repo)
    entries = json.loads(out)
    assert code == 0 and [e["message"] for e in entries] == ["second", "first"]
    assert entries[0]["parents"] == [entries[1]["id"]] and entries[1]["parents"] == []
    assert entries[0]["metrics"] == {"eval_loss": 2.5} and entries[1]["metrics"] is None
    assert entries[0]["refs"] == ["refs/heads/main"] and entries[0]["head"] is True
    assert set(entries[0]) == {"id", "parents", "time", "message", "author", "round", "metrics",
                               "n_tensors", "refs", "head", "contributors", "pruned"}


def test_log_limit_shows_at_most_n(capsys, repo):
    code, out, _ = call(capsys, "log", "-n", "1", repo=repo)
    assert code == 0 and len(out.splitlines()) == 1 and "second" in out


def test_log_human_lines_are_aligned_with_short_ids(capsys, repo):
    _, out, _ = call(capsys, "log", repo=repo)
    ids = [e["id"] for e in json.loads(call(capsys, "log", "--json", repo=repo)[1])]
    lines = out.splitlines()
    assert [line[:12] for line in lines] == [i[:12] for i in ids]
    assert len({line.index("first" if "first" in line else "(HEAD") for line in lines}) == 1


def test_show_json_has_manifest_files_and_metrics(capsys, repo):
    code, out, _ = call(capsys, "show", "main", "--json", repo=repo)
    shown = json.loads(out)
    assert code == 0 and shown["message"] == "second" and shown["metrics"] == {"eval_loss": 2.5}
    assert shown["tensors"]["emb.weight"]["shape"] == [16, 8] and shown["tensors"]["emb.weight"]["dtype"] == "F32"
    assert shown["total_bytes"] == (16 * 8 + 16 + 8 * 8) * 4
    first = json.loads(call(capsys, "show", "main~1", "--json", repo=repo)[1])
    assert list(first["files"]) == ["config.json"] and shown["files"] == {}


def test_show_human_names_the_version_and_lists_tensors(capsys, repo):
    code, out, _ = call(capsys, "show", "main~1", repo=repo)
    assert code == 0 and out.startswith("version  ") and "first" in out
    assert "layer.weight" in out and "config.json" in out


def test_diff_json_reports_the_changed_tensor_exactly(capsys, repo):
    code, out, _ = call(capsys, "diff", "main~1", "main", "--json", repo=repo)
    report = json.loads(out)
    by_name = {t["name"]: t for t in report["tensors"]}
    a = _model(0)["layer.weight"]
    assert code == 0 and by_name["layer.weight"]["status"] == "changed"
    assert by_name["layer.weight"]["l2_change"] == pytest.approx(2.0)  # four entries moved by 1
    assert by_name["layer.weight"]["relative_change"] == pytest.approx(2.0 / a.double().norm().item())
    assert by_name["layer.weight"]["changed_fraction"] == pytest.approx(4 / 64)
    assert by_name["emb.weight"]["status"] == "unchanged"
    assert report["totals"]["counts"] == {"added": 0, "removed": 0, "changed": 1, "unchanged": 2}
    assert report["files"] == {"config.json": "removed"}


def test_diff_human_lists_changed_tensors_and_totals(capsys, repo):
    code, out, _ = call(capsys, "diff", "main~1", "main", repo=repo)
    lines = out.splitlines()
    assert code == 0 and any(line.startswith("M  layer.weight") for line in lines)
    assert not any("emb.weight" in line for line in lines)  # unchanged is only counted
    assert "1 changed, 0 added, 0 removed, 2 unchanged" in out


def test_export_safetensors_writes_the_committed_tensors(capsys, repo, tmp_path):
    out = tmp_path / "x.safetensors"
    code, _, _ = call(capsys, "export", "main~1", "-o", str(out), repo=repo)
    got, want = load_file(out), _model(0)
    assert code == 0 and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_export_refuses_existing_output_unless_forced(capsys, repo, tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = call(capsys, "export", "main", "-o", str(out), repo=repo)
    assert code == 2 and "--force" in err and out.read_bytes() == b"keep me"  # a usage error
    assert call(capsys, "export", "main", "-o", str(out), "--force", repo=repo)[0] == 0
    assert torch.equal(load_file(out)["layer.weight"][0, :4], _model(0)["layer.weight"][0, :4] + 1)


def test_export_hf_writes_back_the_side_files(capsys, repo, tmp_path):
    code, _, _ = call(capsys, "export", "main~1", "-o", str(tmp_path / "hf"), "--format", "hf", repo=repo)
    assert code == 0 and (tmp_path / "hf" / "config.json").read_text() == '{"model_type": "toy"}'


def test_branch_and_tag_create_list_and_resolve(capsys, scratch):
    assert call(capsys, "branch", "feat", "main~1", repo=scratch)[0] == 0
    assert call(capsys, "tag", "v1", "main", repo=scratch)[0] == 0
    _, branches, _ = call(capsys, "branch", repo=scratch)
    _, tags, _ = call(capsys, "tag", repo=scratch)
    store = LineageStore.open(scratch)
    assert store.resolve("feat") == store.resolve("main~1") and store.resolve("v1") == store.resolve("main")
    assert [line.split()[:2] for line in branches.splitlines()] == [["feat", store.resolve("feat")[:12]],
                                                                    ["*", "main"]]
    assert tags.split() == ["v1", store.resolve("v1")[:12]]


def test_creating_an_existing_branch_or_tag_is_an_error(capsys, scratch):
    code, _, err = call(capsys, "branch", "main", repo=scratch)
    assert code == 1 and "already exists" in err


def test_commit_to_a_new_branch_starts_from_head(capsys, scratch, tmp_path):
    save_file(_model(3), tmp_path / "m.safetensors")
    code, out, _ = call(capsys, "commit", str(tmp_path / "m.safetensors"), "-m", "on feat", "--branch", "feat",
                        repo=scratch)
    store = LineageStore.open(scratch)
    assert code == 0 and store.get_version("feat").parents == (store.resolve("main"),)
    assert store.resolve("main") != store.resolve("feat")


def test_log_graph_draws_branches_and_merges(capsys, scratch):
    store = LineageStore.open(scratch)
    base = store.resolve("main")
    store.set_ref("feat", base, old=None)
    side = store.commit({"w": torch.ones(1)}, message="side", branch="feat")
    ours = store.commit({"w": torch.zeros(1)}, message="ours", branch="main")
    store.commit({"w": torch.full((1,), 0.5)}, parents=["main", "feat"], message="merge", branch="main")
    _, out, _ = call(capsys, "log", "--graph", repo=scratch)
    lines = out.splitlines()
    assert lines[0].startswith("*  ") and "merge" in lines[0]
    assert lines[1] == "|\\"
    assert any(line.startswith("| *  " + side.id[:12]) for line in lines)
    assert any(line.startswith("* |  " + ours.id[:12]) for line in lines)
    assert "|/" in lines


def _round_version(store: LineageStore, **record) -> str:
    """Commit on main a version shaped like a swarm round's (see p2pmodel.versioning); returns its id."""
    version = store.commit({"w": torch.ones(1)}, message=f"round {record.get('round')}: mean of 2 deltas", branch="main",
                           author="aa" * 20, **record)
    return version.id


def test_log_json_lists_each_versions_contributors(capsys, scratch):
    store = LineageStore.open(scratch)
    _round_version(store, round=7, contributors=["aa" * 20, "bb" * 20])
    code, out, _ = call(capsys, "log", "--json", repo=scratch)
    entries = json.loads(out)
    assert code == 0 and entries[0]["contributors"] == ["aa" * 20, "bb" * 20]
    assert entries[1]["contributors"] == []  # a local commit merges nobody's work


def test_log_graph_shows_round_eval_loss_contributors_ci_and_screened(capsys, scratch):
    store = LineageStore.open(scratch)
    vid = _round_version(
        store, round=7, contributors=["aa" * 20, "bb" * 20], metrics={"eval_loss": 2.25},
        certificate={"round": 7, "proposal": "f00d" * 16, "votes": [b"vote-1", b"vote-2", b"vote-3"]},
        merge={"method": "mean", "screened": [["cc" * 20, "cosine -0.9 < 0.3"]]},
    )  # fmt: skip
    _, out, _ = call(capsys, "log", "--graph", repo=scratch)
    line = {text[3:15]: text for text in out.splitlines()}
    assert line[vid[:12]].endswith("[round=7  eval_loss=2.25  contributors=2  ci=passed(3 votes)  screened=1]")
    second = store.resolve("main~1")  # committed by hand: no round, contributors, certificate or screen
    assert line[second[:12]].endswith("second  [eval_loss=2.5]")


def test_log_graph_shows_no_screened_count_for_a_merge_that_screened_nothing(capsys, scratch):
    store = LineageStore.open(scratch)
    vid = _round_version(store, round=8, contributors=["aa" * 20], merge={"method": "mean"})
    _, out, _ = call(capsys, "log", "--graph", repo=scratch)
    first = out.splitlines()[0]
    assert vid[:12] in first and first.endswith("[round=8  contributors=1]")


def test_draw_graph_routes_a_fork_and_a_merge():
    nodes = [("m", ("a", "b")), ("b", ("r",)), ("a", ("r",)), ("r", ())]
    lines = draw_graph(nodes, ["M", "B", "A", "R"])
    assert lines == ["*  M", "|\\", "| *  B", "* |  A", "|/", "*  R"]


def test_bad_metric_is_a_usage_error(capsys, repo, tmp_path):
    code, _, err = call(capsys, "commit", str(tmp_path), "-m", "x", "--metric", "loss", repo=repo)
    assert code == 2 and "NAME=NUMBER" in err


def test_verify_reports_a_healthy_repository_as_ok(capsys, repo):
    code, out, _ = call(capsys, "verify", "--json", repo=repo)
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["versions_checked"] == 2 and report["problems"] == []


def test_gc_reports_bytes_freed_by_a_deleted_branch(capsys, scratch, tmp_path):
    save_file({"only.here": torch.randn(1000)}, tmp_path / "m.safetensors")
    assert call(capsys, "commit", str(tmp_path / "m.safetensors"), "-m", "tmp", "--branch", "tmp", repo=scratch)[0] == 0
    assert call(capsys, "branch", "-d", "tmp", repo=scratch)[0] == 0
    code, out, _ = call(capsys, "gc", "--json", repo=scratch)
    report = json.loads(out)
    assert code == 0 and report["removed_versions"] == 1 and report["bytes_freed"] > 4000
    assert call(capsys, "verify", repo=scratch)[0] == 0
