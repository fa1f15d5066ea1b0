"""`p2pmodel ci REF`: run the swarm's CI gate offline on any version.

It evaluates REF and the versions before it with the event's task (the same `run_gate` the
daemon calls before it votes), prints the report and exits 1 when the gate is red, so a
model developer sees exactly why a round was refused, or checks a version before pushing it.
"""

from __future__ import annotations

import argparse
import json
import math

from p2pmodel.errors import UsageError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ci", help="run the CI gate on a version (eval vs parent and recent versions)")
    p.add_argument("ref", nargs="?", default="main", help="version to check (default: main)")
    p.add_argument("--task", default="charlm", help="task that evaluates the model (default: charlm)")
    p.add_argument("--task-options", default="{}", help="JSON object of the task's options")
    p.add_argument("--max-regression", type=float, default=0.10, help="allowed eval-loss rise over the parent (fraction)")
    p.add_argument("--max-regression-best", type=float, default=0.20, help="... over the best of the last --window versions")
    p.add_argument("--window", type=int, default=8, help="versions back that 'best' looks at")
    p.add_argument("--max-param-norm", type=float, default=None, help="bound on the parameters' global L2 norm")
    p.add_argument("--check", action="append", default=[], metavar="MODULE:FUNCTION", help="custom check (repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_ci)


def cmd_ci(args: argparse.Namespace) -> int:
    import torch

    from p2pmodel.ci import CIGate, run_gate
    from p2pmodel.lineage import LineageStore
    from p2pmodel.tasks import load_task

    try:
        options = json.loads(args.task_options)
    except ValueError as e:
        raise UsageError(f"--task-options is not JSON: {e}") from None
    if not isinstance(options, dict):
        raise UsageError("--task-options must be a JSON object")
    gate = CIGate(args.max_regression, args.max_regression_best, args.window, args.max_param_norm, tuple(args.check))
    task = load_task(args.task, **options)
    model = task.build_model()

    def evaluate(state) -> dict[str, float]:
        model.load_state_dict(dict(state))
        model.eval()
        with torch.no_grad():
            return {k: float(v) for k, v in task.evaluate(model, "cpu").items()}

    with LineageStore.open(args.repo) as store:
        vid = store.resolve(args.ref)
        history = store.log(vid, limit=gate.window + 1)  # REF first, then its ancestors
        params = store.state_dict(vid)
        metrics = evaluate(params)
        recent = [evaluate(store.state_dict(v.id)) for v in history[1:]]
    report = run_gate(gate, metrics, parent=recent[0] if recent else None, recent=recent, params=params)
    if args.json:
        print(json.dumps({"version": vid, "metrics": metrics, "recent": recent, **report.as_dict()}, indent=2))
    else:
        parent = f"{recent[0].get('eval_loss', math.nan):.4f}" if recent else "-"
        print(f"version {vid[:12]}: eval_loss {metrics.get('eval_loss', math.nan):.4f} (parent {parent}, "
              f"{len(recent)} versions before it checked)")  # fmt: skip
        print("CI: passed" if report.passed else "CI: FAILED\n" + "\n".join(f"  - {f}" for f in report.failures))
    return 0 if report.passed else 1
