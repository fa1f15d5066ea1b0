"""The systems `scripts/bench_train` compares, each run as its own process group.

`scripts/bench_train` (the orchestrator) writes a `RunSpec` as JSON and starts

    python scripts/_bench_train_systems.py runner SPEC.json

inside a fresh network namespace (`unshare -n`, `lo` up). The runner reads the namespace's
loopback counters, runs one system (the one function of that name below, which starts the
system's peers as further processes of the same namespace), reads the counters again and
writes `RESULT.json` next to the spec. Peers of DDP, hivemind and the single-peer floor are

    python scripts/_bench_train_systems.py worker SYSTEM SPEC.json RANK

and swarm peers are real `p2pmodel join` processes. Every peer binds 127.0.0.1 only. Every
process runs in its run's folder: `python -c` puts the working directory first on sys.path, and
from a checkout's root that would import its p2pmodel/ over the installed one.

Loopback bytes are read from /proc/self/net/dev, not /sys/class/net/lo/statistics: sysfs shows
the interfaces of the network namespace that *mounted* /sys, so inside `unshare -n` it still
reports the host's `lo`, while /proc/self/net/dev follows the reading process's namespace.

The final evaluation is not done here: the orchestrator evaluates what each runner leaves
behind (a safetensors file, or node0's lineage) with one function, the same for every system.

Why one long file: one small function per system (swarm, DDP, hivemind, single) and their workers,
run as subprocesses of bench_train; splitting per system would duplicate the runner glue.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HELPER = Path(__file__).resolve()
# `p2pmodel join`, started the way `p2pmodel demo` starts its nodes (no console script needed)
JOIN = [sys.executable, "-c", "import sys; from p2pmodel.cli import main; sys.exit(main())", "join"]
POLL_S = 0.25  # how often waits re-check their condition (they return as soon as it holds)


class BenchError(Exception):
    """A system could not be run or measured. Fields: `system`, `reason`."""

    def __init__(self, system: str, reason: str):
        self.system, self.reason = system, reason
        super().__init__(f"{system}: {reason}")


@dataclass
class RunSpec:
    """Everything one system's run needs; written as JSON by the orchestrator."""

    system: str  # "swarm" | "ddp" | "hivemind" | "single"
    variant: str  # the swarm variant's name ("" for the other systems)
    peers: int  # N (1 for "single")
    steps: int  # inner AdamW steps per peer
    inner_steps: int  # H: steps between communications (swarm rounds, hivemind epochs)
    batch_size: int
    task_options: dict  # identical for every system of a bench run
    lr: float  # inner AdamW learning rate (the other AdamW settings are InnerTrainer's defaults)
    lr_schedule: dict  # LRSchedule's fields ({}: a constant lr); the swarm's event holds the same
    threads: int  # torch threads per peer
    peer_seeds: list[int]  # peer i trains on task.batches(peer_seeds[i])
    identity_seeds: list[str]  # swarm: hex Ed25519 seeds whose peer ids give those peer_seeds
    workdir: str  # this run's folder (logs, homes, params, result)
    timeout_s: float  # the whole run, startup to exit
    event: dict = field(default_factory=dict)  # swarm: the event manifest (overrides of EventConfig)
    hivemind: dict = field(default_factory=dict)  # hivemind.Optimizer timing options
    port: int = 0  # ddp: the rendezvous port, picked by the runner inside the namespace
    init: str = ""  # safetensors every system starts from (bench_train --warm-steps); "": the task's init

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "RunSpec":
        return cls(**json.loads(Path(path).read_text()))

    @property
    def dir(self) -> Path:
        return Path(self.workdir)


# ------------------------------------------------------------------------------ shared helpers


def loopback_bytes() -> dict[str, int]:
    """{"rx": bytes, "tx": bytes} of `lo` in this process's network namespace."""
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            cols = rest.split()
            return {"rx": int(cols[0]), "tx": int(cols[8])}
    raise BenchError("loopback", "no lo interface in /proc/self/net/dev")


