"""`p2pmodel join`, `p2pmodel status` and `p2pmodel demo`: the swarm's commands.

- `join` runs a node until SIGINT/SIGTERM (flags are generated from `NodeConfig`'s fields).
  Without `--peers` it founds a new swarm and prints the exact line others run to join it,
  then the node's status URL. Bad flags and a bad event fail first, as one line (exit 2);
  SIGINT/SIGTERM leave within `--shutdown-timeout` with exit code 0.
- `status` reads a running node's local status API and prints a summary (or `--json`);
  `--swarm` prints every peer the node heard of instead (device, rate, rounds, reachability),
  `--watch [SECONDS]` refreshes until Ctrl-C, which ends it with exit code 0.
- `demo` starts 3 nodes as separate processes on 127.0.0.1, lets them run a few rounds, then
  prints the lineage log with the eval loss of every version.

The daemon is imported inside the handlers, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from p2pmodel.errors import P2PModelError, UsageError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from p2pmodel.daemon.config import add_node_flags

    join = subparsers.add_parser("join", help="run a swarm node (found a swarm, or join one with --peers)")
    add_node_flags(join)
    join.set_defaults(func=cmd_join)

    status = subparsers.add_parser("status", help="show a running node's state")
    status.add_argument("--home", default="~/.p2pmodel/node", help="the node's home folder (finds its status URL)")
    status.add_argument("--url", default=None, help="status URL (default: read from HOME/node.json)")
    status.add_argument("--json", action="store_true", help="print the raw status JSON (with --swarm: its swarm section)")
    status.add_argument("--swarm", action="store_true",
                        help="every peer of the event this node heard of: name, device, samples/s, rounds, reachability")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (2 if not given) until Ctrl-C")
    status.set_defaults(func=cmd_status)

    demo = subparsers.add_parser("demo", help="run a local 3-node swarm for a few rounds and show the lineage")
    demo.add_argument("--nodes", type=int, default=3, help="number of nodes (separate processes)")
    demo.add_argument("--rounds", type=int, default=6, help="rounds each node takes part in before leaving")
    demo.add_argument("--dir", default=None, help="folder for the nodes' homes (default: a temporary folder)")
    demo.add_argument("--inner-steps", type=int, default=30, help="inner AdamW steps per round")
    demo.add_argument("--device", default="cpu", help="training device of every node: cpu, cuda or auto")
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds before the demo gives up")
    demo.add_argument("--liar", default="", metavar="LIE",
                      help="make the last node lie (lie_nan, lie_scale, lie_flip, lie_samples, lie_noise): watch the swarm screen it out")
    demo.set_defaults(func=cmd_demo)


def cmd_join(args: argparse.Namespace) -> int:
    import asyncio

    from p2pmodel.daemon.config import load_event, node_config_from_args
    from p2pmodel.daemon.logs import configure_logging
    from p2pmodel.daemon.node import Node

    # Bad flags (`--log-level verbose`, `--status-port 99999`, `--device cuda` without CUDA) and
    # a typo in the event (`codec.densty`, an unknown merge method) are one line naming the
    # flag or key, here, before the home is touched or any network starts.
    config = node_config_from_args(args)
    load_event(config.event)
    configure_logging(config.log_level)

    async def main() -> None:
        node = await Node.create(config)
        line = await node.join_line()
        # the lines a user must see even with logs redirected: stdout, flushed. The status URL
        # too, since its port is not always the default (another node may hold that one)
        assert node.status_server is not None
        print(f"To join this swarm, run:\n  {line}", flush=True)
        print(f"Status: {node.status_server.url} (or: p2pmodel status --home {config.home})", flush=True)
        await node.run()

    try:
        import uvloop
    except ImportError:  # uvloop is optional off Linux/macOS
        uvloop = None
    # outside the try: an ImportError inside the node is a bug to report, not a reason to run it twice
    (uvloop.run if uvloop is not None else asyncio.run)(main())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from p2pmodel.daemon.status import fetch_status, format_status, format_swarm, status_url_from_home

    if args.watch is not None and not (0 < args.watch < float("inf")):
        raise UsageError(f"--watch takes a positive number of seconds, not {args.watch}")
    url = args.url or status_url_from_home(args.home)

    def render(state: dict) -> str:
        if args.json:
            shown = state.get("swarm") if args.swarm else state
            # watching: one JSON object per line, so a pipe can read each refresh as it comes
            return json.dumps(shown, sort_keys=True) if args.watch else json.dumps(shown, indent=2, sort_keys=True)
        return format_swarm(state) if args.swarm else format_status(state)

    if args.watch is None:
        print(render(fetch_status(url)))
        return 0
    tty = sys.stdout.isatty() and not args.json
    return _watch(lambda: render(fetch_status(url)), args.watch, clear=tty, stamp=not tty and not args.json)


def _watch(read: Callable[[], str], every: float, clear: bool, stamp: bool) -> int:
    """Print `read()` every `every` seconds until Ctrl-C (exit 0). `clear`: each refresh replaces
    the last (a terminal); `stamp`: each starts with a time line (a pipe or a file). A node that
    stops answering after the first read is reported and read again; one that never answered is
    an error."""
    from p2pmodel.daemon.status import StatusUnavailable

    first = True
    try:
        while True:
            try:
                text = read()
            except StatusUnavailable as e:
                if first:
                    raise
                text = f"{e}\n(retrying every {every:g} s; Ctrl-C to stop)"
            if clear:
                text = "\x1b[H\x1b[2J" + text  # cursor home, clear screen
            elif stamp:
                text = f"--- {time.strftime('%H:%M:%S')}\n{text}"
            print(text, flush=True)
            first = False
            time.sleep(every)
    except KeyboardInterrupt:
        return 0


class DemoError(P2PModelError):
    """The demo swarm did not finish. Field: `reason`."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"demo failed: {reason}")


