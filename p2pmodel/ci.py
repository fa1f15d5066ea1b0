"""The CI gate: whether a merged version may be committed. Pure; the daemon and `p2pmodel ci` call it.

A version passes when:

- every metric is finite, and every parameter is finite (a NaN anywhere fails);
- its eval loss is within `max_regression` of its parent's (one bad round is caught) AND
  within `max_regression_best` of the best of the last `window` versions (slow drift, a
  few percent a round, is caught too: comparing with the parent alone let a poisoner raise
  the loss 6-17% a round for six rounds);
- the global L2 norm of its parameters is at most `max_param_norm` (when set);
- every custom check (`"module:function"`, called with `(metrics, params)` and returning
  an error string or "") passes.

`median_metrics` is how a committed version's metrics are recorded: per metric, the median
over the voters' measurements (peers measure on their own hardware; a liar cannot move it).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from p2pmodel.errors import UsageError

__all__ = ["CIGate", "CIReport", "run_gate", "median_metrics", "load_check", "CICheckError"]

Check = Callable[[Mapping[str, float], Mapping[str, torch.Tensor]], str]


class CICheckError(UsageError):
    """A custom CI check named in the event cannot be loaded. Fields: `spec`, `reason`."""

    def __init__(self, spec: str, reason: str):
        self.spec, self.reason = spec, reason
        super().__init__(f"CI check {spec!r}: {reason}")


@dataclass(frozen=True)
class CIGate:
    """The event's gate. Every peer of an event runs the same one."""

    max_regression: float = 0.10  # eval loss may exceed the parent's by at most this fraction
    max_regression_best: float = 0.20  # ... and the best of the last `window` versions' by this
    window: int = 8  # versions back that "best" looks at
    max_param_norm: float | None = None  # global L2 norm of the parameters (None: unbounded)
    checks: tuple[str, ...] = field(default=())  # custom checks, "package.module:function"


@dataclass(frozen=True)
class CIReport:
    """What the gate found: `passed`, and one line per failed check."""

    passed: bool
    failures: tuple[str, ...]
    param_norm: float | None = None

    @property
    def reason(self) -> str:
        return "; ".join(self.failures)

    def as_dict(self) -> dict:
        return {"passed": self.passed, "failures": list(self.failures), "param_norm": self.param_norm}


def load_check(spec: str) -> Check:
    """Import a custom check named "package.module:function".

    Raises:
        CICheckError: the name is malformed, the module does not import, or it is not callable.
    """
    module, _, name = spec.partition(":")
    if not module or not name:
        raise CICheckError(spec, "expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CICheckError(spec, str(e)) from None
    if not callable(fn):
        raise CICheckError(spec, "not callable")
    return fn


def run_gate(
    gate: CIGate,
    metrics: Mapping[str, float],
    *,
    parent: Mapping[str, float] | None = None,
    recent: Sequence[Mapping[str, float]] = (),
    params: Mapping[str, torch.Tensor] | None = None,
) -> CIReport:
    """Run `gate` on a candidate version.

    Args:
        metrics: the candidate's metrics (this peer's measurement).
        parent: the parent version's metrics (None: no parent, e.g. the seed).
        recent: metrics of up to `gate.window` recent versions of the branch, newest first
            (the parent among them); the best eval loss among them bounds drift.
        params: the candidate's parameters (finite and norm checks; None skips them).
    """
    failures: list[str] = []
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        failures.append(f"non-finite metrics {bad}")
    new = metrics.get("eval_loss")
    if new is not None and math.isfinite(new):
        old = (parent or {}).get("eval_loss")
        if old is not None and new > old * (1 + gate.max_regression):
            failures.append(f"eval_loss {new:.4f} regressed past the parent's {old:.4f} * (1 + {gate.max_regression})")
        window = [m.get("eval_loss") for m in list(recent)[: gate.window]]
        best = min((x for x in window if x is not None and math.isfinite(x)), default=None)
        if best is not None and new > best * (1 + gate.max_regression_best):
            failures.append(
                f"eval_loss {new:.4f} drifted past the best of the last {len(window)} versions, "
                f"{best:.4f} * (1 + {gate.max_regression_best})"
            )
    norm = None
    if params is not None:
        sq = 0.0
        for name, t in params.items():
            if not t.is_floating_point():
                continue
            if not torch.isfinite(t).all():
                failures.append(f"parameter {name} is not finite")
                break
            sq += float(t.double().square().sum())
        norm = math.sqrt(sq)
        if gate.max_param_norm is not None and norm > gate.max_param_norm:
            failures.append(f"parameter norm {norm:.4g} exceeds {gate.max_param_norm:.4g}")
    for spec in gate.checks:
        try:
            why = load_check(spec)(metrics, params or {})
        except CICheckError as e:
            why = str(e)
        except Exception as e:  # a custom check is user code: its crash is a red CI run, not ours
            why = f"{spec} raised {type(e).__name__}: {e}"
        if why:
            failures.append(f"{spec}: {why}")
    return CIReport(not failures, tuple(failures), norm)


def median_metrics(measurements: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per metric, the median over the measurements that have it (the upper one of an even count)."""
    names = sorted({k for m in measurements for k in m})
    out: dict[str, float] = {}
    for k in names:
        xs = sorted(m[k] for m in measurements if k in m)
        out[k] = xs[len(xs) // 2]
    return out
