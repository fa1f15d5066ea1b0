"""mergekit's YAML merge recipes (`mergekit-yaml` configs) read into one of our merges.

The schema is mergekit's `MergeConfiguration` (arcee-ai/mergekit, `mergekit/config.py`):

    merge_method: dare_ties            # linear, task_arithmetic, ties, dare_linear, dare_ties, slerp
    base_model: path/or/revision
    models:
      - model: path/or/revision
        parameters: {weight: 0.5, density: 0.6}
    parameters: {normalize: true, lambda: 1.0, int8_mask: true, t: 0.5}
    dtype: bfloat16                     # also out_dtype

What maps, and how: `weight` -> `weights` (mergekit requires it for these methods; here it
defaults to 1), `density`, `lambda`, `normalize`, `t` (slerp) are the same parameters; a global
value in `parameters` applies to every model that does not set its own (mergekit's lookup);
`rescale: true|false` is mergekit's L1 rescale on or off (`"l1"`/`"none"` here); `int8_mask`
only changes the dtype mergekit's sign mask is held in, never a value, and is accepted. A model
listed that is also `base_model` is the base, not a task vector (mergekit skips it too); for
`linear` every listed model is an input, for `slerp` the base is `v0`. `dtype`/`out_dtype` set
the output's dtype (we always compute in float32; mergekit computes in `dtype`).

What does not: slices, modules, per-layer gradients (`t: [0, 0.5, 1]`), filtered parameters,
tokenizer merging, chat templates, and methods we do not have. Each is one `RecipeError` naming
the key, before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pmodel.errors import UsageError
from p2pmodel.merge.registry import MergeError

__all__ = ["RecipeError", "MergeRecipe", "load_recipe", "parse_recipe", "RECIPE_METHODS"]

RECIPE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
_DTYPES = {"float32": "float32", "float": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "half": "float16", "fp16": "float16"}
_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name",
        "slices", "modules", "tokenizer", "chat_template"}
_MODEL_PARAMS = {"weight", "density"}
_GLOBAL_PARAMS = {
    "linear": {"normalize", "weight"},
    "task_arithmetic": {"normalize", "lambda", "int8_mask", "rescale", "weight"},
    "ties": {"normalize", "lambda", "int8_mask", "rescale", "weight", "density"},
    "dare_linear": {"normalize", "lambda", "int8_mask", "rescale", "weight", "density"},
    "dare_ties": {"normalize", "lambda", "int8_mask", "rescale", "weight", "density"},
    "slerp": {"t"},
}


class RecipeError(MergeError, UsageError):
    """A recipe key we cannot honour, or a malformed recipe; `key` is its path in the YAML."""

    def __init__(self, source: str, key: str, reason: str):
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: {key}: {reason}")


@dataclass(frozen=True)
class MergeRecipe:
    """A recipe as `merge_checkpoints` arguments. Models and base are still text: paths or revisions."""

    method: str
    models: list[str]
    base: str | None
    params: dict[str, Any] = field(default_factory=dict)  # our parameter names; per-model ones as lists
    out_dtype: str | None = None  # "float32", "bfloat16" or "float16"


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read a mergekit YAML recipe. Raises `RecipeError` (including for unreadable YAML)."""
    import yaml

    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RecipeError(source, "file", e.strerror or str(e)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(source, "yaml", str(e).splitlines()[0]) from None
    return parse_recipe(data, source)


def _scalar(source: str, key: str, value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, list):
        raise RecipeError(source, key, "per-layer gradients (a list of values) are not supported; give one value")
    if isinstance(value, dict):
        raise RecipeError(source, key, "filtered parameters ({filter, value}) are not supported; give one value")
    raise RecipeError(source, key, f"expected a number, got {value!r}")


def _model_name(source: str, key: str, value: Any) -> str:
    if isinstance(value, str) and value:
        if "+" in value:
            raise RecipeError(source, key, "LoRA models (model+lora) are not supported")
        return value
    if isinstance(value, dict) and "model" in value:  # mergekit's long form {model: {path: ...}}
        raise RecipeError(source, key, "give the model as a path or revision string")
    raise RecipeError(source, key, f"expected a path or revision, got {value!r}")


def parse_recipe(data: Any, source: str = "recipe") -> MergeRecipe:
    """The recipe from parsed YAML. Raises `RecipeError` naming the first key it cannot honour."""
    if not isinstance(data, dict):
        raise RecipeError(source, "top level", "expected a mapping with merge_method and models")
    for key in data:
        if key not in _TOP:
            raise RecipeError(source, str(key), f"unknown key (known: {', '.join(sorted(_TOP - {'slices', 'modules'}))})")
    for key in ("slices", "modules"):
        if data.get(key) is not None:
            raise RecipeError(source, key, "not supported: give `models:` (whole-model merges)")
    for key in ("tokenizer", "chat_template"):
        if data.get(key) is not None:
            raise RecipeError(source, key, "not supported (the base model's tokenizer files are kept)")
    if data.get("tokenizer_source") not in (None, "base"):
        raise RecipeError(source, "tokenizer_source", "only `base` is supported (the base model's files are kept)")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise RecipeError(source, "merge_method", "required (one of " + ", ".join(RECIPE_METHODS) + ")")
    if method not in RECIPE_METHODS:
        raise RecipeError(source, "merge_method", f"{method!r} is not available here (available: {', '.join(RECIPE_METHODS)})")
    base = _model_name(source, "base_model", data["base_model"]) if data.get("base_model") is not None else None
    out_dtype = None
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None:
            if data[key] not in _DTYPES:
                raise RecipeError(source, key, f"{data[key]!r} is not one of {', '.join(sorted(set(_DTYPES.values())))}")
            out_dtype = _DTYPES[data[key]]  # out_dtype, read second, wins
    glob = data.get("parameters") or {}
    if not isinstance(glob, dict):
        raise RecipeError(source, "parameters", "expected a mapping")
    for key, value in glob.items():
        if key not in _GLOBAL_PARAMS[method]:
            raise RecipeError(source, f"parameters.{key}", f"not a parameter of {method} here "
                              f"(it takes: {', '.join(sorted(_GLOBAL_PARAMS[method]))})")
        _scalar(source, f"parameters.{key}", value)
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(source, "models", "required: a list of {model: ..., parameters: {...}}")
    models, per_model = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(source, f"models[{i}]", "expected {model: ..., parameters: {...}}")
        for key in entry:
            if key not in ("model", "parameters"):
                raise RecipeError(source, f"models[{i}].{key}", "unknown key (known: model, parameters)")
        name = _model_name(source, f"models[{i}].model", entry["model"])
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(source, f"models[{i}].parameters", "expected a mapping")
        for key, value in params.items():
            allowed = _MODEL_PARAMS if method not in ("linear", "slerp") else ({"weight"} if method == "linear" else set())
            if key not in allowed:
                raise RecipeError(source, f"models[{i}].parameters.{key}",
                                  f"not a per-model parameter of {method} here (it takes: {', '.join(sorted(allowed)) or 'none'})")
            _scalar(source, f"models[{i}].parameters.{key}", value)
        if method not in ("linear", "slerp") and name == base:
            continue  # the base is not a task vector (mergekit's get_task_vectors skips it)
        models.append(name)
        per_model.append(params)
    if method == "slerp":
        if base is None:
            raise RecipeError(source, "base_model", "slerp needs a base_model (its v0)")
        models = [m for m in models if m != base]
        if len(models) != 1:
            raise RecipeError(source, "models", f"slerp merges the base with exactly one other model, got {len(models)}")
    if method != "linear" and method != "slerp" and base is None:
        raise RecipeError(source, "base_model", f"{method} needs a base_model")
    if not models:
        raise RecipeError(source, "models", "no model to merge besides the base")

    out: dict[str, Any] = {}
    for key in ("weight", "density"):
        if any(key in p for p in per_model) or key in glob:
            default = glob.get(key, 1.0)
            out["weights" if key == "weight" else key] = [p.get(key, default) for p in per_model]
    for key, value in glob.items():
        if key in ("weight", "density", "int8_mask"):
            continue
        if key == "rescale":
            if not isinstance(value, bool):
                raise RecipeError(source, "parameters.rescale", "expected true or false")
            out["rescale"] = "l1" if value else "none"
        elif key == "lambda":
            out["lambda_"] = value
        else:
            out[key] = value
    return MergeRecipe(method=method, models=models, base=base if method != "linear" else None, params=out,
                       out_dtype=out_dtype)
