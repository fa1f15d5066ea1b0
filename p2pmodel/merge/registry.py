"""The registry of merge methods: a method is a function registered by name, its parameters
declared in its signature (mergekit's `easy_define` style, see STYLE.md §7).

A registered function takes, as its first argument, either

- `tensors: Tensor`, shape `(n_models, *shape)`: the models' own tensors (linear, slerp), or
- `deltas: Tensor`, shape `(n_models, *shape)`: task vectors `model - base` (task arithmetic,
  TIES, DARE, the robust family); it returns the merged *delta* and the caller adds the base.

The other parameters are read from the signature:

- `weights: list[float]` is the per-model weight (default 1.0 for every model);
- any other `list[float]` parameter is per-model: the caller gives one value for all models
  or one per model, and the function always receives one per model;
- scalars (`float`, `int`, `bool`, `str`, `Literal[...]`, `float | None`) are global;
  a parameter without a default is required;
- `generator: torch.Generator` is injected by the caller (seeded per tensor) for random
  methods; it is not a user parameter.

`Annotated[T, Check(...)]` attaches a validity check, run before any tensor is touched.
A signature the registry cannot read raises `TypeError` at import time.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Union

import torch
from torch import Tensor

from p2pmodel.errors import P2PModelError, UsageError

__all__ = [
    "MergeError",
    "UnknownMethod",
    "MergeParameterError",
    "ModelCountError",
    "Check",
    "Param",
    "MergeMethod",
    "METHODS",
    "merge_method",
    "get_method",
]


class MergeError(P2PModelError):
    """Base of every error the merge engine raises on purpose."""


class UnknownMethod(MergeError, UsageError):
    """No merge method is registered under `name`."""

    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__(f"unknown merge method {name!r}; known methods: {', '.join(known)}")


class MergeParameterError(MergeError, UsageError):
    """A parameter is unknown to the method, missing, of the wrong kind or out of range."""

    def __init__(self, method: str, param: str, reason: str):
        self.method, self.param, self.reason = method, param, reason
        super().__init__(f"merge method {method!r}, parameter {param!r}: {reason}")


class ModelCountError(MergeError, UsageError):
    """The method cannot merge this many models (slerp takes exactly two)."""

    def __init__(self, method: str, expected: str, got: int):
        self.method, self.expected, self.got = method, expected, got
        super().__init__(f"merge method {method!r} merges {expected} models, got {got}")


@dataclass(frozen=True)
class Check:
    """A validity check on a parameter's value (each element, for a per-model parameter)."""

    predicate: Callable[[Any], bool]
    message: str  # what a valid value is, e.g. "must be in (0, 1]"