def swarm_peer_seed(peer_id: str) -> int:
    """The data shard a swarm node trains on: what daemon/node.py passes as `peer_seed`."""
    return int(peer_id[:8], 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], deadline: float, what: str, system: str) -> Any:
    """Poll `predicate` until it returns something truthy; BenchError at `deadline` (monotonic)."""
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(system, f"timed out waiting for {what}")
        time.sleep(POLL_S)


def barrier(spec: RunSpec, name: str, rank: int, deadline: float) -> None:
    """Wait until every peer reached `name`. Files, not sockets: the barrier adds no loopback bytes."""
    (spec.dir / f"barrier.{name}.{rank}").touch()
    wait_until(lambda: all((spec.dir / f"barrier.{name}.{r}").exists() for r in range(spec.peers)), deadline, f"barrier {name}", spec.system)


def kill_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a process and everything it started (p2pd, hivemind's DHT process), SIGKILL what stays."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def reap_leftovers() -> None:
    """Kill what our children left behind (an orphaned p2pd keeps the namespace busy)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


def wait_procs(procs: list[subprocess.Popen], deadline: float) -> bool:
    """Wait until every process exited; False (and nothing killed) if the deadline came first."""
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def start_worker(spec_path: Path, spec: RunSpec, rank: int) -> subprocess.Popen:
    cmd = [sys.executable, str(HELPER), "worker", spec.system, str(spec_path), str(rank)]
    # GLOO_SOCKET_IFNAME: gloo otherwise picks its interface from the hostname, which in a
    # namespace with only `lo` may resolve to an address that is not there
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(spec.threads), GLOO_SOCKET_IFNAME="lo")
    with open(spec.dir / f"{spec.system}{rank}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=spec.dir)


def run_workers(spec_path: Path, spec: RunSpec, n: int) -> dict[str, Any]:
    """Start ranks 0..n-1, wait for them under the run's deadline, gather their JSON reports."""
    deadline = time.monotonic() + spec.timeout_s
    procs = [start_worker(spec_path, spec, rank) for rank in range(n)]
    try:
        finished = wait_procs(procs, deadline)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    reports = []
    for rank, p in enumerate(procs):
        path = spec.dir / f"worker{rank}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else None)
    problems = []
    if not finished:
        problems.append(f"timed out after {spec.timeout_s:.0f}s; killed")
    bad = [rank for rank, p in enumerate(procs) if p.returncode != 0]
    if bad:
        problems.append(f"worker(s) {bad} failed (exit {[procs[r].returncode for r in bad]}); see {spec.dir}/{spec.system}*.log")
    return {"workers": reports, "problems": problems, "params": str(spec.dir / "params0.safetensors")}


# ------------------------------------------------------------------------------ workers (one peer each)


def _task_and_trainer(spec: RunSpec, rank: int, wrap: Callable[[Any], Any] = lambda m: m):
    """The shared task, its model, and the swarm's very inner optimizer (InnerTrainer's AdamW)."""
    from p2pmodel.tasks import load_task
    from p2pmodel.training import InnerTrainer, LRSchedule

    task = load_task("charlm", **spec.task_options)
    model = task.build_model()
    if spec.init:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(spec.init))
    schedule = LRSchedule(**spec.lr_schedule) if spec.lr_schedule else None
    trainer = InnerTrainer(task, wrap(model), "cpu", lr=spec.lr, peer_seed=spec.peer_seeds[rank], cpu_threads=spec.threads,
                           lr_schedule=schedule)  # fmt: skip
    return task, model, trainer


