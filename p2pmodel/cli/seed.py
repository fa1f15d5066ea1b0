"""`p2pmodel seed`: a researcher founds an event.

    p2pmodel seed (--task TASK [--from REF] | --from MODEL_DIR_OR_REF) --name NAME [--set KEY=VALUE ...] -o EVENT_DIR

writes a new folder:

- `EVENT_DIR/event.toml` — the manifest (daemon/manifest.py): every setting, commented. Its
  `seed_version` names the seed version; its hash is the event id. Volunteers need neither
  this file nor any other: the swarm serves both by hash (the join line's `--event-id`);
- `EVENT_DIR/founder/` — the founder's node home: its identity (`identity.pem`, the event's
  `seeder`; keep it private) and `lineage/` holding the seed version on `main`.

The seed version holds the model every peer starts from: the task's model (`--task`; with
`--from REF`, the tensors of version REF of `--repo`, which must be that model's exactly: a
trained one), or a Hugging Face causal LM (`--from` a folder, or a version of `--repo` holding one) with its
`config.json` and tokenizer files, so every version of the event exports with
`p2pmodel export REF --format hf` and loads with `from_pretrained`. No path is part of the
event: each volunteer trains an hf event on text of their own (`join --data`). A model seeded
`--from` is taken to be trained, so its event's outer step is Nesterov momentum
(`config.TRAINED_SEED_OUTER`) where a `--task` event averages: measured, see there.

The event is checked whole (`config.event_from_mapping`, and an hf event's options against the
model) before anything is written; a failed seed leaves no folder behind. It prints the line
that starts the founder's node, which in turn prints the line volunteers paste.
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
    p.add_argument("--task", help='task plugin to train: "charlm", "hf" or "package.module:object"')
    p.add_argument("--from", dest="source", metavar="MODEL_DIR_OR_REF",
                   help="a Hugging Face causal LM folder (with config.json), or a version of --repo that holds one: the "
                        "event trains it (hf task; volunteers bring their text: join --data). With --task: a version of "
                        "--repo holding that task's model (same tensor names, shapes, dtypes), e.g. one trained alone")  # fmt: skip
    p.add_argument("--name", required=True, help="event name (letters, digits, '.', '_', '-'); part of every DHT key")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting (repeatable), e.g. inner_steps=20, codec.value_bits=1, "
                        "task_options.context=256; values are TOML, bare text is a string")  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="EVENT_DIR", help="folder to write (new, or empty)")
    p.set_defaults(func=cmd_seed)


def cmd_seed(args: argparse.Namespace) -> int:
    from p2pmodel.daemon.config import TRAINED_SEED_OUTER, EventConfig, event_from_mapping, load_event
    from p2pmodel.daemon.manifest import event_to_toml, with_settings
    from p2pmodel.daemon.identity import save_identity
    from p2pmodel.protocols.signing import PeerIdentity

    out = Path(args.output).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder; seed writes a new event folder")
    if args.task is None and args.source is None:
        raise UsageError("seed needs --task TASK, or --from MODEL_DIR_OR_REF (a Hugging Face model)")
    if args.task == "hf" and args.source is None:
        raise UsageError("an hf event starts from a model: use --from MODEL_DIR (or --from REF of --repo)")
    data: dict[str, Any] = dataclasses.asdict(EventConfig())
    data["name"] = args.name
    model_dir = ref = task_ref = None
    if args.task not in (None, "hf"):
        data["task"] = args.task
        task_ref = args.source  # None: the task's own init
    else:
        model_dir, ref = _model_source(args.source)
        data["task"] = "hf"
    if args.source is not None:
        data.update(TRAINED_SEED_OUTER)  # a trained model takes outer momentum; --set still wins
    data = with_settings(data, args.settings)
    if data.get("seed_version"):
        raise UsageError("--set seed_version: seed commits the seed version and names it itself")
    identity = None
    if not data.get("seeder"):  # the founder is a new identity, unless --set seeder names one
        identity = PeerIdentity.generate()
        data["seeder"] = identity.peer_id
    event = event_from_mapping(data, source="event")

    founder, manifest = out / "founder", out / "event.toml"
    with _new_folder(out):
        if ref is not None:
            model_dir = out / ".model-export"
            _export_hf(args.repo, ref, model_dir)
        trained = _task_tensors(args.repo, task_ref) if task_ref is not None else None
        vid, task_config = _seed_lineage(founder / "lineage", event, model_dir, trained)
        if ref is not None:
            shutil.rmtree(model_dir)  # the seed version holds it now
        event = event_from_mapping({**dataclasses.asdict(event), "seed_version": vid}, source="event")
        if identity is not None:
            save_identity(identity, founder / "identity.pem")
        manifest.write_text(event_to_toml(event, task_config))
        read = load_event(str(manifest))
        if read.event_hash() != event.event_hash():
            raise SeedError(manifest, event.event_hash(), read.event_hash())

    print(f"seeded event {event.name} (event {event.event_hash()[:12]}, seed version {vid[:12]}) in {out}")
    if identity is None:
        print(f"(the seeder {event.seeder[:12]} is not this machine: put its identity.pem in {founder} first)")
    print("start the swarm with this line; it prints the line volunteers paste (they need nothing else):")
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


def _task_tensors(repo: str, ref: str) -> dict[str, Any]:
    """The tensors of version `ref` of `repo` (`seed --task T --from REF`)."""
    from p2pmodel.lineage import LineageStore

    with LineageStore.open(repo) as store:
        return store.state_dict(store.resolve(ref))


def _seed_lineage(path: Path, event: Any, model_dir: Path | None, trained: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Commit the event's seed version on `main` of a new lineage at `path`.

    `model_dir` (hf events): the seed holds that model's parameters, `config.json` and
    tokenizer files (`tasks.hf.seed_content`), and the event's task options are checked
    against it; otherwise the task's model, with `trained`'s tensors when given (they must
    be that model's exactly: names, shapes, dtypes). Returns the seed's id and the task's full
    options (the manifest lists those it leaves at their defaults).
    """
    from p2pmodel.lineage import LineageStore
    from p2pmodel.tasks import load_task

    if model_dir is not None:
        from p2pmodel.tasks.hf import check_options, seed_content

        task_config = check_options(model_dir, event.task_options)
        state, files = seed_content(model_dir, dtype=task_config["dtype"], seed=task_config["seed"])
    else:
        task = load_task(event.task, **event.task_options)
        state, files = {k: v.detach().to("cpu") for k, v in task.build_model().state_dict().items()}, {}
        task_config = task.config()
        if trained is not None:
            _check_layout(event.task, state, trained)
            state = trained
    path.parent.mkdir(parents=True, exist_ok=True)
    with LineageStore.init(path) as store:
        # time 0 and a fixed author: the id depends only on the model and the event's name
        version = store.commit(state, parents=[], message=f"seed of event {event.name}", time=0.0, author="seed", files=files)
    return version.id, task_config


def _check_layout(task: str, model: dict[str, Any], trained: dict[str, Any]) -> None:
    """UsageError unless `trained` has exactly `model`'s tensor names, shapes and dtypes."""
    missing, extra = sorted(set(model) - set(trained)), sorted(set(trained) - set(model))
    if missing or extra:
        raise UsageError(f"--from: that version is not task {task}'s model with these options: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, extra {extra[:3]}{'...' if len(extra) > 3 else ''}")  # fmt: skip
    for name, t in model.items():
        u = trained[name]
        if tuple(u.shape) != tuple(t.shape) or u.dtype != t.dtype:
            raise UsageError(f"--from: tensor {name} is {u.dtype} {tuple(u.shape)}; task {task}'s model has {t.dtype} {tuple(t.shape)}")


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
