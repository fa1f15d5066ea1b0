"""Training and evaluation in one worker thread, so the event loop never waits on torch.

`Trainer` owns the task, the model and the `InnerTrainer` (AdamW state persists across
rounds, as DiLoCo wants). Its coroutines hand the work to a single-thread executor and await
it; the loop stays free for DHT records, stream handlers and the status API.

Two threads: one trains, nothing else (so training never queues behind a merge, an encode or
an evaluation); the other runs those, each a named coroutine (`encode`, `decoded_norm`,
`check_delta`, `build_version`, `evaluate`), evaluation on its own copy of the model. On CPU,
torch's intra-op pool gets all cores but one (`cpu_thread_budget`), leaving a core for the
event loop.

Training never waits for the network: when a round's steps are done, `train_ahead()` keeps
training from the local model while the swarm merges and commits; the next `train_round`
rebases those steps onto the committed version (`InnerTrainer.rebase`) and counts them in
that round's budget.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from p2pmodel.daemon.logs import get_logger
from p2pmodel.errors import P2PModelError
from p2pmodel.lineage import LineageStore, Version
from p2pmodel.protocols.codec import DeltaCodec, EncodedDelta, ErrorFeedback
from p2pmodel.screening import DeltaScreen
from p2pmodel.tasks import Task
from p2pmodel.training import InnerTrainer, LRSchedule, TrainResult, cpu_thread_budget
from p2pmodel.versioning import Contribution, OuterOptimizer, RoundSpec, build_round_version

__all__ = ["Trainer", "TrainingProgress", "CheckedDelta", "PendingContribution", "VersionJob", "resolve_device"]

logger = get_logger(__name__)


def resolve_device(device: str) -> str:
    """`auto` -> "cuda" when a GPU is present, else "cpu"; other values pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass(frozen=True)
class CheckedDelta:
    """A fetched delta decoded and checked: its tensors and L2 norm, or why it is unusable."""

    decoded: dict[str, torch.Tensor] | None
    norm: float | None
    reason: str  # "" when usable


@dataclass(frozen=True)
class PendingContribution:
    """A listed delta on its way into a merge: decoded already, or its encoded bytes."""

    peer_id: str
    delta_hash: str
    weight: float
    delta: Mapping[str, torch.Tensor] | bytes


@dataclass(frozen=True)
class VersionJob:
    """Everything building a round's version takes: the proposal's deltas on the store's base."""

    store: LineageStore
    spec: RoundSpec
    deltas: Sequence[PendingContribution]
    codec: DeltaCodec
    outer: OuterOptimizer
    screen: DeltaScreen | None

    def run(self) -> tuple[Version, dict[str, torch.Tensor]]:
        """Decode the deltas still encoded, then `versioning.build_round_version`."""
        manifest = self.store.get_version(self.spec.base_version).tensors
        contributions = [
            Contribution(d.peer_id, d.delta_hash, d.weight, self.codec.decode(d.delta, manifest) if isinstance(d.delta, bytes) else d.delta)
            for d in self.deltas
        ]
        return build_round_version(self.store, self.spec, contributions, self.outer, self.screen)


@dataclass
class TrainingProgress:
    """Read by the status API while the worker thread updates it (plain ints/floats: no lock)."""

    step: int = 0
    steps: int = 0
    loss: float | None = None
    samples_per_s: float = 0.0
    started: float = 0.0


