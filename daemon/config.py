"""The node's configuration: one frozen object per concern, CLI flags generated from the fields.

- `NodeConfig`  — what is local to one volunteer's machine (where it listens, its home folder,
  device, status port). Every field becomes a `p2pmodel join` flag with the field's help text;
  `check_node_config` rejects values that cannot work (a log level, a port, a device that is
  not there) with one line naming the flag, before the node touches anything.
- `EventConfig` — what every peer of one swarm must agree on (task, round length, merge method,
  outer optimizer, codec). It comes from the event manifest (`--event FILE`: TOML as
  `p2pmodel seed` writes it, or JSON; either holds overrides of the defaults), or from peers:
  its hash (`event_hash`, the sha256 of `manifest_bytes()`) is the join line's `--event-id`,
  and any peer serves those bytes (daemon/joining.py). The hash is part of every
  `PeerAnnouncement`, so peers of different events never mix. Nothing local to one machine
  (paths, a volunteer's own text files: `--data`) belongs in it.

A manifest is checked whole before anything starts (`event_from_mapping`): unknown keys, also
nested ones (`codec.densty`), are an error, never silently ignored, as are a merge method or
parameters that do not exist and timing that cannot work. Each `ConfigError` names its key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from p2pmodel.daemon.reachability import MODES as REACHABILITY_MODES
from p2pmodel.errors import UsageError
from p2pmodel.peers import name_problem
from p2pmodel.protocols.limits import MAX_MANIFEST

if TYPE_CHECKING:
    from p2pmodel.training import LRSchedule

__all__ = [
    "NodeConfig",
    "EventConfig",
    "TRAINED_SEED_OUTER",
    "DEFAULT_STATUS_PORT",
    "LOG_LEVELS",
    "check_node_config",
    "ConfigError",
    "add_node_flags",
    "node_config_from_args",
    "load_event",
    "event_from_mapping",
]

# The outer step of an event seeded from a trained model (`p2pmodel seed --from`), DiLoCo's
# setting: there outer Nesterov momentum beats averaging, while from a random init (`--task`,
# EventConfig's defaults) it loses. scripts/sweep_outer, presets seeded and seeded_outer (bench task,
# N=2, 600 steps, cosine lr 3e-3, H=50, 2-bit; seed: 600 steps alone on a shard no peer holds):
# averaging 1.234, Nesterov 0.7/0.9 1.181, 0.7/0.8 1.158, 1.0/0.9 1.158; DDP 1.151; one peer
# alone 1.307. 0.7/0.8 ties for best and takes the smaller outer step of the two.
TRAINED_SEED_OUTER = {"outer_lr": 0.7, "outer_momentum": 0.8, "outer_warmup_rounds": 0}


class ConfigError(UsageError):
    """A config value or manifest is invalid.

    Fields: `source` (file or flag), `reason`, and `key` (the setting at fault, dotted for
    nested ones such as `codec.density`; None when the whole file is at fault).
    """

    def __init__(self, source: str, reason: str, *, key: str | None = None):
        self.source, self.reason, self.key = source, reason, key
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text becomes the CLI flag's help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


DEFAULT_STATUS_PORT = 7271  # taken (a second node on this machine): the node picks a free one
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class NodeConfig:
    """Settings of one node (one volunteer's machine). Safe defaults: loopback only."""

    peers: tuple[str, ...] = _f((), "multiaddrs of any live peer or bootstrap DHT node; none starts a new swarm")
    event_id: str = _f("", "sha256 of the event to join (in the join line): its manifest and seed version are fetched "
                       "from --peers and checked against it; no files needed")
    event: str = _f("", "event manifest (.toml from `p2pmodel seed`, or JSON); empty means the event of --event-id, "
                    "else the one this home joined, else the built-in charlm event")
    seeder: str = _f("", "peer id of the swarm's founder, for an --event file that names none; empty when founding")
    data: tuple[str, ...] = _f((), "your own text files or folders to train on (hf events; charlm's data is built in)",
                               metavar="PATH")
    home: str = _f("~/.p2pmodel/node", "folder for this node's identity keys and lineage")
    name: str = _f("", "display name others see beside your peer id in credits and status (optional; at most 32 "
                   "printable characters)")
    device: str = _f("auto", "training device: auto (cuda when present), cpu or cuda[:N]")
    host_maddrs: tuple[str, ...] = _f(("/ip4/127.0.0.1/tcp/0",), "multiaddrs p2pd listens on (loopback by default)")
    announce_maddrs: tuple[str, ...] = _f((), "multiaddrs to advertise to others (explicit ports)")
    reachability: str = _f("auto", "who can dial this node: public (relays for peers behind NAT), private (behind NAT: "
                           "reached through a relay), auto (public with a public address, private with only private "
                           "ones, neither on loopback), local (neither)")
    relays: tuple[str, ...] = _f((), "multiaddrs of public peers a private node reserves a relay slot at (default: --peers)")
    status_port: int = _f(DEFAULT_STATUS_PORT, "port of the local HTTP status API on 127.0.0.1 (0: any free port; "
                          "the default, when taken, is replaced by a free one)")
    log_level: str = _f("INFO", "log level: DEBUG, INFO, WARNING or ERROR")
    cpu_threads: int = _f(0, "torch threads for CPU training (0: all cores but one)")
    max_rounds: int = _f(0, "leave after this many rounds have committed since start (0: run until stopped)")
    shutdown_timeout: float = _f(10.0, "seconds to finish or abandon the current round on SIGINT/SIGTERM")
    # Retention (p2pmodel/lineage/retention.py): every round changes every tensor, so each version
    # is a model copy. Disk stays at about keep_last + rounds/keep_every copies; records, metrics
    # and certificates of every version stay (log, credits, the chain joiners check).
    keep_last: int = _f(16, "retention: keep the newest K versions whole; older ones keep only their record, metrics "
                        "and certificate, their tensors and optimizer state are deleted (0: keep every version; "
                        "else at least 2)")
    keep_every: int = _f(1000, "retention: also keep every version whose round is a multiple of N whole, as "
                         "checkpoints the swarm serves (0: none)")
    fault: str = _f("", "testing only: inject a fault (see daemon/faults.py)", hidden=True)

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser()


@dataclass(frozen=True)
class EventConfig:
    """What every peer of a swarm agrees on. The manifest file holds overrides of these.

    Each field's `help` metadata is its one-line description: `p2pmodel seed` writes it as the
    comment beside the setting in `event.toml`.
    """

    name: str = _f("charlm", "event name; part of every DHT key of the swarm")
    task: str = _f("charlm", 'task plugin: "charlm", "hf" or "package.module:object"')
    task_options: dict = _f({}, "keyword options for the task's factory")
    # Defaults chosen by measurement (scripts/sweep_outer, scripts/bench_train; table in README):
    # 2-bit deltas with error feedback and plain averaging beat Nesterov 0.7/0.9 and top-k 1%,
    # which trained worse than one peer alone, at ~1/850 of DDP's bytes.
    inner_steps: int = _f(50, "H: AdamW steps each peer takes per round")
    inner_lr: float = _f(3e-3, "AdamW learning rate of the inner loop")
    # The inner lr over the event's planned length (p2pmodel.training.LRSchedule): the swarm's
    # step clock is round x inner_steps, so every peer is at the same lr in the same round.
    # Cosine decay to 0.1 x lr took 2-bit averaging from 1.660 to 1.411 eval loss on the bench
    # task (scripts/sweep_outer, preset schedule); an open-ended event keeps a constant lr.
    lr_warmup_steps: int = _f(0, "inner lr warm-up: linear from lr/W to lr over the swarm's first W steps")
    lr_decay_steps: int = _f(0, "cosine decay of the inner lr to lr_final x inner_lr at this step of the swarm's clock "
                             "(round x inner_steps; set it to the event's planned rounds x inner_steps); 0: no decay")
    lr_final: float = _f(0.1, "the inner lr's factor at and after lr_decay_steps")
    outer_lr: float = _f(1.0, "outer learning rate (DiLoCo's Nesterov SGD; 1 with momentum 0 is averaging)")
    outer_momentum: float = _f(0.0, "outer Nesterov momentum (DiLoCo uses 0.9); stored in the lineage")
    outer_warmup_rounds: int = _f(0, "rounds numbered below this average (outer lr 1, momentum 0); the momentum starts after")
    # (An event seeded from a trained model takes TRAINED_SEED_OUTER instead: above.)
    merge_method: str = _f("linear", "p2pmodel.merge method applied to the deltas")
    merge_params: dict = _f({}, "that method's parameters (one value each; the swarm weighs deltas by samples)")
    codec: dict = _f(
        {"encoder": "lowbit", "value_bits": 2, "block_size": 1024},
        "DeltaCodec settings (protocols/codec.py CodecConfig); an event's codec table replaces this one whole",
    )
    train_ahead: bool = _f(True, "train on while the swarm merges, then rebase (training never waits)")
    seeder: str = _f("", "peer id of the swarm's founder: the electorate of the seed version")
    seed_version: str = _f("", "id of the version every peer starts from (peers fetch it by id; it holds the model and, "
                           "for hf, config.json and tokenizer files); empty: each peer builds it from the task")
    collect_window: float = _f(30.0, "seconds from entering a round to the first proposer's slot")
    proposal_timeout: float = _f(10.0, "seconds each proposer rank waits before the next takes over")
    min_members: int = _f(1, "a round closes before its collect window only once this many peers delivered")
    round_deadline: float = _f(180.0, "seconds from entering a round until it fails if nothing committed")
    ci_max_regression: float = _f(0.10, "a version whose eval loss exceeds its base's by more than this fraction fails CI")
    ci_max_regression_best: float = _f(0.20, "... or exceeds the best of the last ci_window versions' by this fraction")
    ci_window: int = _f(8, 'versions back the CI gate\'s "best" looks at (slow drift fails)')
    # The merge's screen (p2pmodel.screening): a delta pointing away from the other deltas' sign
    # vote, or over this multiple of the median norm, is left out (set by measurement, see there)
    screen_min_cosine: float = _f(0.3, "a delta whose cosine with the other deltas' sign vote is at least this is never left out "
                                  "for its direction (-1 keeps every direction) ...")
    screen_relative_cosine: float = _f(0.25, "... below it, one under this x the round's median cosine is (0: every one below "
                                       "screen_min_cosine is)")
    screen_max_norm_ratio: float = _f(4.0, "a delta whose norm exceeds this multiple of the round's median norm is left out")
    max_delta_bytes: int = _f(256 * 1024 * 1024, "largest encoded delta a peer accepts (bytes)")
    seed: int = _f(0, "seed of the model's initial parameters")
    allowed_peers: list = _f([], "private event: the only peer ids that take part (empty: open)")

    def lr_schedule(self) -> LRSchedule | None:
        """The inner lr's schedule on the swarm's step clock; None: a constant `inner_lr`."""
        from p2pmodel.training import LRSchedule  # torch: not for every reader of an event

        if self.lr_decay_steps:
            return LRSchedule(self.lr_decay_steps, self.lr_warmup_steps, self.lr_final)
        if self.lr_warmup_steps:
            return LRSchedule(self.lr_warmup_steps + 1, self.lr_warmup_steps, final=1.0)  # warm-up, then flat
        return None

    def manifest_bytes(self) -> bytes:
        """The canonical JSON of every field (sorted keys): what peers serve as the event's
        manifest, and what `event_hash` hashes."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    def event_hash(self) -> str:
        """sha256 hex of `manifest_bytes()`: the swarm's identity (the join line's --event-id)."""
        return hashlib.sha256(self.manifest_bytes()).hexdigest()

    def dht_prefix(self) -> str:
        """`p2pmodel/<name>-<hash12>`: DHT keys of this event start with it."""
        return f"p2pmodel/{self.name}-{self.event_hash()[:12]}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=2)


def load_event(path: str | None) -> EventConfig:
    """The event of a manifest file (TOML if it ends in `.toml`, else JSON), or the default
    event for None/"". The file holds overrides of `EventConfig`'s defaults.

    Raises:
        ConfigError: unreadable or unparsable file, or any check of `event_from_mapping`.
    """
    if not path:
        return EventConfig()
    file = Path(path).expanduser()
    try:
        text = file.read_text()
        data = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(str(path), f"cannot read the event manifest ({e})") from None
    return event_from_mapping(data, source=str(path))


def event_from_mapping(data: Any, *, source: str = "event") -> EventConfig:
    """Build an EventConfig from overrides and check that it can run.

    Checked: unknown keys (top level and inside `codec`), value types, codec values, the merge
    method and its parameters, timing (positive, and a collect window that ends before the
    round's deadline) and ranges.

    Raises:
        ConfigError: the first problem found; its `key` names the setting (`codec.density`).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(source, "an event manifest is a table (JSON object) of settings")
    known = {f.name: f for f in fields(EventConfig)}
    for key in sorted(data):
        if key not in known:
            raise ConfigError(source, _unknown(key, known), key=key)
    defaults = EventConfig()
    values = {}
    for key, value in data.items():
        default = getattr(defaults, key)
        want = type(default)
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise ConfigError(source, f"must be {_kind(want)}, not {_kind(type(value))}", key=key)
        if want is float and not math.isfinite(value):
            raise ConfigError(source, f"must be finite, got {value}", key=key)
        values[key] = value
    if "codec" in values:
        values["codec"] = _checked_codec(values["codec"], source)
    event = EventConfig(**values)
    _check_event(event, source)
    return event


def _kind(t: type) -> str:
    names = {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
    return names.get(t, f"a {t.__name__}")


def _unknown(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
    return f"unknown key ({hint})"


def _checked_codec(codec: dict, source: str) -> dict:
    """`codec` with float settings as floats (1 and 1.0 make the same event), or ConfigError."""
    from p2pmodel.protocols.codec import CodecConfig
    from p2pmodel.protocols.codec_errors import InvalidCodecConfig

    known = {f.name: f.default for f in fields(CodecConfig)}
    for key in sorted(codec):
        if key not in known:
            raise ConfigError(source, _unknown(key, known), key=f"codec.{key}")
    out = {}
    for key, value in codec.items():
        want = type(known[key])
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(source, f"must be {_kind(want)}, not {_kind(type(value))}", key=f"codec.{key}")
        out[key] = value
    try:
        CodecConfig(**out)
    except InvalidCodecConfig as e:
        raise ConfigError(source, e.reason, key=f"codec.{e.field}") from None
    return out


_PEER_ID = re.compile(r"[0-9a-f]{40}")  # protocols.signing.peer_id_of: 40 lowercase hex digits
_SHA256 = re.compile(r"[0-9a-f]{64}")  # version ids and event ids
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # goes into every DHT key of the swarm


def _check_event(e: EventConfig, source: str) -> None:
    """Raise ConfigError for the first setting of `e` that cannot work."""
    # The round machine enforces the same timing (protocols.round.RoundConfig), but only at
    # round 0 and without naming the setting; here it fails before any network starts.
    rules: list[tuple[str, bool, str]] = [  # (key, valid, what a valid value is)
        ("name", bool(_NAME.fullmatch(e.name)), "must be 1-64 letters, digits, '.', '_' or '-'"),
        ("task", bool(e.task.strip()), "must name a task"),
        ("inner_steps", e.inner_steps > 0, "must be positive"),
        ("inner_lr", e.inner_lr > 0, "must be positive"),
        ("outer_lr", e.outer_lr > 0, "must be positive"),
        ("lr_warmup_steps", e.lr_warmup_steps >= 0, "must be >= 0"),
        ("lr_decay_steps", e.lr_decay_steps >= 0, "must be >= 0 (0: no decay)"),
        ("lr_warmup_steps", not e.lr_decay_steps or e.lr_warmup_steps < e.lr_decay_steps,
         f"must be below lr_decay_steps ({e.lr_warmup_steps} >= {e.lr_decay_steps}): the decay would start before the warm-up ended"),
        ("lr_final", 0 <= e.lr_final <= 1, "must be in [0, 1]"),
        ("outer_momentum", 0 <= e.outer_momentum < 1, "must be in [0, 1)"),
        ("outer_warmup_rounds", e.outer_warmup_rounds >= 0, "must be >= 0"),
        ("seeder", not e.seeder or bool(_PEER_ID.fullmatch(e.seeder)), "must be a peer id (40 lowercase hex digits) or empty"),
        ("seed_version", not e.seed_version or bool(_SHA256.fullmatch(e.seed_version)), "must be a version id (64 lowercase hex digits) or empty"),
        ("collect_window", e.collect_window > 0, "must be positive (seconds)"),
        ("proposal_timeout", e.proposal_timeout > 0, "must be positive (seconds)"),
        ("round_deadline", e.round_deadline > 0, "must be positive (seconds)"),
        ("collect_window", e.collect_window < e.round_deadline,
         f"must end before round_deadline ({e.collect_window:g} >= {e.round_deadline:g} s): no round could ever commit"),
        ("min_members", e.min_members >= 1, "must be at least 1"),
        ("ci_max_regression", e.ci_max_regression >= 0, "must be >= 0"),
        ("ci_max_regression_best", e.ci_max_regression_best >= 0, "must be >= 0"),
        ("ci_window", e.ci_window >= 1, "must be at least 1"),
        ("screen_min_cosine", -1 <= e.screen_min_cosine <= 1, "must be in [-1, 1]"),
        ("screen_relative_cosine", 0 <= e.screen_relative_cosine <= 1, "must be in [0, 1]"),
        ("screen_max_norm_ratio", e.screen_max_norm_ratio >= 1, "must be >= 1 (below 1 even the median delta is left out)"),
        ("max_delta_bytes", e.max_delta_bytes > 0, "must be positive (bytes)"),
        ("allowed_peers", all(isinstance(p, str) and _PEER_ID.fullmatch(p) for p in e.allowed_peers),
         "must list peer ids (40 lowercase hex digits)"),
    ]  # fmt: skip
    for key, ok, reason in rules:
        if not ok:
            raise ConfigError(source, reason, key=key)
    _check_merge(e.merge_method, e.merge_params, source)
    size = len(e.manifest_bytes())
    if size > MAX_MANIFEST:  # no joiner would accept it from a peer
        raise ConfigError(source, f"the manifest is {size} bytes; peers accept at most {MAX_MANIFEST} (task_options too big?)")


def _check_merge(method: str, params: Mapping[str, Any], source: str) -> None:
    """The method exists, can merge any number of deltas, and takes these parameters."""
    from p2pmodel.merge.functional import prepare
    from p2pmodel.merge.registry import MergeParameterError, UnknownMethod, get_method

    try:
        m = get_method(method)
    except UnknownMethod as err:
        raise ConfigError(source, f"unknown merge method {method!r} (known: {', '.join(err.known)})", key="merge_method") from None
    if m.n_models is not None:
        raise ConfigError(source, f"{method} merges exactly {m.n_models} models; a round merges any number of deltas", key="merge_method")
    for name, value in params.items():
        key = f"merge_params.{name}"
        if name == "weights":
            raise ConfigError(source, "set by the swarm (each delta weighs by the samples it holds)", key=key)
        if not isinstance(value, (str, bool, int, float)):  # the round's proposal carries scalars only
            raise ConfigError(source, f"must be a single value, not {_kind(type(value))}", key=key)
    try:
        prepare(method, 3, None, dict(params))  # 3: any count works alike once lists are ruled out
    except MergeParameterError as err:
        raise ConfigError(source, err.reason, key=f"merge_params.{err.param.removesuffix('_')}") from None


def add_node_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per NodeConfig field (`host_maddrs` -> `--host-maddrs`), help from the field."""
    for f in fields(NodeConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = argparse.SUPPRESS if f.metadata.get("hidden") else f.metadata["help"]
        default = f.default
        if isinstance(default, tuple):
            parser.add_argument(flag, nargs="*", default=list(default), metavar=f.metadata.get("metavar", "MULTIADDR"), help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def node_config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The NodeConfig the parsed flags describe, checked (`check_node_config`).

    Raises:
        ConfigError: a flag's value cannot work; `source` is the flag.
    """
    values = {}
    for f in fields(NodeConfig):
        v = getattr(args, f.name)
        values[f.name] = tuple(v) if isinstance(f.default, tuple) else v
    return check_node_config(NodeConfig(**values))


def check_node_config(config: NodeConfig) -> NodeConfig:
    """Return `config` (its log level upper-cased) if it can run here, else raise ConfigError naming the flag.

    Checked: the log level, the status port's range, numbers that cannot be negative, and the
    device (`cuda` needs a CUDA build of torch and a GPU; `cuda:N` needs N+1 GPUs). torch is
    imported only for a device other than cpu.
    """
    rules: list[tuple[str, bool, str]] = [  # (flag, valid, what a valid value is)
        ("--log-level", config.log_level.upper() in LOG_LEVELS,
         f"must be one of {', '.join(LOG_LEVELS)} (any case), not {config.log_level!r}"),
        ("--status-port", 0 <= config.status_port <= 65535, f"must be a port in 0-65535 (0: any free port), not {config.status_port}"),
        ("--cpu-threads", config.cpu_threads >= 0, "must be >= 0 (0: all cores but one)"),
        ("--max-rounds", config.max_rounds >= 0, "must be >= 0 (0: run until stopped)"),
        ("--keep-last", config.keep_last == 0 or config.keep_last >= 2,
         "must be 0 (keep every version) or at least 2 (the head and its parent)"),
        ("--keep-every", config.keep_every >= 0, "must be >= 0 (0: no checkpoints)"),
        ("--shutdown-timeout", config.shutdown_timeout > 0 and math.isfinite(config.shutdown_timeout), "must be a positive number of seconds"),
        ("--event-id", not config.event_id or bool(_SHA256.fullmatch(config.event_id)),
         f"must be an event id (64 lowercase hex digits, as the join line prints it), not {config.event_id[:80]!r}"),
        ("--reachability", config.reachability in REACHABILITY_MODES,
         f"must be one of {', '.join(REACHABILITY_MODES)}, not {config.reachability!r}"),
        ("--reachability", config.reachability != "private" or bool(config.relays or config.peers),
         "private needs a public peer to relay through: pass --relays (or --peers)"),
    ]  # fmt: skip
    for flag, ok, reason in rules:
        if not ok:
            raise ConfigError(flag, reason)
    problem = name_problem(config.name)
    if problem:
        raise ConfigError("--name", f"{problem}: {config.name!r}")
    _check_device(config.device)
    return dataclasses.replace(config, log_level=config.log_level.upper())  # `--log-level debug` works too


def _check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError("--device", f"not a device: {device!r} (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError("--device", f"{device}: {why}; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError("--device", f"{device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ConfigError("--device", f"{device}: unsupported device type {dev.type!r} (auto, cpu, cuda or cuda:N)")
