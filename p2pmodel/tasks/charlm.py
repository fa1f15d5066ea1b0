"""`charlm`: a small GPT over the bytes of the Python standard library's own source.

Every machine that runs p2pmodel has Python, so every peer has this corpus without a
download. The model is nanoGPT's shape at toy size (pre-LN blocks of causal self-attention
and an MLP, tied input/output embeddings), with a fixed vocabulary of the 256 byte values,
so nothing about the vocabulary depends on the data. The defaults (~0.4M parameters,
context 64, batch 32) are sized so that a swarm of a few CPU processes visibly learns in
minutes: eval loss falls from ln(256) ~ 5.5 to below ~3 within a couple of hundred steps.

Data layout (all deterministic, so every peer agrees without talking):

- The corpus is every `*.py` under `sysconfig.get_paths()["stdlib"]`, skipping
  site-packages and test folders (distributions often strip those), ordered by the
  POSIX form of the path relative to that root.
- A file belongs to the held-out eval shard when the first byte of sha256 of its relative
  path is below `256 * eval_fraction`; no peer ever trains on it. The eval batches are
  fixed windows at evenly spaced offsets of the first `eval_bytes` of that shard.
- A peer's training shard is the non-eval files in an order shuffled by
  `(seed, peer_seed)`, read until `train_bytes` are in memory; its batches are random
  windows of that text, drawn from a generator seeded by `(seed, peer_seed)`.

Peers with different Python versions see slightly different corpora;
`CharLMTask.data_fingerprint()` tells them apart (eval metrics are only comparable between
peers with the same fingerprint).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from p2pmodel.tasks import TaskError

__all__ = ["CharLMConfig", "CharLMTask", "CharGPT", "stdlib_corpus"]

VOCAB = 256  # byte values; no tokenizer, no data-dependent vocabulary
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclass(frozen=True)
class CharLMConfig:
    """Options of the charlm task (all keyword options of `load_task("charlm", ...)`)."""

    seed: int = 0  # seeds the model's init and every peer's data order
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    context: int = 64  # bytes of context per sample
    batch_size: int = 32  # samples per training batch
    train_bytes: int = 2_000_000  # bytes of text each peer keeps in memory to train on
    eval_fraction: float = 1 / 16  # share of files (by path hash) held out for evaluation
    eval_bytes: int = 262_144  # bytes of the eval shard the eval windows are spread over
    eval_batches: int = 8  # fixed eval batches of `batch_size` windows each
    data_dir: str | None = None  # corpus root; None means the running Python's stdlib

    def validate(self) -> None:
        """Raise `TaskError` for options that cannot work."""
        positive = ("n_layer", "n_head", "n_embd", "context", "batch_size", "train_bytes", "eval_bytes", "eval_batches")
        for field in positive:
            if getattr(self, field) <= 0:
                raise TaskError("charlm", f"{field} must be positive, got {getattr(self, field)}")
        if self.n_embd % self.n_head:
            raise TaskError("charlm", f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 < self.eval_fraction < 1.0:
            raise TaskError("charlm", f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


# ---------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A GPT over bytes. `forward(idx: (B, T) int64) -> logits (B, T, 256)`.

    The output projection reuses the token embedding (weight tying) through `F.linear`
    rather than a second module sharing the parameter, so the state dict holds each
    tensor once (safetensors refuses shared storage, and a delta per alias would double
    count it).
    """

    def __init__(self, cfg: CharLMConfig):
        super().__init__()
        self.context = cfg.context
        self.tok_emb = nn.Embedding(VOCAB, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.context, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.context}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok_emb.weight)  # (B, T, 256)

    def reset_parameters(self, generator: torch.Generator, n_layer: int) -> None:
        """nanoGPT's init from `generator` alone: N(0, 0.02), zero biases, unit LayerNorms,
        and residual output projections scaled by 1/sqrt(2 * n_layer) (GPT-2)."""
        residual_std = 0.02 / math.sqrt(2 * n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():  # registration order: deterministic
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_"):
                    p.fill_(1.0)
                else:
                    std = residual_std if name.endswith("proj.weight") else 0.02
                    p.normal_(0.0, std, generator=generator)


# ---------------------------------------------------------------- data


def _digest_int(*parts: object) -> int:
    """A 63-bit seed from `parts`, stable across processes (unlike `hash()`)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


@functools.lru_cache(maxsize=4)
def stdlib_corpus(root: str | None = None) -> tuple[tuple[str, str], ...]:
    """List the corpus: `(relative POSIX path, absolute path)` of every `*.py` under `root`
    (default: this Python's stdlib), skipping site-packages and test folders, sorted."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for fn in filenames:
            if fn.endswith(".py"):
                path = Path(dirpath, fn)
                files.append((path.relative_to(base).as_posix(), str(path)))
    files.sort()
    return tuple(files)


def _read_until(paths: list[str], budget: int) -> bytes:
    """Concatenate files (newline-separated) until `budget` bytes, cutting the last one."""
    chunks, size = [], 0
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue  # an unreadable file is simply not part of this machine's corpus
        chunks.append(data + b"\n")
        size += len(data) + 1
        if size >= budget:
            break
    return b"".join(chunks)[:budget]


def _is_eval(relpath: str, eval_fraction: float) -> bool:
    return hashlib.sha256(relpath.encode()).digest()[0] < 256 * eval_fraction


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@functools.lru_cache(maxsize=8)
def _train_text(cfg: CharLMConfig, peer_seed: int) -> torch.Tensor:
    files = [abs_ for rel, abs_ in stdlib_corpus(cfg.data_dir) if not _is_eval(rel, cfg.eval_fraction)]
    random.Random(_digest_int("charlm", cfg.seed, peer_seed, "files")).shuffle(files)
    return _as_tensor(_read_until(files, cfg.train_bytes))


@functools.lru_cache(maxsize=4)
def _eval_text(cfg: CharLMConfig) -> torch.Tensor:
    files = [abs_ for rel, abs_ in stdlib_corpus(cfg.data_dir) if _is_eval(rel, cfg.eval_fraction)]
    return _as_tensor(_read_until(files, cfg.eval_bytes))


def _windows(text: torch.Tensor, offsets: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut `(inputs, targets)` windows of `context` bytes, targets shifted by one."""
    idx = offsets[:, None] + torch.arange(context + 1)  # (B, T+1)
    chunk = text[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------- task


class CharLMTask:
    """The built-in task. Options: the fields of `CharLMConfig`, as keywords."""

    name = "charlm"

    def __init__(self, **options: Any):
        try:
            self.cfg = CharLMConfig(**options)
        except TypeError as e:
            raise TaskError("charlm", f"bad options: {e}") from e
        self.cfg.validate()
        corpus = stdlib_corpus(self.cfg.data_dir)
        if not corpus:
            raise TaskError("charlm", f"no *.py files under {self.cfg.data_dir or 'the stdlib'}")
        self._eval: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def build_model(self) -> CharGPT:
        # fork_rng: the layers' default init draws from the global RNG; leave it untouched.
        with torch.random.fork_rng(devices=[]):
            model = CharGPT(self.cfg)
        model.reset_parameters(torch.Generator().manual_seed(_digest_int("charlm", self.cfg.seed, "init")), self.cfg.n_layer)
        return model

    def train_files(self, peer_seed: int) -> list[str]:
        """Relative paths this peer may train on, in its reading order (a superset of what
        `train_bytes` lets it load)."""
        rels = [rel for rel, _ in stdlib_corpus(self.cfg.data_dir) if not _is_eval(rel, self.cfg.eval_fraction)]
        random.Random(_digest_int("charlm", self.cfg.seed, peer_seed, "files")).shuffle(rels)
        return rels

    def eval_files(self) -> list[str]:
        """Relative paths of the held-out eval shard."""
        return [rel for rel, _ in stdlib_corpus(self.cfg.data_dir) if _is_eval(rel, self.cfg.eval_fraction)]

    def data_fingerprint(self) -> str:
        """Short hex digest of the corpus listing and eval text: equal on peers whose eval
        metrics are comparable."""
        h = hashlib.sha256()
        for rel, _ in stdlib_corpus(self.cfg.data_dir):
            h.update(rel.encode() + b"\0")
        h.update(_eval_text(self.cfg).numpy().tobytes())
        return h.hexdigest()[:16]

    def batches(self, peer_seed: int, device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        text = _train_text(self.cfg, peer_seed)
        if len(text) <= self.cfg.context + 1:
            raise TaskError("charlm", f"training shard has only {len(text)} bytes")
        gen = torch.Generator().manual_seed(_digest_int("charlm", self.cfg.seed, peer_seed, "batches"))
        high = len(text) - self.cfg.context - 1
        while True:
            offsets = torch.randint(0, high, (self.cfg.batch_size,), generator=gen)
            x, y = _windows(text, offsets, self.cfg.context)
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, VOCAB).float(), y.reshape(-1))

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed eval batches (CPU tensors), windows evenly spread over the eval text."""
        if self._eval is None:
            text = _eval_text(self.cfg)
            n = self.cfg.eval_batches * self.cfg.batch_size
            high = len(text) - self.cfg.context - 1
            if high <= 0:
                raise TaskError("charlm", f"eval shard has only {len(text)} bytes")
            offsets = torch.linspace(0, high, n).long()
            self._eval = [_windows(text, o, self.cfg.context) for o in offsets.split(self.cfg.batch_size)]
        return self._eval

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device | str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            total, count = 0.0, 0
            for x, y in self.eval_batches():
                total += float(self.loss(model, (x.to(device), y.to(device)))) * len(x)
                count += len(x)
        finally:
            model.train(was_training)
        eval_loss = total / count
        return {"eval_loss": eval_loss, "eval_bits_per_byte": eval_loss / math.log(2)}
