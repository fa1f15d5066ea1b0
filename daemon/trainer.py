"""Training and evaluation in one worker thread, so the event loop never waits on torch.

`Trainer` owns the task, the model and the `InnerTrainer` (AdamW state persists across
rounds, as DiLoCo wants). Its coroutines hand the work to a single-thread executor and await
it; the loop stays free for DHT records, stream handlers and the status API.

One thread on purpose: training and evaluation share the model's device, and serialising them
keeps peak memory at one model plus one evaluation copy. On CPU, torch's intra-op pool gets
all cores but one (`cpu_thread_budget`), leaving a core for the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

import torch

from p2pmodel.daemon.logs import get_logger
from p2pmodel.tasks import Task
from p2pmodel.training import InnerTrainer, TrainResult, cpu_thread_budget

__all__ = ["Trainer", "TrainingProgress", "resolve_device"]

logger = get_logger(__name__)


def resolve_device(device: str) -> str:
    """`auto` -> "cuda" when a GPU is present, else "cpu"; other values pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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

    def __init__(self, task: Task, device: str, *, lr: float, peer_seed: int, cpu_threads: int = 0):
        self.task = task
        self.device = resolve_device(device)
        self.progress = TrainingProgress()
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pmodel-trainer")
        self._lr, self._peer_seed = lr, peer_seed
        self._cpu_threads = cpu_threads or cpu_thread_budget()
        self._inner: InnerTrainer | None = None
        self._eval_model: torch.nn.Module | None = None

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self, state: Mapping[str, torch.Tensor]) -> None:
        """Build the model and the inner optimizer (in the worker thread), starting from `state`."""
        await self._run(self._start, state)

    def _start(self, state: Mapping[str, torch.Tensor]) -> None:
        model = self.task.build_model()
        model.load_state_dict(dict(state))
        self._inner = InnerTrainer(
            self.task, model, self.device, lr=self._lr, peer_seed=self._peer_seed, cpu_threads=self._cpu_threads
        )

    async def train_round(self, base: Mapping[str, torch.Tensor], steps: int) -> tuple[TrainResult, dict[str, torch.Tensor]]:
        """Load `base`, take up to `steps` inner steps, return (result, delta = theta - base).

        Stops early when `stop()` is called (the delta then covers the steps taken).
        """
        self._stop.clear()
        return await self._run(self._train_round, base, steps)

    def _train_round(self, base, steps):
        assert self._inner is not None, "Trainer.start() first"
        self._inner.load_base(base)
        p = self.progress
        p.step, p.steps, p.loss, p.started = 0, steps, None, time.monotonic()

        def on_step(done: int, loss: float) -> None:
            p.step, p.loss = done, loss

        result = self._inner.train(steps, should_stop=self._stop.is_set, on_step=on_step)
        if result.seconds > 0:
            p.samples_per_s = result.samples / result.seconds
        return result, self._inner.delta()

    async def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The task's eval metrics of the parameters `state` (on a separate model copy)."""
        return await self._run(self._evaluate, state)

    def _evaluate(self, state):
        if self._eval_model is None:
            self._eval_model = self.task.build_model().to(self.device)
        self._eval_model.load_state_dict(dict(state))
        self._eval_model.eval()
        with torch.no_grad():
            return {k: float(v) for k, v in self.task.evaluate(self._eval_model, self.device).items()}

    async def call(self, fn, *args):
        """Run any other heavy function (merge, encode, decode) in the worker thread."""
        return await self._run(fn, *args)

    def stop(self) -> None:
        """Ask the current training to end after its current step."""
        self._stop.set()

    def close(self) -> None:
        """Stop training and release the thread (does not wait for a step in progress)."""
        self._stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
