"""The two optimisers of a DiLoCo round: the inner loop each peer runs, and the outer step.

DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
Models", 2023, arXiv:2311.08105) splits training in two:

- **Inner:** every peer starts from the round's base parameters `theta` and takes `H` steps
  of AdamW on its own data. Its contribution is the pseudo-gradient's negative, the delta
  `theta_local - theta`. The AdamW state is *not* reset between rounds: it stays with the
  peer (`InnerTrainer`).
- **Outer:** the swarm merges the deltas into one `merged_delta` and every peer applies the
  same SGD step with Nesterov momentum to `theta` (`outer_step`). The paper's settings are
  outer learning rate 0.7 and momentum 0.9; with lr 1 and momentum 0 the step is plain
  averaging (FedAvg / model soups): `theta + merged_delta`.

`outer_step` is pure, on CPU, in float32, with an explicit order of elementwise operations
(no fused multiply-adds), so every peer computes bit-identical parameters from identical
inputs — the committed version's id depends on it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from p2pmodel.errors import P2PModelError
from p2pmodel.tasks import Task, batch_size_of

__all__ = ["InnerTrainer", "LRSchedule", "TrainResult", "TrainingError", "outer_step", "cpu_thread_budget", "DILOCO_OUTER_LR", "DILOCO_OUTER_MOMENTUM"]

log = logging.getLogger(__name__)

DILOCO_OUTER_LR = 0.7  # Douillard et al. 2023, the outer Nesterov learning rate
DILOCO_OUTER_MOMENTUM = 0.9  # ... and its momentum


class TrainingError(P2PModelError):
    """Training or the outer step was given inputs that do not fit together.

    Fields: `reason` (one line) and `names` (the tensor names concerned, possibly empty).
    """

    def __init__(self, reason: str, names: tuple[str, ...] = ()):
        shown = f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""
        super().__init__(f"{reason}{shown}")
        self.reason = reason
        self.names = names


@dataclass(frozen=True)
class LRSchedule:
    """The inner learning rate over an event's planned steps: linear warm-up, then cosine decay.

    `factor(step)` multiplies AdamW's base `lr`. Step numbers are the swarm's shared clock
    (a round's first step is `round * H`), not a peer's own count, so every peer is at the
    same learning rate in the same round whatever it did before. Past `total_steps` the
    factor stays at `final`. Why decay: the drift between peers' local models over a round
    grows with the learning rate, and the averaged model gains most once it is small (as in
    post-local SGD and SWA); DDP with the same schedule is the fair reference.
    """

    total_steps: int
    warmup_steps: int = 0
    final: float = 0.1  # the factor at and after `total_steps`

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps < self.total_steps or not 0 <= self.final <= 1:
            raise TrainingError(f"bad LRSchedule: need total_steps >= 1, 0 <= warmup_steps < total_steps, 0 <= final <= 1 ({self})")

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainResult:
    """What one call of `InnerTrainer.train` did."""

    steps: int  # optimizer steps taken (fewer than asked if stopped early)
    samples: int  # training samples consumed (the weight of this peer's delta in FedAvg)
    mean_loss: float  # mean training loss over those steps (nan if no step was taken)
    seconds: float  # wall time of the steps, including data loading


def cpu_thread_budget(reserve: int = 1) -> int:
    """Threads for CPU training: the cores this process may use, less `reserve`, at least 1.

    Why leave a core: torch's intra-op pool spins its threads at full speed. If it takes
    every core, the asyncio event loop in another thread of the same process (heartbeats,
    DHT records, stream handlers) waits for a time slice behind it and its lag grows to
    hundreds of milliseconds. One spare core keeps the loop's lag at a few ms.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - reserve)


class InnerTrainer:
    """AdamW inner loop of one peer, with optimizer state that persists across rounds.

    Typical round::

        trainer.load_base(head_state)       # parameters := the round's base; AdamW state kept
        result = trainer.train(H, should_stop=stop_event.is_set)
        delta = trainer.delta()             # theta_local - base, float32 on CPU

    Args:
        task: the training task (provides batches and the loss).
        model: the task's model; moved to `device`. Its current parameters are the first base.
        device: "cpu", "cuda", "cuda:1", or a `torch.device`.
        lr, weight_decay, betas: AdamW's settings (DiLoCo uses AdamW for the inner steps).
        peer_seed: selects this peer's data shard (`task.batches(peer_seed, device)`).
        amp: mixed precision: "auto" (bf16 on CUDA when supported, else fp16 with a
            GradScaler; off on CPU), "bf16", "fp16" or "off".
        grad_clip: clip the gradient's global norm to this (None: no clipping).
        cpu_threads: torch threads when training on CPU; None means `cpu_thread_budget()`.
            Note that `torch.set_num_threads` is process-wide.
        lr_schedule: scales `lr` by `lr_schedule.factor(step)` before each step, where `step`
            is `self.step` (set it to the round's first step; it advances with every step).
            None: a constant `lr`.
    """

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        device: torch.device | str = "cpu",
        *,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        peer_seed: int = 0,
        amp: str = "auto",
        grad_clip: float | None = 1.0,
        cpu_threads: int | None = None,
        lr_schedule: LRSchedule | None = None,
    ):
        self.task = task
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError(f"device {self.device} requested but CUDA is not available")
        self.model = model.to(self.device)
        self.model.train()
        self.amp_dtype = self._pick_amp(amp)
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
        self.lr, self.lr_schedule = lr, lr_schedule
        self.step = 0  # the swarm's step number of the next step (see `lr_schedule`)
        # GradScaler only for fp16: bf16 has fp32's exponent range and needs no loss scaling.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype is torch.float16 else None
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads or cpu_thread_budget())
        self.peer_seed = peer_seed
        self._batches: Iterator = iter(task.batches(peer_seed, self.device))
        self._base = _cpu_float32(self.model.state_dict())

    def _pick_amp(self, amp: str) -> torch.dtype | None:
        if amp not in ("auto", "bf16", "fp16", "off"):
            raise TrainingError(f"amp must be auto, bf16, fp16 or off, not {amp!r}")
        if amp == "off" or (amp == "auto" and self.device.type != "cuda"):
            return None
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if amp == "bf16" else torch.float16

    @property
    def amp(self) -> str:
        """The mixed precision in use: "bf16", "fp16" or "off"."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.amp_dtype]

    def load_base(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Set the parameters to the round's base, and remember it for `delta()`.

        The AdamW moments are kept on purpose (DiLoCo keeps the inner optimizer's state
        across rounds). Raises `TrainingError` if names or shapes differ from the model's.
        """
        own = self.model.state_dict()
        missing = tuple(k for k in own if k not in state_dict)
        extra = tuple(k for k in state_dict if k not in own)
        if missing or extra:
            raise TrainingError("base state does not match the model", missing + extra)
        bad = tuple(k for k, t in own.items() if tuple(state_dict[k].shape) != tuple(t.shape))
        if bad:
            raise TrainingError("base tensors have the wrong shape", bad)
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(state_dict[k])  # in place: the optimizer holds these very tensors
        self._base = _cpu_float32(own)

    def rebase(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Move the work done since the last base onto a new base: `theta := new + (theta - base)`.

        This is how training overlaps the network: a peer keeps training from its local model
        while the swarm merges the last round, then rebases those steps onto the committed
        version (one-round-stale updates, as in streaming/eager DiLoCo). `delta()` is then
        relative to `state_dict`. AdamW moments are kept, as in `load_base`.
        """
        done = self.delta()
        self.load_base(state_dict)
        with torch.no_grad():
            for k, t in self.model.state_dict().items():
                t.add_(done[k].to(t.device, t.dtype))

    def delta(self) -> dict[str, torch.Tensor]:
        """`theta_local - base` per state-dict entry, float32 on CPU, in state-dict order."""
        current = _cpu_float32(self.model.state_dict())
        return {k: torch.sub(current[k], self._base[k]) for k in current}

    def train(
        self,
        steps: int,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> TrainResult:
        """Take up to `steps` AdamW steps on this peer's batches.

        Args:
            steps: how many optimizer steps to take.
            should_stop: polled before each step; training ends early when it returns True
                (the round's deadline passed, or the node is shutting down).
            on_step: called after each step with (steps done so far, that step's loss).
                Reading the loss synchronises with the GPU, which is why it is only done
                when someone listens; otherwise the losses are summed on the device.

        Returns:
            A `TrainResult`; a non-finite loss is reported, not raised (the CI gate and
            the merge's checks reject what it produces).
        """
        self.model.train()
        start = time.perf_counter()
        done = samples = 0
        loss_sum = torch.zeros((), device=self.device)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        while done < steps and not (should_stop and should_stop()):
            batch = next(self._batches)
            if self.lr_schedule is not None:
                lr = self.lr * self.lr_schedule.factor(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            with autocast:
                loss = self.task.loss(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                self._clip()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self._clip()
                self.optimizer.step()
            done += 1
            self.step += 1
            samples += batch_size_of(batch)
            loss_sum += loss.detach().float()
            if on_step is not None:
                on_step(done, float(loss.detach()))
        mean_loss = float(loss_sum) / done if done else float("nan")  # float() waits for the GPU
        seconds = time.perf_counter() - start
        log.debug("trained %d steps (%d samples) in %.2fs, mean loss %.4f", done, samples, seconds, mean_loss)
        return TrainResult(steps=done, samples=samples, mean_loss=mean_loss, seconds=seconds)

    def _clip(self) -> None:
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)


def _cpu_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: on CPU, .float() of a float32 tensor returns the same storage, which training
    # would then change under us.
    return {k: t.detach().to("cpu", torch.float32, copy=True) for k, t in state.items()}


def outer_step(
    base: Mapping[str, torch.Tensor],
    merged_delta: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor] | None,
    lr: float = DILOCO_OUTER_LR,
    mu: float = DILOCO_OUTER_MOMENTUM,
    nesterov: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """DiLoCo's outer step: SGD with (Nesterov) momentum on the outer gradient.

    Per tensor, in float32 on CPU, in exactly this order (each line one rounding)::

        g      = -merged_delta                     # the outer gradient
        m'     = mu * m + g                        # m = 0 when momentum is None
        update = g + mu * m'   (nesterov)   or   m'   (plain momentum)
        theta' = theta - lr * update

    This is `torch.optim.SGD(momentum=mu, nesterov=...)` applied to `g`, as in DiLoCo
    (Douillard et al. 2023, arXiv:2311.08105: lr 0.7, mu 0.9). With `lr=1, mu=0` it is
    exactly plain averaging: `theta' = theta + merged_delta`, bit for bit.

    Args:
        base: the round's base parameters theta (name -> tensor).
        merged_delta: the merged delta, same names and shapes as `base`.
        momentum: the outer momentum m from the previous round (same names), or None.
        lr: outer learning rate.
        mu: momentum coefficient.
        nesterov: Nesterov momentum (True, DiLoCo) or plain heavy-ball momentum.

    Returns:
        `(new_params, new_momentum)`: new float32 CPU tensors, keyed in `base`'s order. The
        inputs are not modified.

    Raises:
        TrainingError: names or shapes of the three mappings disagree.
    """
    _check_same_layout("merged delta", base, merged_delta)
    if momentum is not None:
        _check_same_layout("momentum", base, momentum)
    new_params: dict[str, torch.Tensor] = {}
    new_momentum: dict[str, torch.Tensor] = {}
    for name, theta in base.items():
        theta = theta.detach().to("cpu", torch.float32)
        g = torch.neg(merged_delta[name].detach().to("cpu", torch.float32))
        if momentum is None:
            m_new = torch.add(torch.zeros_like(g), g)  # mu * 0 + g, without relying on mu's value
        else:
            m_new = torch.add(torch.mul(momentum[name].detach().to("cpu", torch.float32), mu), g)
        update = torch.add(g, torch.mul(m_new, mu)) if nesterov else m_new
        new_params[name] = torch.sub(theta, torch.mul(update, lr))
        new_momentum[name] = m_new
    return new_params, new_momentum


def _check_same_layout(what: str, base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> None:
    missing = tuple(k for k in base if k not in other)
    extra = tuple(k for k in other if k not in base)
    if missing or extra:
        raise TrainingError(f"{what} and base have different tensor names", missing + extra)
    bad = tuple(k for k in base if tuple(base[k].shape) != tuple(other[k].shape))
    if bad:
        raise TrainingError(f"{what} and base have different shapes", bad)