def _save_params(model, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def _report(spec: RunSpec, rank: int, result, **extra: Any) -> None:
    data = {"rank": rank, "steps": result.steps, "samples": result.samples, "train_s": result.seconds, "mean_loss": result.mean_loss, **extra}
    (spec.dir / f"worker{rank}.json").write_text(json.dumps(data))


def worker_single(spec: RunSpec, rank: int) -> None:
    """One peer alone on its shard: the floor every collaboration must beat."""
    _, model, trainer = _task_and_trainer(spec, rank)
    result = trainer.train(spec.steps)
    _save_params(model, spec.dir / f"params{rank}.safetensors")
    _report(spec, rank, result)


def worker_ddp(spec: RunSpec, rank: int) -> None:
    """torch DDP over gloo: gradients all-reduced every step. The quality reference."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{spec.port}", rank=rank, world_size=spec.peers, timeout=timedelta(seconds=spec.timeout_s)
    )
    try:
        # InnerTrainer calls task.loss(ddp_model, batch): the forward goes through DDP, so every
        # backward all-reduces the gradients before InnerTrainer's clip and AdamW step.
        _, model, trainer = _task_and_trainer(spec, rank, wrap=DistributedDataParallel)
        result = trainer.train(spec.steps)
        if rank == 0:
            _save_params(model, spec.dir / "params0.safetensors")
        _report(spec, rank, result)
    finally:
        dist.destroy_process_group()


class _AveragingLog(logging.Handler):
    """Records hivemind's state-averaging outcomes, in order, from its own log records.

    With verbose=False hivemind logs them at DEBUG; this handler sees them without turning the
    rest of hivemind's logging up. A logged success is not trusted on its own (8-bit codecs under
    NumPy 2 report success and average nothing): the runner also compares the peers' averaged
    tensors and their final parameters.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.outcomes: list[int] = []  # group size of each round, in order; 0: the round failed

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if m := re.search(r"Averaged parameters with (\d+) peers", text):
            self.outcomes.append(int(m.group(1)))
        elif "Averaging failed" in text:
            self.outcomes.append(0)


class _ScheduledHivemind:
    """hivemind.Optimizer as InnerTrainer drives it, with its lr schedule reaching the optimizer
    that steps: hivemind's `param_groups` are copies, so setting "lr" on them would change nothing."""

    def __init__(self, opt) -> None:
        self.opt = opt

    @property
    def param_groups(self):
        return self.opt.state_averager.optimizer.param_groups

    def step(self, *args, **kwargs):
        return self.opt.step(*args, **kwargs)

    def zero_grad(self, *args, **kwargs):
        return self.opt.zero_grad(*args, **kwargs)


def worker_hivemind(spec: RunSpec, rank: int) -> None:
    """hivemind.Optimizer with local updates, configured as hivemind's quickstart does."""
    import hivemind
    import torch
    from hivemind.compression import NoCompression

    counter = _AveragingLog()
    averager_log = logging.getLogger("hivemind.optim.state_averager")
    averager_log.setLevel(logging.DEBUG)
    averager_log.addHandler(counter)

    deadline = time.monotonic() + spec.timeout_s
    maddrs_file = spec.dir / "dht0.maddrs"
    initial_peers: list[str] = []
    if rank > 0:
        initial_peers = wait_until(lambda: maddrs_file.exists() and maddrs_file.read_text().split(), deadline, "peer 0's DHT address", "hivemind")
    dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers, start=True)
    if rank == 0:
        tmp = maddrs_file.with_suffix(".tmp")
        tmp.write_text(" ".join(str(a) for a in dht.get_visible_maddrs()))
        tmp.rename(maddrs_file)  # atomic: others never read half an address list

    _, model, trainer = _task_and_trainer(spec, rank)
    opt = hivemind.Optimizer(
        dht=dht,
        run_id="bench_train",
        optimizer=trainer.optimizer,  # InnerTrainer's AdamW itself, wrapped (the quickstart passes an instance)
        batch_size_per_step=spec.batch_size,
        target_batch_size=spec.peers * spec.batch_size * spec.inner_steps,  # an epoch = H local steps per peer
        use_local_updates=True,
        matchmaking_time=spec.hivemind["matchmaking_time"],
        averaging_timeout=spec.hivemind["averaging_timeout"],
        # NoCompression: hivemind's 8-bit codecs break under NumPy 2 while reporting success
        state_averaging_compression=NoCompression(),
        verbose=False,
    )
    trainer.optimizer = _ScheduledHivemind(opt)  # InnerTrainer's loop now calls hivemind.Optimizer.step/zero_grad
    # Start together (as DDP's rendezvous and the swarm's min_members do): a peer training alone
    # while the others import torch would just be the single-peer floor for a while.
    barrier(spec, "ready", rank, deadline)
    result = trainer.train(spec.steps)
    if trainer.lr_schedule is not None:  # the schedule must have reached the optimizer that steps
        lr = opt.state_averager.optimizer.param_groups[0]["lr"]
        if not math.isclose(lr, trainer.lr * trainer.lr_schedule.factor(trainer.step - 1)):
            raise BenchError("hivemind", f"the lr schedule did not reach hivemind's optimizer (its lr is {lr:g})")
    # The last epoch's averaging runs in the background: wait for it and apply it, then stay
    # online until every peer is done, so that no one averages with a peer that already left.
    opt.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
    barrier(spec, "trained", rank, deadline)
    _save_params(model, spec.dir / f"params{rank}.safetensors")
    with torch.no_grad(), opt.state_averager.get_tensors() as averaged:
        # the buffer holds the result of the last averaging round: equal on every peer if it ran
        from safetensors.torch import save_file  # never pickle, even between our own processes

        save_file({str(i): t.detach().clone().contiguous() for i, t in enumerate(averaged)}, str(spec.dir / f"averaged{rank}.safetensors"))
    _report(spec, rank, result, local_epoch=opt.local_epoch, averaging_outcomes=counter.outcomes)
    barrier(spec, "saved", rank, deadline)
    opt.shutdown()
    dht.shutdown()


