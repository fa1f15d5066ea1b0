"""`p2pmodel merge`: merge checkpoints offline with any registered method.

    p2pmodel merge --method ties --base BASE A B C --density 0.5 --weights 1 0.5 0.5 -o OUT

Flags map one to one onto the method's parameters (`p2pmodel.merge.METHODS[name].params`);
only the flags given are passed, so each method's own defaults (mergekit's) apply, and a
flag the method does not take is an error that lists the ones it does. Progress goes to
stderr; the summary (or `--json`, the `MergeReport`) to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from p2pmodel.merge import merge_checkpoints
from p2pmodel.merge.registry import METHODS, get_method

__all__ = ["register"]

# flag dest -> method parameter name
_PARAM_FLAGS = {
    "density": "density",
    "t": "t",
    "normalize": "normalize",
    "lambda_": "lambda_",
    "rescale": "rescale",
    "consensus": "consensus",
    "scope": "scope",
    "trim": "trim",
    "tau": "tau",
    "iterations": "iterations",
    "init": "init",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    get_method("linear")  # imports every family, so METHODS is complete for --help
    p = subparsers.add_parser(
        "merge",
        help="merge checkpoints (linear, ties, dare, slerp, robust methods, ...)",
        description="Merge checkpoints tensor by tensor into a new safetensors folder. "
        f"Methods: {', '.join(sorted(METHODS))}.",
    )
    p.add_argument("--method", required=True, metavar="M", help="merge method (see the list above)")
    p.add_argument("--base", metavar="PATH", help="base model: task vectors are taken against it "
                   "(required by task_arithmetic, ties, dare_*; the first input for linear/slerp)")
    p.add_argument("models", nargs="+", metavar="MODEL", help=".safetensors file or folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (must not exist)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight, or one per model")
    p.add_argument("--density", nargs="+", type=float, metavar="D",
                   help="fraction of each task vector kept, in (0, 1]: one, or one per model (ties, dare_*)")
    p.add_argument("--t", type=float, help="slerp: interpolation factor (0 = base/first model)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide by the sum of weights (default: the method's, as mergekit)")
    p.add_argument("--lambda", dest="lambda_", type=float, help="task vector methods: scale of the merged delta")
    p.add_argument("--rescale", choices=["l1", "density", "none"],
                   help="ties/dare: rescale kept entries (l1: mergekit, density: DARE paper's 1/density)")
    p.add_argument("--consensus", choices=["sum", "count"], help="ties/dare_ties: sign election")
    p.add_argument("--scope", choices=["tensor", "model"],
                   help="ties: trim per tensor (mergekit) or over the whole model (TIES paper)")
    p.add_argument("--trim", type=float, help="trimmed_mean: fraction (< 0.5) or count dropped per side")
    p.add_argument("--tau", type=float, help="centered_clip: clipping radius (default: median distance)")
    p.add_argument("--iterations", type=int, help="centered_clip: clipping iterations")
    p.add_argument("--init", choices=["median", "zero", "mean"], help="centered_clip: starting center")
    p.add_argument("--seed", type=int, default=0, help="seed of random methods (dare_*), default 0")
    p.add_argument("--allow-missing", action="store_true",
                   help="merge a tensor absent from some models over the models that have it")
    p.add_argument("--json", action="store_true", help="print the merge report as JSON")
    p.set_defaults(func=_run)


class _Progress:
    """Progress on stderr: a rewritten line on a terminal, a line every few seconds otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int, name: str) -> None:
        now = time.monotonic()
        if self.tty:
            print(f"\rmerging {done}/{total} {name[:60]:<60}", end="", file=sys.stderr, flush=True)
            if done >= total:
                print(file=sys.stderr)
        elif now - self.last >= 5 or done >= total:
            print(f"merging {done}/{total} {name}", file=sys.stderr, flush=True)
            self.last = now


def _run(args: argparse.Namespace) -> int:
    params = {param: getattr(args, dest) for dest, param in _PARAM_FLAGS.items() if getattr(args, dest) is not None}
    report = merge_checkpoints(
        args.method,
        args.models,
        base=args.base,
        weights=args.weights,
        output=args.output,
        force=args.force,
        seed=args.seed,
        allow_missing=args.allow_missing,
        progress=_Progress(),
        **params,
    )
    if args.json:
        print(json.dumps(asdict(report), indent=2, sort_keys=True, default=str))
        return 0
    gb_s = report.bytes_read / max(report.seconds, 1e-9) / 1e9
    print(f"merged {len(report.models)} models with {report.method} into {report.output}")
    print(f"  tensors  {report.tensors} ({report.merged} merged)")
    print(f"  read     {report.bytes_read / 1e6:.1f} MB in {report.seconds:.2f} s ({gb_s:.2f} GB/s)")
    print(f"  written  {report.bytes_written / 1e6:.1f} MB")
    for name, missing in sorted(report.partial.items()):
        print(f"  partial  {name}: absent from {', '.join(missing)}")
    return 0
