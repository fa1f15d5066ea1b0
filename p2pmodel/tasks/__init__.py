"""Training-task plugins: what a swarm trains, on what data, and how it is scored.

- `__init__.py` — the `Task` protocol (the plugin interface), `load_task`, `TaskError`.
- `charlm.py`   — `CharLMTask`, the built-in task: a small GPT on the bytes of the Python
  standard library's own source files (every machine with Python has them).
- `hf.py`       — `HFCausalLMTask`, an adapter for a local Hugging Face causal LM folder
  (needs the optional `transformers` dependency, imported only when the task is built).

Writing a task
--------------
A task is any object with the members of `Task` below; it need not inherit from anything.
Point a swarm at it with `load_task("package.module:object", **options)`, where `object`
is a task instance, a class, or a factory function taking the options as keywords.

Every peer builds the task from the same spec and options, so everything a task does must
be a pure function of them (and of `peer_seed` where one is passed): the seed model, each
peer's batches and the evaluation. Randomness comes from seeded generators owned by the
task, never from the global RNG state, which the host process may share with other code.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Protocol, runtime_checkable

import torch

from p2pmodel.errors import P2PModelError

__all__ = ["Task", "Batch", "TaskError", "load_task", "batch_size_of", "BUILTIN_TASKS"]

Batch = Any
"""Whatever a task's `batches` yields and its `loss` consumes (charlm: `(inputs, targets)`)."""


@runtime_checkable
class Task(Protocol):
    """The interface a training task implements. See the module docstring for the rules."""

    name: str
    """Short human-readable name, shown in logs and status (e.g. "charlm")."""

    def build_model(self) -> torch.nn.Module:
        """Return a freshly initialised model, on CPU, in float32 unless the task says otherwise.

        Must be deterministic: two calls (in any process, on any peer) return models with
        bit-identical state dicts, because every peer of a new swarm builds the seed model
        itself. Seed a local `torch.Generator` (or use `torch.random.fork_rng`); do not
        depend on the caller's global RNG state.
        """
        ...

    def batches(self, peer_seed: int, device: torch.device | str) -> Iterator[Batch]:
        """Yield this peer's training batches, on `device`, forever.

        The stream is a deterministic function of the task and `peer_seed`; peers with
        different seeds should see different data (their own shard), so that their deltas
        carry different information. The leading dimension of the batch's tensors is the
        number of samples (see `batch_size_of`).
        """
        ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Return the scalar training loss of `model` on `batch` (differentiable)."""
        ...

    def evaluate(self, model: torch.nn.Module, device: torch.device | str) -> dict[str, float]:
        """Score `model` on the task's held-out shard; return at least `{"eval_loss": ...}`.

        Deterministic (fixed eval batches, no dropout: call `model.eval()` and restore the
        mode afterwards), never trained on by any peer, and cheap: it runs in every round's
        CI gate, so it should take well under ~2 s on a CPU.
        """
        ...

    def config(self) -> dict[str, Any]:
        """Return the options that rebuild this task: `load_task(spec, **task.config())`.

        JSON-serialisable (it is recorded in the event manifest and shown to people).
        """
        ...


class TaskError(P2PModelError):
    """A task spec or its options could not be turned into a working task.

    Fields: `spec` (what was asked for) and `reason` (why it failed, one line).
    """

    exit_code = 2

    def __init__(self, spec: str, reason: str):
        super().__init__(f"cannot load task {spec!r}: {reason}")
        self.spec = spec
        self.reason = reason


def _charlm(**options: Any) -> Task:
    from p2pmodel.tasks.charlm import CharLMTask

    return CharLMTask(**options)


def _hf(**options: Any) -> Task:
    from p2pmodel.tasks.hf import HFCausalLMTask

    return HFCausalLMTask(**options)


BUILTIN_TASKS = {"charlm": _charlm, "hf": _hf}
"""Built-in task names and their factories (imported lazily: `hf` needs transformers)."""


def load_task(spec: str, **options: Any) -> Task:
    """Build the task named by `spec` with `options`.

    Args:
        spec: a built-in name (`"charlm"`, `"hf"`) or `"package.module:object"`, where
            `object` (a dotted attribute path is allowed) is a task instance, a class or a
            factory; a class or factory is called with `options` as keyword arguments.
        options: keyword options for the task (see each task's constructor).

    Returns:
        An object satisfying `Task`.

    Raises:
        TaskError: the spec is malformed, the module or object does not exist, the options
            are rejected, or the result is not a task.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(str(spec), "expected a built-in name or 'package.module:object'")
    if spec in BUILTIN_TASKS:
        return _call_factory(spec, BUILTIN_TASKS[spec], options)
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise TaskError(spec, f"not a built-in task ({known}) and not of the form 'package.module:object'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise TaskError(spec, f"module {e.name!r} not found") from e
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise TaskError(spec, f"{module_name!r} has no attribute {attr_path!r}") from e
    if isinstance(obj, Task) and not isinstance(obj, type):
        if options:
            raise TaskError(spec, f"is a task instance and takes no options (got {sorted(options)})")
        return obj
    if not callable(obj):
        raise TaskError(spec, f"is a {type(obj).__name__}, not a task, task class or factory")
    return _call_factory(spec, obj, options)


def _call_factory(spec: str, factory: Any, options: dict[str, Any]) -> Task:
    try:
        task = factory(**options)
    except TaskError:
        raise
    except TypeError as e:
        # Almost always an unknown or missing keyword; say which, without a traceback.
        raise TaskError(spec, f"bad options: {e}") from e
    if not isinstance(task, Task):
        missing = [m for m in ("name", "build_model", "batches", "loss", "evaluate", "config") if not hasattr(task, m)]
        raise TaskError(spec, f"built a {type(task).__name__}, which lacks {', '.join(missing)}")
    return task


def batch_size_of(batch: Batch) -> int:
    """Number of samples in `batch`: the leading dimension of its first tensor.

    Accepts a tensor, a tuple/list whose first element is a tensor, or a mapping whose first
    value is a tensor (the shapes `Task.batches` documents).
    """
    first: Any = batch
    if isinstance(batch, dict):
        first = next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)):
        first = batch[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise TypeError(f"cannot count samples in a batch of type {type(batch).__name__}")
    return int(first.shape[0])