WORKERS: dict[str, Callable[[RunSpec, int], None]] = {"single": worker_single, "ddp": worker_ddp, "hivemind": worker_hivemind}


# ------------------------------------------------------------------------------ systems (one run each)


def run_single(spec_path: Path, spec: RunSpec) -> dict[str, Any]:
    return run_workers(spec_path, spec, 1)


def run_ddp(spec_path: Path, spec: RunSpec) -> dict[str, Any]:
    spec.port = free_port()  # inside the namespace every port is free; this just picks one
    spec.save(spec_path)
    return run_workers(spec_path, spec, spec.peers)


def run_hivemind(spec_path: Path, spec: RunSpec) -> dict[str, Any]:
    out = run_workers(spec_path, spec, spec.peers)
    if not out["problems"]:
        out["averaging"] = check_hivemind_averaging(spec, out["workers"])
        if not out["averaging"]["ok"]:
            out["problems"].append(f"averaging failed: {out['averaging']['reason']}")
    return out


def check_hivemind_averaging(spec: RunSpec, reports: list[dict]) -> dict[str, Any]:
    """Did the peers really average? Three independent signs, all required:

    1. every peer averaged with all N peers in at least half of the epochs its steps span
       (fewer is partial averaging, reported as a failure);
    2. if every peer's last round succeeded with all N, the averaged tensors are equal on every
       peer (NoCompression: an all-reduce that ran leaves bit-identical buffers; a silently
       failing codec leaves each peer its own). Alone this sign would pass when nothing ever
       averaged (the buffers then all hold the identical initial parameters): hence sign 1;
    3. the final parameters of the peers are much closer to each other than they moved from
       the initial model. Measured here (quick run, 30 steps, H=10): 0.16 with averaging, 0.57
       with none (early steps of both peers share a direction, so even unaveraged peers stay
       correlated; the gap widens with steps). The bound is 0.35.
    """
    from safetensors.torch import load_file

    from p2pmodel.tasks import load_task

    outcomes = [r["averaging_outcomes"] for r in reports]
    full_rounds = [sum(1 for g in o if g == spec.peers) for o in outcomes]
    expected = spec.steps // spec.inner_steps
    last_ok = all(o and o[-1] == spec.peers for o in outcomes)
    buffers = [list(load_file(str(spec.dir / f"averaged{r}.safetensors")).values()) for r in range(spec.peers)]
    buffer_diff = max(float((a - b).abs().max()) for other in buffers[1:] for a, b in zip(buffers[0], other))
    init = {k: v.float() for k, v in load_task("charlm", **spec.task_options).build_model().state_dict().items()}
    params = [load_file(str(spec.dir / f"params{r}.safetensors")) for r in range(spec.peers)]

    def dist(a: dict, b: dict) -> float:
        return math.sqrt(sum(float((a[k].float() - b[k].float()).square().sum()) for k in a))

    moved = sum(dist(p, init) for p in params) / len(params)
    spread = max(dist(params[0], p) for p in params[1:])
    ratio = spread / moved if moved else float("inf")
    reasons = []
    # A smoke run (--quick: 3 epochs) on a loaded machine loses its first epoch to start-up skew,
    # and at 30 steps unaveraged peers are still close: there, one epoch averaged by every peer
    # (with equal buffers) is the proof, and the spread bound is not applied.
    short = expected <= 3
    if min(full_rounds) < (1 if short else max(1, math.ceil(expected / 2))):
        reasons.append(f"averaged with all {spec.peers} peers in {min(full_rounds)} of {expected} epochs")
    if last_ok and buffer_diff > 1e-6:
        reasons.append(f"last averaged tensors differ between peers (max |diff| {buffer_diff:.3g})")
    if ratio > 0.35 and not short:
        reasons.append(f"final parameters {ratio:.2f}x as far apart as they moved from the start")
    return {
        "ok": not reasons,
        "reason": "; ".join(reasons),
        "rounds_all_peers": full_rounds,
        "rounds_failed": [sum(1 for g in o if g == 0) for o in outcomes],
        "epochs": [r["local_epoch"] for r in reports],
        "epochs_expected": expected,
        "last_round_ok": last_ok,
        "buffer_max_diff": buffer_diff,
        "spread_over_moved": ratio,
    }


