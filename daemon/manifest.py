"""The event manifest as `p2pmodel seed` writes it, and `--set key=value` overrides.

- `event_to_toml(event, task_config=None) -> str` — `event.toml`: every `EventConfig` setting
  with its value and, above it, the field's `help` (daemon/config.py) as a comment. Settings a
  table could hold but does not (the codec's other fields, the merge method's parameters, the
  task's options) are listed commented out with their defaults, so a researcher sees what can
  be set without changing the event.
- `with_settings(data, ["codec.value_bits=1", ...]) -> dict` — overrides applied to a plain
  mapping of settings (dotted keys reach into tables).

- `event_from_manifest_bytes(data, event_id) -> EventConfig` — the event a peer served for
  `event_id` (the join line's `--event-id`), or `ManifestRejected`: more than `MAX_MANIFEST`
  bytes, bytes that do not hash to the id, not JSON, not a valid event, or not in canonical
  form (`EventConfig.manifest_bytes()`). Pure: daemon/joining.py fetches, this decides.

`config.load_event` reads the file back, and it always loads to the same `event_hash`
(tests/test_seed.py): the manifest is the event.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import tomllib
from typing import Any, Mapping, Sequence

from p2pmodel.daemon.config import ConfigError, EventConfig, event_from_mapping
from p2pmodel.errors import P2PModelError
from p2pmodel.protocols.limits import MAX_MANIFEST

__all__ = ["event_to_toml", "with_settings", "event_from_manifest_bytes", "ManifestRejected"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_REQUIRED = object()  # a merge parameter without a default


def event_to_toml(event: EventConfig, task_config: Mapping[str, Any] | None = None) -> str:
    """The commented TOML manifest of `event`.

    Args:
        event: the event to write (every field is written, defaults included).
        task_config: the task's full options (`Task.config()`), to list those the event
            leaves at their defaults as comments; None lists none.

    Raises:
        ConfigError: a value TOML cannot hold (None inside `task_options`).
    """
    defaults = EventConfig()
    lines = [
        f"# Event manifest of {event.name!r}, written by `p2pmodel seed` (event_hash {event.event_hash()[:12]}).",
        "# Every peer of the swarm uses these settings: they hash to the event's identity, so changing",
        "# any of them makes another event. Volunteers do not need this file: the swarm serves the",
        "# event by its hash (the join line's --event-id).",
        "",
    ]
    tables = []
    for f in dataclasses.fields(EventConfig):
        value, default = getattr(event, f.name), getattr(defaults, f.name)
        if isinstance(value, dict):
            tables.append(f)
            continue
        lines.append(f"# {f.metadata['help']}")
        note = "" if value == default else f"  # default: {_value(default, f.name)}"
        lines.append(f"{_key(f.name)} = {_value(value, f.name)}{note}")
    for f in tables:
        value = getattr(event, f.name)
        lines += ["", f"# {f.metadata['help']}", f"[{f.name}]"]
        lines += [f"{_key(k)} = {_value(v, f'{f.name}.{k}')}" for k, v in value.items()]
        lines += _commented_out(value, _table_defaults(f.name, event, task_config))
    return "\n".join(lines) + "\n"


def _table_defaults(table: str, event: EventConfig, task_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a table's absent keys mean: the codec's, the merge method's or the task's defaults."""
    if table == "codec":
        from p2pmodel.protocols.codec import CodecConfig

        return {f.name: f.default for f in dataclasses.fields(CodecConfig)}
    if table == "merge_params":
        from p2pmodel.merge.registry import get_method

        # weights: the swarm sets them (samples per delta); `lambda_` is spelt `lambda` in files
        params = get_method(event.merge_method).params
        return {p.name.removesuffix("_"): (_REQUIRED if p.required else p.default) for p in params if p.name != "weights"}
    return dict(task_config or {})


