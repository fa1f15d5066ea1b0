"""The `p2pmodel` command line: porcelain over the lineage, the merge engine and the swarm.

Each module here registers a group of subcommands:

- `repo.py`   — init, commit, log, show, diff, export, branch, tag, verify, gc
- `merge.py`  — merge
- `seed.py`   — seed (found an event: seed version + manifest)
- `swarm.py`  — join, status, demo
- `ci.py`     — ci (the CI gate, offline)
- `dashboard.py` — dashboard (open a running node's web dashboard)
- `credits.py` — credits (the contributor leaderboard of a lineage or a node)

A subcommand module exposes `register(subparsers)`; each parser sets `func=handler`, where
`handler(args) -> int` returns the exit code. Errors derived from `P2PModelError` become one
line on stderr and their `exit_code`; anything else is a bug and keeps its traceback.

The repository (`--repo`, before or after the subcommand) is, as git finds its own: the flag,
else `$P2PMODEL_REPO`, else the nearest `.p2pmodel` in the current folder or one above it,
else `./.p2pmodel` (where `init` always creates one). Every `--help` shows the defaults.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Sequence

from p2pmodel import __version__
from p2pmodel.errors import P2PModelError

__all__ = ["main", "build_parser", "find_repo"]

_COMMAND_MODULES = ("repo", "merge", "seed", "swarm", "ci", "dashboard", "credits")
_REPO_MODULES = ("repo", "merge", "seed", "ci", "credits")  # their subcommands take --repo after the name too
REPO_DIR = ".p2pmodel"
_REPO_HELP = f"lineage repository folder (default: $P2PMODEL_REPO, else the nearest {REPO_DIR} here or above, else ./{REPO_DIR})"


class _HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to a flag's help, unless the default is empty or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or default is argparse.SUPPRESS or default in ("", [], ())
        if (
            "default:" in text.lower()
            or "%(default)" in text
            or empty
            or not action.option_strings
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


def find_repo(start: str | os.PathLike | None = None) -> str | None:
    """The nearest `.p2pmodel` repository in `start` (default: the current folder) or above it.

    Returns its path, or None when no folder up to the root holds one.
    """
    here = Path(start if start is not None else os.getcwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / REPO_DIR
        if (candidate / "index.sqlite").is_file():  # what LineageStore.open requires
            return str(candidate)
    return None


def _resolve_repo(args: argparse.Namespace) -> None:
    if getattr(args, "repo", None) is not None:
        return
    env = os.environ.get("P2PMODEL_REPO")
    if env:
        args.repo = env
    elif args.command == "init":  # as `git init`: here, never a repository above
        args.repo = REPO_DIR
    else:
        args.repo = find_repo() or REPO_DIR  # not found: errors name ./.p2pmodel


def build_parser() -> argparse.ArgumentParser:
    """The `p2pmodel` parser with every subcommand group that is installed."""
    parser = argparse.ArgumentParser(
        prog="p2pmodel",
        description="Version control, merging and peer-to-peer training for models.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"p2pmodel {__version__}")
    parser.add_argument("--repo", default=None, help=_REPO_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"p2pmodel.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"p2pmodel.cli.{name}":
                continue  # that group is not written yet
            raise
        before = set(subparsers.choices)
        module.register(subparsers)
        for command, sub in subparsers.choices.items():
            if command in before:
                continue
            sub.formatter_class = _HelpFormatter
            if name in _REPO_MODULES:
                # SUPPRESS: absent after the subcommand, it keeps the value given before it
                sub.add_argument("--repo", default=argparse.SUPPRESS, help=_REPO_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _resolve_repo(args)
    try:
        return int(args.func(args) or 0)
    except P2PModelError as e:
        print(f"p2pmodel: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("p2pmodel: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