def _parse_fields(line: str) -> dict[str, Any]:
    """key=value pairs of a daemon log line (values may be "quoted"); numbers become floats."""
    out: dict[str, Any] = {}
    for key, raw in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line):
        value = raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def rounds_to_target(lines: list[dict[str, Any]], rounds: int, planned_samples: int) -> int | None:
    """How many committed rounds (of this node's ' committed ' lines) give the other systems' budget.

    The budget is samples trained, N * steps * batch: every system gets the same compute. When
    the daemon logs `samples_trained` (the samples trained since the last commit, each counted
    once), the target is the first round where their sum reaches the budget: a failed round's
    work counts at the next commit, so R committed rounds could hold more than R * H steps per
    peer. Without that field, the target is R = steps / H committed rounds. None: not reached yet.
    """
    if lines and all(isinstance(line.get("samples_trained"), float) for line in lines):
        total = 0.0
        for i, line in enumerate(lines, 1):
            total += line["samples_trained"]
            if total >= planned_samples:
                return i
        return None
    return rounds if len(lines) >= rounds else None


class _Node:
    """One `p2pmodel join` process: its home, log, and what the bench read from it."""

    def __init__(self, spec: RunSpec, index: int):
        self.index = index
        self.home = spec.dir / f"node{index}"
        self.log_path = spec.dir / f"node{index}.log"
        self.proc: subprocess.Popen | None = None
        self.status: dict[str, Any] | None = None  # the status JSON read after its last round
        self.stopped_by_bench = False
        self.home.mkdir(parents=True)
        from p2pmodel.daemon.identity import save_identity
        from p2pmodel.protocols.signing import PeerIdentity

        # a fixed identity: its peer id fixes the node's data shard, which the baselines reuse
        save_identity(PeerIdentity.from_seed(bytes.fromhex(spec.identity_seeds[index])), self.home / "identity.pem")

    def start(self, args: list[str], stdout: int) -> None:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*JOIN, "--home", str(self.home), *args], stdout=stdout, stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True, cwd=self.home.parent
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _lines(self, marker: str) -> list[dict[str, Any]]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [_parse_fields(line.split(marker, 1)[1]) for line in lines if marker in line]

    def committed(self) -> list[dict[str, Any]]:
        """The key=value fields of every ' committed ' line this node logged so far."""
        return self._lines(" committed ")

    def failed_rounds(self) -> list[dict[str, Any]]:
        return self._lines(" round failed ")

    def read_status(self) -> bool:
        from p2pmodel.daemon.status import StatusUnavailable, fetch_status

        try:
            url = json.loads((self.home / "node.json").read_text())["status_url"]
            self.status = fetch_status(url, timeout=5)
            return True
        except (OSError, ValueError, KeyError, StatusUnavailable):
            return False

    def stop(self) -> None:
        """SIGTERM: the node leaves gracefully (finishes or abandons its round, departs)."""
        if self.running:
            self.stopped_by_bench = True
            self.proc.send_signal(signal.SIGTERM)