def _commented_out(present: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    absent = [k for k in defaults if k not in present]
    if not absent:
        return []
    lines = ["# not set here (defaults):"]
    for k in absent:
        v = defaults[k]
        if v is _REQUIRED:
            lines.append(f"# {_key(k)} = ...  (required)")
        elif v is None:
            lines.append(f"# {_key(k)} = ...  (unset by default)")
        else:
            lines.append(f"# {_key(k)} = {_value(v, k)}")
    return lines


def _key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else json.dumps(k)


def _value(v: Any, key: str) -> str:
    """`v` as a TOML value; inline tables and arrays for nested values."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        # JSON's escapes are TOML's, except that TOML also refuses a raw DEL
        return json.dumps(v).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, key) for x in v) + "]"
    if isinstance(v, Mapping):
        inner = ", ".join(f"{_key(k)} = {_value(x, f'{key}.{k}')}" for k, x in v.items())
        return "{ " + inner + " }" if inner else "{}"
    if v is None:
        raise ConfigError("event.toml", "TOML has no null; leave the key out instead", key=key)
    raise ConfigError("event.toml", f"cannot write a {type(v).__name__} in TOML", key=key)


def with_settings(data: Mapping[str, Any], items: Sequence[str], *, source: str = "--set") -> dict[str, Any]:
    """`data` with each `key=value` of `items` applied, in order; `data` is left unchanged.

    A dotted key sets a key inside a table (`codec.value_bits=1`); the value is read as a TOML
    value (`20`, `1e-3`, `true`, `["a", "b"]`, `{ encoder = "int8" }`), and as plain text when it
    is not one or when the setting is a string (`name=my-event`, `seeder=00ab...`).
    Unknown keys pass through: `config.event_from_mapping` rejects them, naming the key.

    Raises:
        ConfigError: an item without `=`, or a dotted key into a setting that is not a table.
    """
    out = copy.deepcopy(dict(data))
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(source, f"expected KEY=VALUE, got {item!r}", key=key or item)
        *parents, last = key.split(".")
        table = out
        for depth, part in enumerate(parents):
            here = ".".join(parents[: depth + 1])
            if part not in table:
                # a new table: task_options' nesting is the task's business, and an unknown
                # top-level name is left for event_from_mapping to reject by name
                table[part] = {}
            if not isinstance(table[part], dict):
                raise ConfigError(source, f"{here} is not a table", key=key)
            table = table[part]
        table[last] = _parse(raw.strip(), wants_str=isinstance(_default_at(key), str))
    return out


def _parse(raw: str, *, wants_str: bool) -> Any:
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    return raw if wants_str and not isinstance(value, str) else value


def _default_at(key: str) -> Any:
    """The default of the setting at dotted `key`, where one is known (top level, codec)."""
    defaults = {f.name: getattr(EventConfig(), f.name) for f in dataclasses.fields(EventConfig)}
    head, _, rest = key.partition(".")
    if not rest:
        return defaults.get(head)
    if head == "codec":
        from p2pmodel.protocols.codec import CodecConfig

        return {f.name: f.default for f in dataclasses.fields(CodecConfig)}.get(rest)
    return None


class ManifestRejected(P2PModelError):
    """A peer served bytes that are not the manifest of the event asked for: the peer is not to
    be trusted for this event (try another). Fields: `event_id`, `reason`."""

    def __init__(self, event_id: str, reason: str):
        self.event_id, self.reason = event_id, reason
        super().__init__(f"manifest of event {event_id[:12]} rejected: {reason}")


def event_from_manifest_bytes(data: bytes, event_id: str) -> EventConfig:
    """The event whose canonical manifest is `data`, if `data` is exactly that of `event_id`.

    Checked in order, cheapest first: the size (at most `MAX_MANIFEST`), the hash (sha256 of
    `data` is `event_id`), JSON, the event's own checks (`event_from_mapping`), and the form:
    the event's `manifest_bytes()` must be `data` itself, so two encodings of one event (a
    number written as 1 or 1.0, a missing default) can never stand for one id.

    Raises:
        ManifestRejected: any check fails; `reason` says which, in one line.
    """
    if len(data) > MAX_MANIFEST:
        raise ManifestRejected(event_id, f"{len(data)} bytes, more than the {MAX_MANIFEST} a manifest may have")
    got = hashlib.sha256(data).hexdigest()
    if got != event_id:
        raise ManifestRejected(event_id, f"the bytes hash to {got[:12]}, not to the event id")
    try:
        mapping = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestRejected(event_id, f"not JSON ({e})") from None
    try:
        event = event_from_mapping(mapping, source="manifest")
    except ConfigError as e:
        raise ManifestRejected(event_id, f"not a valid event ({e})") from None
    if event.manifest_bytes() != bytes(data):
        raise ManifestRejected(event_id, "not in canonical form (EventConfig.manifest_bytes)")
    return event
