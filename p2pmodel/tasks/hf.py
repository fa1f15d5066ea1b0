"""`HFCausalLMTask`: train a local Hugging Face causal LM folder on local text files.

`transformers` is an optional dependency (`pip install 'p2pmodel[hf]'`); it is imported
when a task is built, and its absence is a `TaskError` that says how to install it.
Nothing is downloaded: the model folder and the text files are read from disk
(`local_files_only=True`).

In a swarm, neither path is part of the event: `p2pmodel seed --from DIR` stores the model
(`seed_content`: its parameters, `config.json` and tokenizer files) as the event's seed
version, and each node writes that version's files to a folder of its own and passes it as
`model_dir`; `text_files` are the volunteer's own (`join --data`). The event holds only the
options that must agree (`context`, `batch_size`, `seed`, ...), checked without any text by
`check_options`.

- Model: the folder's weights if it has any (`from_pretrained`); a folder with only a
  `config.json` gets a fresh init seeded by `seed`, identical on every peer (a node then
  loads the seed version's parameters into it).
- Tokenizer: the folder's own if it has tokenizer files; otherwise bytes are token ids
  (the model's vocabulary must then have at least 256 entries).
- Data: the files' token ids, concatenated (up to `max_tokens`), cut into windows of
  `context + 1` tokens. A window is held out for evaluation when the first byte of
  sha256 of `(seed, index)` is below `256 * eval_fraction`; the first
  `eval_batches * batch_size` held-out windows are the fixed eval set. A peer's batches
  are training windows drawn by a generator seeded with `(seed, peer_seed)`.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from p2pmodel.tasks import TaskError

__all__ = ["HFCausalLMTask", "seed_content", "check_options", "SIDE_FILES", "LOCAL_OPTIONS"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# What a seed version keeps of a model folder besides the weights: what `from_pretrained`
# and `AutoTokenizer` read. Other files (README, licences, other weight formats) stay out.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
)  # fmt: skip
LOCAL_OPTIONS = ("model_dir", "text_files")  # paths on one machine: given by the node, never in an event


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise TaskError("hf", "needs the optional dependency transformers: pip install 'p2pmodel[hf]'") from e
    return transformers


def _dtype_kwarg(tf: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; accept both generations.
    major, minor = (int(x) for x in re.findall(r"\d+", tf.__version__)[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _seed_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly, and every regular file under named folders (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise TaskError("hf", f"text file or folder {str(p)!r} does not exist")
    return out


class HFCausalLMTask:
    """A local HF causal LM folder trained on local text.

    Args:
        model_dir: folder with `config.json` (and usually weights and tokenizer files).
        text_files: text files and/or folders of them (read recursively, sorted).
        context: tokens of context per sample (at most the model's maximum positions).
        batch_size: samples per batch.
        seed: seeds a fresh init (folders without weights), the eval split and the batches.
        eval_fraction: share of windows held out for evaluation.
        eval_batches: number of fixed eval batches.
        max_tokens: at most this many tokens are read (bounds memory and start-up time).
        dtype: parameter dtype of the built model ("float32", "bfloat16", "float16").
    """

    name = "hf"

    def __init__(
        self,
        model_dir: str | Path,
        text_files: Sequence[str | Path],
        *,
        context: int = 128,
        batch_size: int = 8,
        seed: int = 0,
        eval_fraction: float = 0.1,
        eval_batches: int = 4,
        max_tokens: int = 2_000_000,
        dtype: str = "float32",
    ):
        if isinstance(text_files, (str, Path)):
            text_files = [text_files]
        self.model_dir = Path(model_dir)
        self.text_files = [str(p) for p in text_files]
        self.context, self.batch_size, self.seed = context, batch_size, seed
        self.eval_fraction, self.n_eval_batches = eval_fraction, eval_batches
        self.max_tokens, self.dtype = max_tokens, dtype
        self._hf_config = _checked(self.model_dir, context=context, dtype=dtype, eval_fraction=eval_fraction)
        if not text_files:
            raise TaskError("hf", "no text to train on: pass your own text files or folders (`p2pmodel join --data PATH...`)")
        self.tokenizer = None
        if any((self.model_dir / f).is_file() for f in _TOKENIZER_FILES):
            self.tokenizer = _transformers().AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self._train, self._eval = self._load_windows(_expand(self.text_files))

    def _encode(self, text: bytes) -> list[int]:
        if self.tokenizer is None:
            return list(text)
        return self.tokenizer(text.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]

    def _load_windows(self, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        for f in files:
            ids.extend(self._encode(f.read_bytes() + b"\n"))
            if len(ids) >= self.max_tokens:
                break
        del ids[self.max_tokens :]
        w = self.context + 1
        n = len(ids) // w
        if n < 2:
            raise TaskError("hf", f"only {len(ids)} tokens of text: need at least {2 * w} for a train and an eval window")
        windows = torch.tensor(ids[: n * w], dtype=torch.long).view(n, w)  # (n, T+1)
        held = torch.tensor([hashlib.sha256(f"{self.seed}/{i}".encode()).digest()[0] < 256 * self.eval_fraction for i in range(n)])
        if not held.any():
            held[0] = True  # tiny corpora: keep at least one eval window
        if held.all():
            held[-1] = False
        eval_windows = windows[held][: self.n_eval_batches * self.batch_size]
        return windows[~held], eval_windows

    def config(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "text_files": list(self.text_files),
            "context": self.context,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "eval_fraction": self.eval_fraction,
            "eval_batches": self.n_eval_batches,
            "max_tokens": self.max_tokens,
            "dtype": self.dtype,
        }

    def build_model(self) -> nn.Module:
        return _build_model(self.model_dir, self._hf_config, self.dtype, self.seed)

    def batches(self, peer_seed: int, device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(_seed_int("hf", self.seed, peer_seed, "batches"))
        while True:
            rows = self._train[torch.randint(0, len(self._train), (self.batch_size,), generator=gen)]
            yield rows[:, :-1].to(device), rows[:, 1:].to(device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device | str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            total = 0.0
            for rows in self._eval.split(self.batch_size):
                total += float(self.loss(model, (rows[:, :-1].to(device), rows[:, 1:].to(device)))) * len(rows)
        finally:
            model.train(was_training)
        eval_loss = total / len(self._eval)
        return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}


def _checked(model_dir: Path, *, context: int, dtype: str, eval_fraction: float) -> Any:
    """The folder's transformers config, once the options fit it; else TaskError."""
    if not (model_dir / "config.json").is_file():
        raise TaskError("hf", f"{str(model_dir)!r} is not a model folder (no config.json)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise TaskError("hf", f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise TaskError("hf", f"eval_fraction must be in (0, 1), got {eval_fraction}")
    hf_config = _transformers().AutoConfig.from_pretrained(model_dir, local_files_only=True)
    max_pos = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if max_pos is not None and context > max_pos:
        raise TaskError("hf", f"context {context} exceeds the model's {max_pos} positions")
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES) and hf_config.vocab_size < 256:
        raise TaskError("hf", f"no tokenizer in the folder and vocab_size {hf_config.vocab_size} < 256 for bytes")
    return hf_config


def _build_model(model_dir: Path, hf_config: Any, dtype_name: str, seed: int) -> nn.Module:
    tf = _transformers()
    dtype = getattr(torch, dtype_name)
    if any((model_dir / f).is_file() for f in _WEIGHT_FILES):
        return tf.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **_dtype_kwarg(tf, dtype))
    with torch.random.fork_rng(devices=[]):  # HF inits from the global RNG
        torch.manual_seed(_seed_int("hf", seed, "init"))
        return tf.AutoModelForCausalLM.from_config(hf_config, **_dtype_kwarg(tf, dtype))


