"""The `p2pmodel` command line: porcelain over the lineage, the merge engine and the swarm.

Each module here registers a group of subcommands:

- `repo.py`   — init, commit, log, show, diff, export, branch, tag, verify, gc
- `merge.py`  — merge
- `seed.py`   — seed (found an event: seed version + manifest)
- `swarm.py`  — join, status, demo
- `ci.py`     — ci (the CI gate, offline)
- `dashboard.py` — dashboard (open a running node's web dashboard)

A subcommand module exposes `register(subparsers)`; each parser sets `func=handler`, where
`handler(args) -> int` returns the exit code. Errors derived from `P2PModelError` become one
line on stderr and their `exit_code`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from p2pmodel.errors import P2PModelError

__all__ = ["main", "build_parser"]

_COMMAND_MODULES = ("repo", "merge", "seed", "swarm", "ci", "dashboard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pmodel",
        description="Version control, merging and peer-to-peer training for models.",
    )
    parser.add_argument(
        "--repo",
        default=os.environ.get("P2PMODEL_REPO", ".p2pmodel"),
        help="lineage repository folder (default: $P2PMODEL_REPO or ./.p2pmodel)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"p2pmodel.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"p2pmodel.cli.{name}":
                continue  # that group is not written yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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