@dataclass(frozen=True)
class Param:
    """One user-facing parameter of a merge method, read from the function's signature."""

    name: str
    kind: type  # float, int, bool or str (the element type for per-model parameters)
    per_model: bool  # one value per model (a scalar is broadcast)
    default: Any  # inspect.Parameter.empty when required
    optional: bool = False  # `None` is an accepted value
    choices: tuple[str, ...] | None = None  # for Literal[...] string parameters
    checks: tuple[Check, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method. Call it through `p2pmodel.merge.merge_tensor` and friends."""

    name: str
    pretty_name: str
    reference_url: str
    func: Callable[..., Tensor]
    input: Literal["tensors", "deltas"]  # what the first argument holds
    params: tuple[Param, ...]
    base: Literal["required", "optional", "input"]  # how a base model is used (see below)
    n_models: int | None  # exact number of inputs, or None for any number >= 1
    random: bool  # takes a generator (DARE)
    doc: str
    # Each output entry depends on that entry of the inputs only (no per-tensor norm, quantile or
    # random stream), so the merge of any slice of a tensor is that slice of the tensor's merge,
    # bit for bit: what a partitioned reduction (p2pmodel.partition) needs from a method.
    coordinatewise: bool = False

    # base == "required": deltas against the base (task arithmetic, TIES, DARE; as mergekit).
    # base == "optional": deltas against the base, or the raw tensors when there is none.
    # base == "input":    the base is simply the first input (linear, slerp's v0).

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def resolve(self, n_models: int, params: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults, broadcast per-model values and validate; returns the call's kwargs.

        Raises:
            ModelCountError: the method cannot merge `n_models` inputs.
            MergeParameterError: unknown, missing, mistyped or out-of-range parameter.
        """
        if n_models < 1 or (self.n_models is not None and n_models != self.n_models):
            raise ModelCountError(self.name, str(self.n_models or "one or more"), n_models)
        unknown = sorted(set(params) - {p.name for p in self.params})
        if unknown:
            accepted = ", ".join(p.name for p in self.params) or "none"
            raise MergeParameterError(
                self.name, unknown[0], f"not a parameter of this method (it takes: {accepted})"
            )
        out: dict[str, Any] = {}
        for p in self.params:
            value = params.get(p.name)
            if value is None and p.name in params and p.optional:
                out[p.name] = None
                continue
            if value is None:
                if p.required:
                    raise MergeParameterError(self.name, p.name, "is required")
                value = p.default
            out[p.name] = _coerce(self.name, p, value, n_models)
        return out


def _coerce(method: str, p: Param, value: Any, n_models: int) -> Any:
    if value is None:
        if p.optional:
            return None
        raise MergeParameterError(method, p.name, "is required")
    if p.per_model:
        if isinstance(value, (list, tuple)):
            if len(value) == 1:
                value = list(value) * n_models
            elif len(value) != n_models:
                raise MergeParameterError(
                    method, p.name,
                    f"got {len(value)} values for {n_models} models (give one, or one per model)",
                )
        else:
            value = [value] * n_models
        return [_coerce_one(method, p, v) for v in value]
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise MergeParameterError(method, p.name, "takes a single value")
        value = value[0]
    return _coerce_one(method, p, value)


def _coerce_one(method: str, p: Param, v: Any) -> Any:
    try:
        if p.kind is bool:
            if not isinstance(v, bool):
                raise TypeError
        elif p.kind is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise TypeError
            v = int(v)
        elif p.kind is float:
            if isinstance(v, bool):
                raise TypeError
            v = float(v)
            if not math.isfinite(v):
                raise ValueError
        elif p.kind is str:
            if not isinstance(v, str):
                raise TypeError
    except (TypeError, ValueError):
        raise MergeParameterError(
            method, p.name, f"expected a finite {p.kind.__name__}, got {v!r}"
        ) from None
    if p.choices is not None and v not in p.choices:
        raise MergeParameterError(method, p.name, f"must be one of {', '.join(p.choices)}; got {v!r}")
    for check in p.checks:
        if not check.predicate(v):
            raise MergeParameterError(method, p.name, f"{check.message}; got {v!r}")
    return v


METHODS: dict[str, MergeMethod] = {}

_SCALARS = (float, int, bool, str)


def _read_param(fname: str, param: inspect.Parameter, hint: Any) -> Param:
    checks: tuple[Check, ...] = ()
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extra = typing.get_args(hint)
        checks = tuple(e for e in extra if isinstance(e, Check))
    optional = False
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"merge method {fname}: parameter {param.name}: unsupported type {hint}")
        optional, hint = True, args[0]
        origin = typing.get_origin(hint)
    per_model = False
    if origin is list:
        (hint,) = typing.get_args(hint)
        per_model = True
    choices = None
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if not all(isinstance(c, str) for c in choices):
            raise TypeError(f"merge method {fname}: parameter {param.name}: Literal of strings only")
        hint = str
    if hint not in _SCALARS:
        raise TypeError(f"merge method {fname}: parameter {param.name}: unsupported type {hint}")
    if param.kind is not inspect.Parameter.KEYWORD_ONLY:
        raise TypeError(f"merge method {fname}: parameter {param.name} must be keyword-only")
    return Param(param.name, hint, per_model, param.default, optional, choices, checks)


def merge_method(
    name: str,
    *,
    pretty_name: str,
    reference_url: str,
    base: Literal["required", "optional", "input"],
    n_models: int | None = None,
    coordinatewise: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register `func` under `name`; reads its parameters from its signature (see module doc).

    Raises:
        TypeError: at import time, if the signature cannot be read or the name is taken.
    """

    def register(func: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise TypeError(f"merge method {name!r} registered twice")
        sig = inspect.signature(func)
        hints = typing.get_type_hints(func, include_extras=True)
        first, *rest = sig.parameters.values()
        if first.name not in ("tensors", "deltas") or hints.get(first.name) is not Tensor:
            raise TypeError(f"merge method {name}: first parameter must be `tensors: Tensor` or `deltas: Tensor`")
        if base == "input" and first.name != "tensors":
            raise TypeError(f"merge method {name}: base='input' needs `tensors`")
        params, random = [], False
        for p in rest:
            if p.name not in hints:
                raise TypeError(f"merge method {name}: parameter {p.name} has no annotation")
            if p.name == "generator":
                if hints[p.name] is not torch.Generator:
                    raise TypeError(f"merge method {name}: generator must be a torch.Generator")
                random = True
                continue
            params.append(_read_param(name, p, hints[p.name]))
        weights = next((p for p in params if p.name == "weights"), None)
        if weights is not None and not (weights.per_model and weights.kind is float):
            raise TypeError(f"merge method {name}: weights must be list[float]")
        METHODS[name] = MergeMethod(
            name=name,
            pretty_name=pretty_name,
            reference_url=reference_url,
            func=func,
            input=first.name,  # type: ignore[arg-type]
            params=tuple(params),
            base=base,
            n_models=n_models,
            random=random,
            doc=inspect.getdoc(func) or "",
            coordinatewise=coordinatewise,
        )
        return func

    return register


def get_method(name: str) -> MergeMethod:
    """The method registered as `name`. Raises `UnknownMethod` listing the known ones."""
    # Importing the families registers them; done here so `registry` itself stays import-light.
    from p2pmodel.merge import gta, interp, robust  # noqa: F401

    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethod(name, sorted(METHODS)) from None
