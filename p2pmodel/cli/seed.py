"""`p2pmodel seed`: a researcher founds an event.

    p2pmodel seed (--task TASK | --from MODEL_DIR_OR_REF) --name NAME [--set KEY=VALUE ...] -o EVENT_DIR

writes a new folder:

- `EVENT_DIR/event.toml` — the manifest (daemon/manifest.py): every setting, commented; the
  file volunteers pass to `p2pmodel join --event`;
- `EVENT_DIR/founder/` — the founder's node home: its identity (`identity.pem`, the event's
  `seeder`; keep it private) and `lineage/` holding the seed version on `main`, built by the
  same `daemon.node.seed_version` every joining peer runs, so theirs has the same id;
- `EVENT_DIR/model/` — with `--from REF` only: the version exported as a Hugging Face folder,
  which the event's `hf` task reads.

The event is checked whole (`config.event_from_mapping`) and its task built before anything is
written; a failed seed leaves no folder behind. It prints the line that starts the founder's
node, which in turn prints the line volunteers paste.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import shutil
from pathlib import Path
from typing import Any, Iterator

from p2pmodel.errors import P2PModelError, UsageError

__all__ = ["register", "SeedError"]


class SeedError(P2PModelError):
    """The written manifest does not read back as the event it was written from (our bug).

    Fields: `path`, `written` and `read` (the two event hashes).
    """

    def __init__(self, path: Path, written: str, read: str):
        self.path, self.written, self.read = path, written, read
        super().__init__(f"{path} reads back as event {read[:12]}, not {written[:12]}; please report this")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "seed",
        help="found an event: its seed version and manifest (event.toml)",
        description="Write a new event folder: the manifest volunteers join with, and the founder's "
        "node home holding the seed version.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help='task plugin to train: "charlm", "hf" or "package.module:object"')
    source.add_argument("--from", dest="source", metavar="MODEL_DIR_OR_REF",
                        help="a Hugging Face causal LM folder (with config.json), or a version of --repo "
                             "that holds one; the event trains it (hf task; give task_options.text_files)")  # fmt: skip
    p.add_argument("--name", required=True, help="event name (letters, digits, '.', '_', '-'); part of every DHT key")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting (repeatable), e.g. inner_steps=20, codec.value_bits=1, "
                        "task_options.text_files='[\"data/\"]'; values are TOML, bare text is a string")  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="EVENT_DIR", help="folder to write (new, or empty)")
    p.set_defaults(func=cmd_seed)


def cmd_seed(args: argparse.Namespace) -> int:
    from p2pmodel.daemon.config import ConfigError, EventConfig, event_from_mapping, load_event
    from p2pmodel.daemon.manifest import event_to_toml, with_settings
    from p2pmodel.protocols.signing import PeerIdentity

    out = Path(args.output).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder; seed writes a new event folder")
    data: dict[str, Any] = dataclasses.asdict(EventConfig())
    data["name"] = args.name
    ref = None
    if args.task is not None:
        data["task"] = args.task
    else:
        model_dir, ref = _model_source(args.source)
        data["task"] = "hf"
        data["task_options"] = {"model_dir": str(model_dir or out / "model")}  # a ref is exported there
    data = with_settings(data, args.settings)
    identity = None
    if not data.get("seeder"):  # the founder is a new identity, unless --set seeder names one
        identity = PeerIdentity.generate()
        data["seeder"] = identity.peer_id
    event = event_from_mapping(data, source="event")
    if event.task == "hf" and "text_files" not in event.task_options:
        raise ConfigError("event", "the hf task trains on text: --set task_options.text_files='[\"data/\"]'",
                          key="task_options.text_files")  # fmt: skip

    founder, manifest = out / "founder", out / "event.toml"
    with _new_folder(out):
        if ref is not None:
            _export_hf(args.repo, ref, out / "model")
        vid, task_config = _seed_lineage(founder / "lineage", event)
        if identity is not None:
            identity.save(founder / "identity.pem")
        manifest.write_text(event_to_toml(event, task_config))
        read = load_event(str(manifest))
        if read.event_hash() != event.event_hash():
            raise SeedError(manifest, event.event_hash(), read.event_hash())

    print(f"seeded event {event.name} (event {event.event_hash()[:12]}, seed version {vid[:12]}) in {out}")
    if identity is None:
        print(f"(the seeder {event.seeder[:12]} is not this machine: put its identity.pem in {founder} first)")
    print("start the swarm with this line; it prints the line volunteers paste (they need only event.toml):")
    print(f"  p2pmodel join --home {shlex.quote(str(founder))} --event {shlex.quote(str(manifest))}", flush=True)
    return 0


def _model_source(source: str) -> tuple[Path | None, str | None]:
    """`(model_dir, None)` for a Hugging Face folder, `(None, ref)` for anything else."""
    path = Path(source).expanduser()
    if not path.exists():
        return None, source
    if not (path / "config.json").is_file():
        raise UsageError(f"--from {source}: not a Hugging Face model folder (no config.json); only such folders, "
                         "or versions of --repo holding one, can seed an event for now")  # fmt: skip
    return path.resolve(), None


def _export_hf(repo: str, ref: str, dest: Path) -> None:
    """Write version `ref` of `repo` to `dest` as a Hugging Face folder (its config.json included)."""
    from p2pmodel.checkpoint import write_hf_folder
    from p2pmodel.lineage import LineageStore

    with LineageStore.open(repo) as store:
        v = store.get_version(store.resolve(ref))
        if "config.json" not in v.files:
            raise UsageError(f"--from {ref}: version {v.id[:12]} has no config.json, so no task can build it; "
                             "only Hugging Face causal LM versions can seed an event for now")  # fmt: skip
        files = {n: store.get_file(oid, needed_by=v.id) for n, oid in v.files.items()}
        tensors = ((n, store.get_tensor(e, needed_by=v.id)) for n, e in v.tensors.items())
        write_hf_folder(dest, tensors, files, layout={n: (e.dtype, e.shape) for n, e in v.tensors.items()})


def _seed_lineage(path: Path, event: Any) -> tuple[str, dict[str, Any]]:
    """Commit the event's seed version into a new lineage at `path`; returns its id and the
    task's full options (listed in the manifest)."""
    from p2pmodel.daemon.node import seed_version
    from p2pmodel.lineage import LineageStore
    from p2pmodel.tasks import load_task

    task = load_task(event.task, **event.task_options)
    path.parent.mkdir(parents=True, exist_ok=True)
    with LineageStore.init(path) as store:
        vid = seed_version(store, task, event)
    return vid, task.config()


@contextlib.contextmanager
def _new_folder(out: Path) -> Iterator[None]:
    """Create `out` (or use it, empty); on any error remove it again (or empty it again)."""
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for child in list(out.iterdir()) if existed else [out]:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        raise