def _demo_event(inner_steps: int, nodes: int, rounds: int) -> dict:
    # Short windows sized for a loaded 2-core machine: a round is ~training + collect window.
    # A planned event: the inner lr decays over the demo's rounds (see EventConfig.lr_schedule).
    return {
        "name": "demo",
        "inner_steps": inner_steps,
        "lr_decay_steps": rounds * inner_steps if rounds > 0 else 0,
        "collect_window": 25.0,
        "proposal_timeout": 8.0,
        "min_members": nodes,  # every round waits for all demo nodes (up to the collect window)
        "round_deadline": 150.0,
        "task_options": {"train_bytes": 300_000, "eval_batches": 4},
    }


def cmd_demo(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise UsageError("--nodes must be at least 1")
    if args.liar:
        from p2pmodel.daemon.faults import Lie

        if args.liar not in {lie.value for lie in Lie} or args.nodes < 2:
            raise UsageError(f"--liar takes one of {[lie.value for lie in Lie]}, with --nodes 2 or more")
    root = Path(args.dir or tempfile.mkdtemp(prefix="p2pmodel-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    event_path = root / "event.json"
    event_path.write_text(json.dumps(_demo_event(args.inner_steps, args.nodes, args.rounds), indent=2))
    exe = [sys.executable, "-c", "import sys; from p2pmodel.cli import main; sys.exit(main())"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cpu = max(1, (os.cpu_count() or 2) // args.nodes)
    # only the founder reads the file; the others get the event from it by hash (the join line)
    common = ["--status-port", "0", "--device", args.device, "--cpu-threads", str(cpu)]
    common += ["--max-rounds", str(args.rounds)]
    procs: list[subprocess.Popen] = []
    logs = []
    deadline = time.monotonic() + args.timeout
    try:
        first_log = open(root / "node0.log", "w")
        logs.append(first_log)
        procs.append(subprocess.Popen([*exe, "join", "--home", str(root / "node0"), "--event", str(event_path), *common], stdout=subprocess.PIPE, stderr=first_log, env=env, text=True))
        join = _read_join_line(procs[0], deadline)
        print(f"node0 founded the swarm; the others run:\n  {join}", flush=True)
        extra = join.split("p2pmodel join", 1)[1].split()
        for i in range(1, args.nodes):
            log = open(root / f"node{i}.log", "w")
            logs.append(log)
            lie = ["--fault", args.liar] if args.liar and i == args.nodes - 1 else []
            procs.append(subprocess.Popen([*exe, "join", "--home", str(root / f"node{i}"), *extra, *common, *lie], stdout=subprocess.DEVNULL, stderr=log, env=env, text=True))
        _follow(procs, root, deadline)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    _print_lineage(root / "node0" / "lineage")
    print(f"\nlogs and homes: {root}")
    return 0


def _read_join_line(proc: subprocess.Popen, deadline: float) -> str:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise DemoError(f"the first node exited (code {proc.wait()}) before printing its join line")
        if line.strip().startswith("p2pmodel join"):
            return line.strip()
    raise DemoError("the first node did not start in time")


def _follow(procs: list[subprocess.Popen], root: Path, deadline: float) -> None:
    """Print committed rounds as node0 logs them; return when every node has left."""
    seen = 0
    running = True
    while running:
        # poll before reading: the read after the last node left prints the rounds it logged on its way out
        running = any(p.poll() is None for p in procs)
        if running and time.monotonic() > deadline:
            raise DemoError("timed out; see the node logs")
        text = (root / "node0.log").read_text()
        lines = text[: text.rfind("\n") + 1].splitlines()  # whole lines only: a half-written one is read next time
        for line in lines[seen:]:
            if " committed " in line:
                print(_round_line(dict(re.findall(r"(\w+)=(\S+)", line))), flush=True)
        seen = len(lines)
        if running:
            time.sleep(1.0)
    bad = [i for i, p in enumerate(procs) if p.returncode not in (0, -signal.SIGTERM)]
    if bad:
        raise DemoError(f"node(s) {bad} exited with an error; see {root}/node*.log")
    print(_summary(root, len(procs)), flush=True)


def _summary(root: Path, nodes: int) -> str:
    """Over every node and committed round: share of wall time spent training, samples merged."""
    train, total = [0.0, 0.0], [0.0, 0.0]  # all rounds; rounds after each node's first (all peers up)
    trained = merged = 0.0
    for i in range(nodes):
        rounds = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in (root / f"node{i}.log").read_text().splitlines() if " committed " in line]
        for j, kv in enumerate(rounds):
            for k in (0, 1) if j else (0,):
                train[k] += float(kv.get("training_s", 0))
                total[k] += float(kv.get("total_s", 0))
            if i == 0:
                trained += float(kv.get("samples_trained", 0))
                merged += float(kv.get("samples_merged", 0))
    share = [f"{100 * a / b:.0f}%" if b else "-" for a, b in zip(train, total)]
    return (f"\ntraining share of wall time (all nodes): {share[0]} over every committed round, {share[1]} after the "
            f"first (once every peer is up); samples merged / announced: {merged:.0f} / {trained:.0f}")  # fmt: skip


def _round_line(kv: dict[str, str]) -> str:
    """One committed round of node0's log, with where its time and bytes went."""
    text = f"round {kv.get('round')} committed: version {kv.get('version')}, {kv.get('contributors')} contributors, eval loss {kv.get('eval_loss')}"
    if "samples_merged" in kv:
        text += f", {kv['samples_merged']}/{kv.get('samples_trained', '?')} samples merged"
    if "total_s" in kv:
        parts = [f"{name} {float(kv.get(key, 0)):.1f}s" for name, key in
                 (("train", "training_s"), ("comm", "communication_s"), ("merge", "merge_s"), ("wait", "waiting_s"))]  # fmt: skip
        text += f"  [{', '.join(parts)} of {float(kv['total_s']):.1f}s; sent {int(kv.get('bytes_sent', 0)) / 1e3:.0f} kB]"
    return text


def _print_lineage(path: Path) -> None:
    from p2pmodel.lineage import LineageStore

    with LineageStore.open(path) as store:
        print("\nlineage of node0 (newest first):")
        for info in store.log_info("main"):
            loss = (info.metrics or {}).get("eval_loss") if hasattr(info, "metrics") else None
            loss = loss if loss is not None else (store.annotations(info.id).metrics or {}).get("eval_loss")
            loss_text = f"{loss:.4f}" if isinstance(loss, float) else "  -   "
            print(f"  {info.id[:12]}  round {str(info.round):>4}  eval_loss {loss_text}  {info.message}")