def _read_join_line(proc: subprocess.Popen, deadline: float) -> str:
    """node0's `p2pmodel join --peers ...` line from its stdout, under a deadline.

    A thread reads the lines (a select() on a buffered pipe misses lines already buffered) and
    keeps draining stdout afterwards, so node0 never blocks on a full pipe.
    """
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # EOF: node0 exited

    threading.Thread(target=pump, daemon=True).start()
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            raise BenchError("swarm", f"node0 exited (code {proc.wait()}) before printing its join line")
        if line.strip().startswith("p2pmodel join"):
            return line.strip()
    raise BenchError("swarm", "node0 did not print its join line in time")


def run_swarm(spec_path: Path, spec: RunSpec) -> dict[str, Any]:
    """N real `p2pmodel join` processes until they trained the other systems' budget.

    The target is `rounds_to_target`: R = steps / H committed rounds, or fewer when a failed
    round's work was carried into a later one. Once every node reached it, the bench reads the
    nodes' byte counters (status API) and stops them with SIGTERM. Why not `--max-rounds R`: a
    node leaves ~0.1 s after its last commit, taking its status API (and its counters) with it,
    and R would be wrong after a failed round. `--max-rounds R+2` stays as a backstop: if the
    bench cannot stop them, they still leave by themselves. The model evaluated is the version
    node0 committed at the target (the nodes may commit one more while they are stopped).
    """
    rounds = spec.steps // spec.inner_steps
    event = dict(spec.event)
    nodes = [_Node(spec, i) for i in range(spec.peers)]
    if spec.init:
        event.update(_seed_founder(spec, nodes[0].home / "lineage"))
    event_path = spec.dir / "event.json"
    event_path.write_text(json.dumps(event, indent=2))
    common = ["--status-port", "0", "--device", "cpu", "--cpu-threads", str(spec.threads)]
    common += ["--max-rounds", str(rounds + 2), "--log-level", "INFO"]
    planned = spec.peers * spec.steps * spec.batch_size
    start = time.monotonic()
    deadline = start + spec.timeout_s
    problems: list[str] = []
    try:
        nodes[0].start(["--event", str(event_path), *common], stdout=subprocess.PIPE)
        join = _read_join_line(nodes[0].proc, deadline)
        extra = join.split("p2pmodel join", 1)[1].split()  # --peers ... --event-id ...: the event comes by hash
        for node in nodes[1:]:
            node.start([*extra, *common], stdout=subprocess.DEVNULL)
        problems += _follow_swarm(nodes, lambda n: rounds_to_target(n.committed(), rounds, planned) is not None, deadline)
    except BenchError as e:
        problems.append(e.reason)
    finally:
        for node in nodes:
            if node.running:
                kill_tree(node.proc)
        reap_leftovers()
    per_node = []
    for n in nodes:
        lines = n.committed()
        per_node.append({
            "committed": lines, "target_rounds": rounds_to_target(lines, rounds, planned), "failed_rounds": n.failed_rounds(),
            "status": n.status, "exit": n.proc.returncode if n.proc else None, "stopped_by_bench": n.stopped_by_bench,
        })  # fmt: skip
    bad = [i for i, n in enumerate(nodes) if n.proc is not None and n.proc.returncode not in (0, -signal.SIGTERM)]
    if bad:
        problems.append(f"node(s) {bad} exited with {[nodes[i].proc.returncode for i in bad]}; see {spec.dir}/node*.log")
    short = [i for i, n in enumerate(per_node) if n["target_rounds"] is None]
    if short:
        problems.append(f"node(s) {short} did not train the budget ({planned} samples) in committed rounds: {[len(per_node[i]['committed']) for i in short]} committed")
    unread = [n.index for n in nodes if n.status is None]
    if unread:
        problems.append(f"could not read the byte counters of node(s) {unread}")
    return {"nodes": per_node, "rounds": rounds, "planned_samples": planned, "problems": problems, "lineage": str(nodes[0].home / "lineage")}


