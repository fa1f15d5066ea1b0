"""The node's configuration: one frozen object per concern, CLI flags generated from the fields.

- `NodeConfig`  — what is local to one volunteer's machine (where it listens, its home folder,
  device, status port). Every field becomes a `p2pmodel join` flag with the field's help text.
- `EventConfig` — what every peer of one swarm must agree on (task, round length, merge method,
  outer optimizer, codec). It comes from the event manifest (`--event FILE`, JSON holding only
  overrides of the defaults) and its hash (`event_hash`) is part of every `PeerAnnouncement`,
  so peers of different events never mix.

Unknown keys in a manifest are an error (`ConfigError`), never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from p2pmodel.errors import UsageError

__all__ = ["NodeConfig", "EventConfig", "ConfigError", "add_node_flags", "node_config_from_args", "load_event"]


class ConfigError(UsageError):
    """A config value or manifest is invalid. Fields: `source` (file or flag), `reason`."""

    def __init__(self, source: str, reason: str):
        self.source, self.reason = source, reason
        super().__init__(f"{source}: {reason}")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text becomes the CLI flag's help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class NodeConfig:
    """Settings of one node (one volunteer's machine). Safe defaults: loopback only."""

    peers: tuple[str, ...] = _f((), "multiaddrs of any live peer or bootstrap DHT node; none starts a new swarm")
    event: str = _f("", "event manifest (JSON); empty means the built-in charlm event")
    seeder: str = _f("", "peer id of the swarm's founder (printed in its join line); empty when founding")
    home: str = _f("~/.p2pmodel/node", "folder for this node's identity keys and lineage")
    device: str = _f("auto", "training device: auto (cuda when present), cpu or cuda[:N]")
    host_maddrs: tuple[str, ...] = _f(("/ip4/127.0.0.1/tcp/0",), "multiaddrs p2pd listens on (loopback by default)")
    announce_maddrs: tuple[str, ...] = _f((), "multiaddrs to advertise to others (explicit ports)")
    status_port: int = _f(7271, "port of the local HTTP status API on 127.0.0.1 (0: any free port)")
    log_level: str = _f("INFO", "log level: DEBUG, INFO, WARNING or ERROR")
    cpu_threads: int = _f(0, "torch threads for CPU training (0: all cores but one)")
    max_rounds: int = _f(0, "leave after this many rounds have committed since start (0: run until stopped)")
    shutdown_timeout: float = _f(10.0, "seconds to finish or abandon the current round on SIGINT/SIGTERM")
    fault: str = _f("", "testing only: inject a fault (see daemon/faults.py)", hidden=True)

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser()


@dataclass(frozen=True)
class EventConfig:
    """What every peer of a swarm agrees on. The manifest file holds overrides of these."""

    name: str = "charlm"  # event name; part of every DHT key of the swarm
    task: str = "charlm"  # task plugin: "charlm" or "package.module:object"
    task_options: dict = field(default_factory=dict)  # keyword options for the task's factory
    # Defaults chosen by measurement (scripts/sweep_outer, scripts/bench_train; table in README):
    # 2-bit deltas with error feedback and plain averaging beat Nesterov 0.7/0.9 and top-k 1%,
    # which trained worse than one peer alone, at ~1/850 of DDP's bytes.
    inner_steps: int = 50  # H: AdamW steps each peer takes per round
    inner_lr: float = 3e-3  # AdamW learning rate of the inner loop
    outer_lr: float = 1.0  # outer learning rate (DiLoCo's Nesterov SGD; 1 with momentum 0 is averaging)
    outer_momentum: float = 0.0  # outer Nesterov momentum (DiLoCo uses 0.9); stored in the lineage
    merge_method: str = "linear"  # p2pmodel.merge method applied to the deltas
    merge_params: dict = field(default_factory=dict)  # that method's parameters
    # DeltaCodec settings; an event's codec dict replaces this one whole
    codec: dict = field(default_factory=lambda: {"encoder": "lowbit", "value_bits": 2, "block_size": 1024})
    train_ahead: bool = True  # train on while the swarm merges, then rebase (training never waits)
    seeder: str = ""  # peer id of the swarm's founder: the electorate of the seed version
    collect_window: float = 30.0  # seconds from entering a round to the first proposer's slot
    proposal_timeout: float = 10.0  # seconds each proposer rank waits before the next takes over
    min_members: int = 1  # a round closes before its collect window only once this many peers delivered
    round_deadline: float = 180.0  # seconds from entering a round until it fails if nothing committed
    ci_max_regression: float = 0.10  # a version whose eval loss exceeds base's by more than this fraction fails CI
    ci_max_regression_best: float = 0.20  # ... or exceeds the best of the last ci_window versions' by this fraction
    ci_window: int = 8  # versions back the CI gate's "best" looks at (slow drift fails)
    # The merge's screen (p2pmodel.screening): a delta pointing away from the round's median
    # delta, or over this multiple of its median norm, is left out (set by measurement, see there)
    screen_min_cosine: float = 0.3  # -1 keeps every delta's direction
    screen_max_norm_ratio: float = 4.0
    max_delta_bytes: int = 256 * 1024 * 1024  # largest encoded delta a peer accepts (bytes)
    seed: int = 0  # seed of the model's initial parameters
    allowed_peers: list = field(default_factory=list)  # private event: the only peer ids that take part (empty: open)

    def event_hash(self) -> str:
        """sha256 hex of the canonical JSON of every field: the swarm's identity."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    def dht_prefix(self) -> str:
        """`p2pmodel/<name>-<hash12>`: DHT keys of this event start with it."""
        return f"p2pmodel/{self.name}-{self.event_hash()[:12]}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=2)


def load_event(path: str | None) -> EventConfig:
    """The event of a manifest file (JSON of overrides), or the default event for None/"".

    Raises:
        ConfigError: unreadable file, not a JSON object, unknown keys, or wrong value types.
    """
    if not path:
        return EventConfig()
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(str(path), f"cannot read the event manifest ({e})") from None
    return event_from_mapping(data, source=str(path))


def event_from_mapping(data: Any, *, source: str = "event") -> EventConfig:
    """Build an EventConfig from overrides, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, "an event manifest is a JSON object")
    known = {f.name: f for f in fields(EventConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(source, f"unknown keys {unknown}; known keys are {sorted(known)}")
    defaults = EventConfig()
    for key, value in data.items():
        want = type(getattr(defaults, key))
        ok = isinstance(value, want) or (want is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok or (want is int and isinstance(value, bool)):
            raise ConfigError(source, f"{key} must be a {want.__name__}, not {type(value).__name__}")
    return EventConfig(**{k: (float(v) if isinstance(getattr(defaults, k), float) else v) for k, v in data.items()})


def add_node_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per NodeConfig field (`host_maddrs` -> `--host-maddrs`), help from the field."""
    for f in fields(NodeConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = argparse.SUPPRESS if f.metadata.get("hidden") else f.metadata["help"]
        default = f.default
        if isinstance(default, tuple):
            parser.add_argument(flag, nargs="*", default=list(default), metavar="MULTIADDR", help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def node_config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The NodeConfig the parsed flags describe."""
    values = {}
    for f in fields(NodeConfig):
        v = getattr(args, f.name)
        values[f.name] = tuple(v) if isinstance(f.default, tuple) else v
    return NodeConfig(**values)