class Trainer:
    """The task's model, its inner optimizer, and the worker thread that runs them."""

    def __init__(self, task: Task, device: str, *, lr: float, peer_seed: int, cpu_threads: int = 0,
                 lr_schedule: LRSchedule | None = None):  # fmt: skip
        self.task = task
        self.device = resolve_device(device)
        self.progress = TrainingProgress()
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pmodel-trainer")
        self._aux = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pmodel-merge")
        self._lr, self._lr_schedule, self._peer_seed = lr, lr_schedule, peer_seed
        self._cpu_threads = cpu_threads or cpu_thread_budget()
        self._inner: InnerTrainer | None = None
        self._eval_model: torch.nn.Module | None = None
        self._ahead: asyncio.Future | None = None  # training ahead of the next round, if running
        self._ahead_stop = threading.Event()
        self._finish = threading.Event()  # end the current round's steps early (the others are done)
        # (seconds of finished training calls, monotonic start of the call in progress or None),
        # swapped as one tuple so the event loop never reads one half updated
        self._busy: tuple[float, float | None] = (0.0, None)
        self.step_seconds: float | None = None  # moving average of one inner step's wall time

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run_aux(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._aux, fn, *args)

    @property
    def busy_seconds(self) -> float:
        """Wall seconds spent taking inner steps since start (the training share's numerator),
        the call in progress included: steps taken ahead while a round merges count in that round,
        not in the next one once the call ends (where the share, capped at the round's length,
        lost them: a 4-peer bench read 78% for its first round and 94% overall)."""
        done, since = self._busy
        return done + (time.monotonic() - since if since is not None else 0.0)

    async def start(self, state: Mapping[str, torch.Tensor]) -> None:
        """Build the model and the inner optimizer (in the worker thread), starting from `state`."""
        await self._run(self._start, state)

    def _start(self, state: Mapping[str, torch.Tensor]) -> None:
        model = self.task.build_model()
        model.load_state_dict(dict(state))
        self._inner = InnerTrainer(
            self.task, model, self.device, lr=self._lr, peer_seed=self._peer_seed, cpu_threads=self._cpu_threads,
            lr_schedule=self._lr_schedule,
        )  # fmt: skip

    async def train_round(
        self, base: Mapping[str, torch.Tensor], steps: int, first_step: int = 0
    ) -> tuple[TrainResult, dict[str, torch.Tensor]]:
        """Train up to `steps` inner steps from `base`; return (result, delta = theta - base).

        Steps already taken ahead (see `train_ahead`) are rebased onto `base` and count toward
        `steps`; the result's steps and samples include them. Stops early when `stop()` is
        called (the delta then covers the steps taken). `first_step` is the round's place on
        the swarm's step clock (the lr schedule's); steps taken ahead count as this round's first.
        """
        ahead = await self._stop_ahead()
        self._stop.clear()
        result, delta = await self._run(self._train_round, base, steps, ahead, first_step)
        return result, delta

    def _train_round(self, base, steps, ahead: TrainResult | None, first_step: int = 0):
        assert self._inner is not None, "Trainer.start() first"
        if ahead is not None and ahead.steps:
            self._inner.rebase(base)
            self._inner.step = first_step + ahead.steps  # back on the swarm's clock, whatever the last round took
        else:
            self._inner.load_base(base)
            self._inner.step = first_step
            ahead = None
        done = ahead.steps if ahead else 0
        # at least one step of our own after a rebase, then stop as soon as the others are done
        result = self._steps(
            max(0, steps - done), offset=done, total=steps,
            stop=lambda: self._stop.is_set() or (self._finish.is_set() and self.progress.step > done),
        )  # fmt: skip
        if ahead is not None:
            seconds = result.seconds + ahead.seconds
            losses = [(r.mean_loss, r.steps) for r in (ahead, result) if r.steps]
            mean = sum(m * n for m, n in losses) / max(1, sum(n for _, n in losses))
            result = TrainResult(ahead.steps + result.steps, ahead.samples + result.samples, mean, seconds)
        return result, self._inner.delta()

    def _steps(self, steps: int, *, offset: int = 0, total: int | None = None, stop=None) -> TrainResult:
        p = self.progress
        p.step, p.steps, p.loss, p.started = offset, total or steps, None, time.monotonic()

        def on_step(done: int, loss: float) -> None:
            p.step, p.loss = offset + done, loss

        stop = stop or self._stop.is_set
        self._busy = (self._busy[0], time.monotonic())
        try:
            result = self._inner.train(steps, should_stop=stop, on_step=on_step)
        finally:
            done, since = self._busy
            self._busy = (done + time.monotonic() - since if since is not None else done, None)
        if result.steps:
            per_step = result.seconds / result.steps
            self.step_seconds = per_step if self.step_seconds is None else 0.7 * self.step_seconds + 0.3 * per_step
        if result.seconds > 0:
            p.samples_per_s = result.samples / result.seconds
        return result

    def finish_early(self, finish: bool = True) -> None:
        """End this round's `train_round` after its next own step (False: the next round began, forget it)."""
        if finish:
            self._finish.set()
        else:
            self._finish.clear()

    def train_ahead(self, max_steps: int) -> None:
        """Keep training from the local model (at most `max_steps`) until the next `train_round`."""
        if self._ahead is not None or self._inner is None or self._stop.is_set():
            return
        self._ahead_stop.clear()
        self._ahead = asyncio.ensure_future(self._run(self._train_ahead, max_steps))

    def _train_ahead(self, max_steps: int) -> TrainResult:
        assert self._inner is not None
        self._inner.load_base(self._inner.model.state_dict())  # the local model is the new reference
        return self._steps(max_steps, stop=lambda: self._ahead_stop.is_set() or self._stop.is_set())

    async def _stop_ahead(self) -> TrainResult | None:
        if self._ahead is None:
            return None
        self._ahead_stop.set()
        try:
            return await self._ahead
        finally:
            self._ahead = None

    async def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The task's eval metrics of the parameters `state` (on a separate model copy, off the training thread)."""
        return await self._run_aux(self._evaluate, state)

    def _evaluate(self, state):
        if self._eval_model is None:
            self._eval_model = self.task.build_model().to(self.device)
        self._eval_model.load_state_dict(dict(state))
        self._eval_model.eval()
        with torch.no_grad():
            return {k: float(v) for k, v in self.task.evaluate(self._eval_model, self.device).items()}

    # The other heavy work, in the second thread beside training, one coroutine per job:

    async def encode(self, feedback: ErrorFeedback, delta: Mapping[str, torch.Tensor]) -> EncodedDelta:
        """Our delta encoded through our error feedback (which it updates)."""
        return await self._run_aux(feedback.encode, delta)

    async def decoded_norm(self, codec: DeltaCodec, data: bytes, manifest: Mapping[str, Any]) -> float:
        """The L2 norm of `data` as the others decode it (screening compares norms)."""
        return await self._run_aux(_decoded_norm, codec, data, manifest)

    async def check_delta(self, codec: DeltaCodec, data: bytes, manifest: Mapping[str, Any]) -> CheckedDelta:
        """A fetched delta decoded (every size checked before allocating) and its values checked."""
        return await self._run_aux(_check_delta, codec, data, manifest)

    async def build_version(self, job: VersionJob) -> tuple[Version, dict[str, torch.Tensor]]:
        """Decode what is not decoded yet and build the round's version (`VersionJob.run`)."""
        return await self._run_aux(job.run)

    def stop(self) -> None:
        """Ask the current training to end after its current step."""
        self._stop.set()

    def close(self) -> None:
        """Stop training and release the thread (does not wait for a step in progress)."""
        self._stop.set()
        self._ahead_stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._aux.shutdown(wait=False, cancel_futures=True)


def _decoded_norm(codec: DeltaCodec, data: bytes, manifest: Mapping[str, Any]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in codec.decode(data, manifest).values()))


def _check_delta(codec: DeltaCodec, data: bytes, manifest: Mapping[str, Any]) -> CheckedDelta:
    try:
        decoded = codec.decode(data, manifest)
    except (ValueError, P2PModelError) as e:
        return CheckedDelta(None, None, f"does not decode: {str(e)[:120]}")
    sq = 0.0
    for name, t in decoded.items():
        if not torch.isfinite(t).all():
            return CheckedDelta(None, None, f"non-finite values in {name}")
        sq += float(t.double().square().sum())
    return CheckedDelta(decoded, math.sqrt(sq), "")

