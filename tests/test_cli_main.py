"""The top of the `p2pmodel` command line (p2pmodel.cli): what every subcommand shares.

Guarantees: `--version` prints the package version; `--repo` works before and after the
subcommand; the repository is found as git finds its own (flag, else `$P2PMODEL_REPO`, else the
nearest `.p2pmodel` in the current folder or above, else `./.p2pmodel`), while `init` always
creates one in the current folder; every `--help` shows the defaults of its flags.
"""

from __future__ import annotations

import json

import pytest

from p2pmodel import __version__
from p2pmodel.cli import build_parser, find_repo, main


@pytest.fixture
def no_repo_env(monkeypatch):
    monkeypatch.delenv("P2PMODEL_REPO", raising=False)


def _verify(capsys, *argv: str) -> dict | None:
    """`p2pmodel verify --json` on the repository the arguments name: its report, or None."""
    capsys.readouterr()
    code = main(["verify", "--json", *argv])
    return json.loads(capsys.readouterr().out) if code == 0 else None


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"p2pmodel {__version__}"


def test_repo_is_accepted_after_the_subcommand(tmp_path, capsys, no_repo_env):
    repo = tmp_path / "r"
    assert main(["init", "--repo", str(repo)]) == 0
    assert _verify(capsys, "--repo", str(repo))["ok"]


def test_repo_after_the_subcommand_wins_over_the_one_before(tmp_path, no_repo_env):
    args = build_parser().parse_args(["--repo", "before", "log", "--repo", "after"])
    assert args.repo == "after"


def test_repo_before_the_subcommand_is_kept_when_none_follows_it(no_repo_env):
    assert build_parser().parse_args(["--repo", "before", "log"]).repo == "before"


def test_the_repository_is_found_from_a_subfolder(tmp_path, monkeypatch, capsys, no_repo_env):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_repo() == str(tmp_path / ".p2pmodel")
    assert _verify(capsys)["ok"]


def test_the_nearest_repository_wins(tmp_path, monkeypatch, no_repo_env):
    (tmp_path / "inner").mkdir()
    for where in (tmp_path, tmp_path / "inner"):
        monkeypatch.chdir(where)
        assert main(["init"]) == 0
    assert find_repo(tmp_path / "inner") == str(tmp_path / "inner" / ".p2pmodel")


def test_no_repository_up_to_the_root_is_one_line_naming_the_local_default(tmp_path, monkeypatch, capsys, no_repo_env):
    monkeypatch.chdir(tmp_path)
    assert find_repo() is None or not find_repo().startswith(str(tmp_path))
    if find_repo() is not None:
        pytest.skip(f"a .p2pmodel above the temporary folder ({find_repo()}) would be found")
    assert main(["verify"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ".p2pmodel" in err


def test_init_creates_the_repository_here_even_inside_another(tmp_path, monkeypatch, no_repo_env):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["init"]) == 0
    assert (tmp_path / "sub" / ".p2pmodel" / "index.sqlite").is_file()


def test_the_environment_variable_beats_discovery(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("P2PMODEL_REPO", str(tmp_path / "elsewhere"))
    assert main(["init"]) == 0
    assert (tmp_path / "elsewhere" / "index.sqlite").is_file()


@pytest.mark.parametrize("command, shown", [
    ("join", ["(default: ~/.p2pmodel/node)", "(default: 7271)", "(default: INFO)", "(default: 10.0)"]),
    ("demo", ["(default: 3)", "(default: cpu)"]),
    ("status", ["(default: ~/.p2pmodel/node)"]),
])  # fmt: skip
def test_help_shows_the_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in shown:
        assert default in text