def check_options(model_dir: str | Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """Check an event's hf task options against a model folder, without any text; return
    every option the task takes (but the local ones) with its value or default.

    Raises:
        TaskError: an unknown or local option (`model_dir`, `text_files`: each node's own), or
            a value the folder cannot take (context beyond its positions, a bad dtype).
    """
    params = {n: p.default for n, p in inspect.signature(HFCausalLMTask.__init__).parameters.items() if n not in ("self", *LOCAL_OPTIONS)}
    for name in options:
        if name in LOCAL_OPTIONS:
            raise TaskError("hf", f"{name} is local to each node, not part of the event (model: the seed version; text: join --data)")
        if name not in params:
            raise TaskError("hf", f"unknown option {name!r} (known: {', '.join(params)})")
    values = {**params, **options}
    _checked(Path(model_dir), context=values["context"], dtype=values["dtype"], eval_fraction=values["eval_fraction"])
    return values


def seed_content(model_dir: str | Path, *, dtype: str = "float32", seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    """What the seed version of an event on this folder holds: `(parameters, files)`.

    Parameters are the model's state dict as transformers builds it (a tied output embedding
    appears under both names; the lineage stores its bytes once), so every node can load them
    into `from_config`'s model strictly. Files are the folder's `SIDE_FILES` (config.json,
    tokenizer files): any version of the event then exports as a loadable folder.

    Raises:
        TaskError: not a model folder, or transformers is missing.
    """
    folder = Path(model_dir)
    hf_config = _checked(folder, context=1, dtype=dtype, eval_fraction=0.5)
    state = {k: v.detach().to("cpu").contiguous() for k, v in _build_model(folder, hf_config, dtype, seed).state_dict().items()}
    files = {name: (folder / name).read_bytes() for name in SIDE_FILES if (folder / name).is_file()}
    return state, files