def _seed_founder(spec: RunSpec, lineage: Path) -> dict[str, str]:
    """Put `spec.init` into node0's lineage as the event's seed version, as `p2pmodel seed` does
    for its founder (time 0, author "seed"); the others fetch it by id. Returns the event keys
    that name it: `seed_version` and `seeder` (node0)."""
    from safetensors.torch import load_file

    from p2pmodel.lineage import LineageStore
    from p2pmodel.protocols.signing import PeerIdentity

    with LineageStore.init(lineage) as store:
        version = store.commit(load_file(spec.init), parents=[], message=f"seed of event {spec.event['name']}", time=0.0, author="seed")
    seeder = PeerIdentity.from_seed(bytes.fromhex(spec.identity_seeds[0])).peer_id
    return {"seed_version": version.id, "seeder": seeder}


def _follow_swarm(nodes: list[_Node], reached_target: Callable[[_Node], bool], deadline: float) -> list[str]:
    """Wait until every node reached its target; read their counters; stop them; wait for exit.

    A node still short of the target long after another one reached it (or left) is stopped: the
    others are leaving, it cannot commit alone. Returns what went wrong, if anything.
    """
    problems: list[str] = []
    linger = 120.0  # seconds a lagging node may take to catch up once another is done
    done_since: float | None = None
    attempts = [0] * len(nodes)
    while any(n.running for n in nodes):
        now = time.monotonic()
        done = [n for n in nodes if not n.running or reached_target(n)]
        if len(done) == len(nodes):
            for n in nodes:
                if n.running and not n.stopped_by_bench:
                    attempts[n.index] += 1
                    if n.read_status() or attempts[n.index] >= 3:  # unreadable: stop it anyway (reported)
                        n.stop()
        if done_since is None and done:
            done_since = now
        if now > deadline or (done_since is not None and now > done_since + linger):
            late = [n.index for n in nodes if n.running and not n.stopped_by_bench]
            why = "the run's deadline passed" if now > deadline else f"{linger:.0f}s after another node was done"
            if late:
                problems.append(f"node(s) {late} still short of the target when {why}; stopped by the bench")
            for n in nodes:
                if n.running:
                    if n.status is None:
                        n.read_status()
                    kill_tree(n.proc)
            break
        time.sleep(POLL_S)
    return problems


SYSTEMS: dict[str, Callable[[Path, RunSpec], dict[str, Any]]] = {"swarm": run_swarm, "ddp": run_ddp, "hivemind": run_hivemind, "single": run_single}


# ------------------------------------------------------------------------------ entry points


def runner(spec_path: Path) -> None:
    """Run one system and write RESULT.json: loopback bytes before/after, wall time, its details."""
    spec = RunSpec.load(spec_path)
    before = loopback_bytes()
    start = time.monotonic()
    try:
        details = SYSTEMS[spec.system](spec_path, spec)
    except BenchError as e:
        details = {"problems": [e.reason]}
    except Exception as e:  # a bug here must still leave a result (and the loopback count) behind
        import traceback

        traceback.print_exc()
        details = {"problems": [f"runner error: {type(e).__name__}: {e}"]}
    finally:
        reap_leftovers()
    wall = time.monotonic() - start
    after = loopback_bytes()
    result = {"wall_s": wall, "loopback": {k: after[k] - before[k] for k in before}, **details}
    (spec.dir / "result.json").write_text(json.dumps(result, indent=1))


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "runner":
        runner(Path(argv[1]))
        return 0
    if len(argv) == 4 and argv[0] == "worker" and argv[1] in WORKERS:
        WORKERS[argv[1]](RunSpec.load(argv[2]), int(argv[3]))
        return 0
    print(f"usage: {sys.argv[0]} runner SPEC.json | worker {{{','.join(WORKERS)}}} SPEC.json RANK", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
