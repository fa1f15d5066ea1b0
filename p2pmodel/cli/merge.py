"""`p2pmodel merge`: merge checkpoints or lineage versions with any registered method.

    p2pmodel merge --method ties --base BASE A B C --density 0.5 --weights 1 0.5 0.5 -o OUT
    p2pmodel merge --method dare_ties --base main~3 main feature --density 0.6 --commit
    p2pmodel merge --config recipe.yml --seed 42 -o OUT        # a mergekit YAML recipe

Flags map one to one onto the method's parameters (`p2pmodel.merge.METHODS[name].params`);
only the flags given are passed, so each method's own defaults (mergekit's) apply, and a
flag the method does not take is an error that lists the ones it does. Progress goes to
stderr; the summary (or `--json`, the `MergeReport`) to stdout.

Inputs and `--base` are paths or revisions of the repository (`main`, `v1`, `main~2`, an id
prefix; a path that exists wins). Random methods (DARE) draw as `mergekit-yaml --random-seed S`
does: one `torch.manual_seed(--seed)` stream through the tensors in name order.

`--commit` records the result in the repository as a version whose parents are the merged
versions and whose merge spec holds the method, its parameters, the inputs' ids, the base and
the seed. The branch, as `git merge` would choose it: `--branch NAME` if given; else the current
branch when its tip is one of the inputs (merging others into where you are); else the branch
whose tip is the first input. The branch's tip comes first among the parents, so `log --graph`
draws the branch going on and the others joining it. A branch whose tip is not among the inputs
is refused (moving it would drop its tip from its history); a new branch name starts at the
merge. Without `-o` nothing is left on disk but the repository's objects.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from p2pmodel.checkpoint import open_checkpoint
from p2pmodel.errors import P2PModelError, UsageError
from p2pmodel.lineage import LineageStore, Version
from p2pmodel.merge import MergeReport, merge_checkpoints
from p2pmodel.merge.engine import PROVENANCE_FILE
from p2pmodel.merge.recipe import load_recipe
from p2pmodel.merge.registry import METHODS, get_method
from p2pmodel.merge.sources import VersionReader, resolve_input
from p2pmodel.progress import Progress

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
        help="merge checkpoints or versions (linear, ties, dare, slerp, robust methods, ...); --commit records it",
        description="Merge checkpoints or lineage versions tensor by tensor into a new safetensors folder, "
        f"or into the repository (--commit). Methods: {', '.join(sorted(METHODS))}.",
    )
    p.add_argument("--method", metavar="M", help="merge method (see the list above; or --config)")
    p.add_argument("--config", metavar="RECIPE", help="a mergekit YAML recipe (merge_method, base_model, models, "
                   "parameters, dtype); instead of --method, --base, MODEL and the parameter flags")
    p.add_argument("--base", metavar="MODEL", help="base model, a path or revision: task vectors are taken against it "
                   "(required by task_arithmetic, ties, dare_*; the first input for linear/slerp)")
    p.add_argument("models", nargs="*", metavar="MODEL", help=".safetensors file, folder, or revision (main, v1, main~2, id)")
    p.add_argument("-o", "--output", metavar="OUT_DIR", help="output folder (must not exist); optional with --commit")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--commit", action="store_true", help="record the result as a version of the repository "
                   "(parents: the merged versions)")
    p.add_argument("--branch", metavar="NAME", help="with --commit: the branch to record it on (default: as git merge; "
                   "see `p2pmodel merge` docs)")
    p.add_argument("-m", "--message", help="with --commit: the version's message (default: what was merged, how)")
    p.add_argument("--author", default=os.environ.get("P2PMODEL_AUTHOR", ""), help="with --commit: author "
                   "(default: $P2PMODEL_AUTHOR)")
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
    p.add_argument("--seed", type=int, default=0,
                   help="seed of random methods (dare_*), drawn as mergekit-yaml --random-seed draws; default 0")
    p.add_argument("--allow-missing", action="store_true",
                   help="merge a tensor absent from some models over the models that have it")
    p.add_argument("--json", action="store_true", help="print the merge report as JSON")
    p.set_defaults(func=_run)


def _request(args: argparse.Namespace) -> tuple[str, list[str], str | None, dict, torch.dtype | None]:
    """(method, model texts, base text, parameters, output dtype) from the flags or the recipe."""
    params = {param: getattr(args, dest) for dest, param in _PARAM_FLAGS.items() if getattr(args, dest) is not None}
    if args.weights is not None:
        params["weights"] = args.weights
    if args.config:
        given = [f for f, v in (("--method", args.method), ("--base", args.base), ("MODEL", args.models)) if v]
        given += [f"--{k.rstrip('_')}" for k in params]
        if given:
            raise UsageError(f"--config gives the method, models, base and parameters; drop {', '.join(given)}")
        recipe = load_recipe(args.config)
        dtype = getattr(torch, recipe.out_dtype) if recipe.out_dtype else None
        return recipe.method, recipe.models, recipe.base, recipe.params, dtype
    if not args.method:
        raise UsageError("--method is required (or --config RECIPE)")
    if not args.models:
        raise UsageError("give the models to merge (paths or revisions)")
    return args.method, args.models, args.base, params, None


def _run(args: argparse.Namespace) -> int:
    method, model_texts, base_text, params, out_dtype = _request(args)
    if not args.output and not args.commit:
        raise UsageError("-o OUT_DIR is required (or --commit to record the merge in the repository)")
    if not args.commit and (args.branch or args.message):
        raise UsageError("--branch and --message go with --commit")
    store = _open_store(args.repo, required=args.commit)
    try:
        sources = [resolve_input(t, args.repo, store) for t in model_texts]
        base = resolve_input(base_text, args.repo, store) if base_text is not None else None
        target = _commit_target(store, args.branch, [base] + sources if get_method(method).base == "input" else sources,
                                model_texts) if args.commit else None
        with tempfile.TemporaryDirectory(prefix="p2pmodel-merge-") as tmp, \
                Progress(None, "merging", unit="tensors", log_every=5.0) as progress:
            output = args.output or str(Path(tmp) / "merged")
            report = merge_checkpoints(
                method, sources, base=base, output=output, force=args.force, seed=args.seed, rng="mergekit",
                allow_missing=args.allow_missing, out_dtype=out_dtype, progress=progress.at, **params,
            )
            version = _record(store, target, report, args, base, sources) if target else None
    finally:
        if store is not None:
            store.close()
    if args.json:
        out = asdict(report) | ({"version": version.id, "branch": target[0]} if version else {})
        print(json.dumps(out, indent=2, sort_keys=True, default=str))
        return 0
    gb_s = report.bytes_read / max(report.seconds, 1e-9) / 1e9
    where = report.output if args.output else "the repository"
    print(f"merged {len(report.models)} models with {report.method} into {where}")
    print(f"  tensors  {report.tensors} ({report.merged} merged)")
    print(f"  read     {report.bytes_read / 1e6:.1f} MB in {report.seconds:.2f} s ({gb_s:.2f} GB/s)")
    print(f"  written  {report.bytes_written / 1e6:.1f} MB")
    for name, missing in sorted(report.partial.items()):
        print(f"  partial  {name}: absent from {', '.join(missing)}")
    if version is not None:
        print(f"[{target[0]} {version.id[:12]}] {version.message}")
        print(f"  parents  {', '.join(p[:12] for p in version.parents)}")
    return 0


def _open_store(repo: str, required: bool) -> LineageStore | None:
    try:
        return LineageStore.open(repo)
    except P2PModelError:
        if required:
            raise
        return None  # inputs can only be paths then; resolve_input says so


def _commit_target(store: LineageStore, branch: str | None, sources: list, texts: list[str]) -> tuple[str, list[str]]:
    """(branch, parents) for `--commit` (the rule is in the module doc)."""
    versions = list(dict.fromkeys(s.id for s in sources if isinstance(s, VersionReader)))
    branches = store.branches()
    if not versions:  # only files merged: an ordinary commit on the branch, as `p2pmodel commit`
        branch = branch or store.head_branch()
        return branch, [branches[branch]] if branch in branches else []
    if branch is None:
        head = store.head_branch()
        if branches.get(head) in versions:
            branch = head
        elif versions and texts and texts[0] in branches and branches[texts[0]] == versions[0]:
            branch = texts[0]
        else:
            on = [b for b, tip in sorted(branches.items()) if versions and tip == versions[0]]
            if not on:
                raise UsageError(f"--commit: no input is the tip of the current branch ({head}); "
                                 "name the branch to record the merge on with --branch")
            branch = on[0]
    tip = branches.get(branch)
    if tip is None:
        return branch, versions
    if tip not in versions:
        raise UsageError(f"--commit: branch {branch!r} is at {tip[:12]}, which is not among the merged versions "
                         "(merge it too, or pick another --branch)")
    return branch, [tip] + [v for v in versions if v != tip]


def _record(store: LineageStore, target: tuple[str, list[str]], report: MergeReport, args: argparse.Namespace,
            base: object, sources: list) -> Version:
    branch, parents = target

    def ident(x: object) -> str:
        return x.id if isinstance(x, VersionReader) else str(Path(str(x)).resolve())

    spec = {
        "method": report.method,
        "params": report.params,
        "inputs": [ident(s) for s in sources],
        "base": ident(base) if base is not None else None,
        "seed": args.seed,
        "rng": "mergekit",
    }
    message = args.message or f"merge {', '.join(args.models or [Path(args.config).name])} ({report.method})"
    with open_checkpoint(report.output) as reader:
        files = {k: v for k, v in reader.extra_files().items() if k != PROVENANCE_FILE}
        return store.commit(((n, reader.get(n)) for n in reader.names()), parents=parents, message=message,
                            branch=branch, author=args.author, merge=spec, files=files or None)
