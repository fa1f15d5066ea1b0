"""Driver for tests/test_partition.py: a 3|2 partition of five real nodes, then the link returns.

Runs inside a private network namespace (`unshare -n`, started by the test), so its iptables
rules touch nothing else. Every node listens on 127.0.0.1; the groups are told apart by the
Unix user their processes run as (group A uid 1001, group B uid 1002): connections are marked
with the group that opened them, and a packet a group sends on a connection the other group
opened is dropped. So no packet crosses between the groups while the rules stand, in either
direction, whatever ports the p2pd daemons use.

    unshare -n python tests/partition_swarm.py OUT_DIR   # writes OUT_DIR/result.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pytest  # noqa: E402
from swarm_nodes import SwarmNode, wait_for  # noqa: E402

from p2pmodel.daemon.identity import save_identity  # noqa: E402
from p2pmodel.protocols.signing import PeerIdentity  # noqa: E402

EVENT = {
    "name": "partition",
    "inner_steps": 8,
    "collect_window": 8.0,
    "proposal_timeout": 3.0,
    "round_deadline": 30.0,  # a split round fails this long after it began
    "task_options": {"train_bytes": 200_000, "eval_batches": 2},
}
UIDS = {"A": 1001, "B": 1002}
GROUPS = {"n0": "A", "n1": "A", "n2": "A", "n3": "B", "n4": "B"}


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def partition(on: bool) -> None:
    op = "-A" if on else "-D"
    for group, uid in UIDS.items():
        other = 2 if group == "A" else 1
        sh("iptables", op, "OUTPUT", "-m", "owner", "--uid-owner", str(uid), "-m", "connmark", "--mark", str(other), "-j", "DROP")


class GroupNode(SwarmNode):
    """A SwarmNode whose process runs as its group's user."""

    def __init__(self, name: str, root: Path, event: Path, peers: list[str], seeder: str, uid: int):
        super().__init__(name, root, event, peers, seeder, log_stdout=True)  # the founder's join line
        self.args = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *self.args]
        self.home.mkdir(parents=True, exist_ok=True)
        os.chown(self.home, uid, uid)


def main(out: Path) -> int:
    sh("ip", "link", "set", "lo", "up")
    for group, uid in UIDS.items():  # every new connection carries the group that opened it
        mark = 1 if group == "A" else 2
        sh("iptables", "-t", "mangle", "-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW",
           "-m", "owner", "--uid-owner", str(uid), "-j", "CONNMARK", "--set-mark", str(mark))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o777)
    event = out / "event.json"
    event.write_text(json.dumps({**EVENT, "min_members": len(GROUPS)}))
    seeder = PeerIdentity.generate()
    n0_home = out / "n0"
    n0_home.mkdir(exist_ok=True)
    save_identity(seeder, n0_home / "identity.pem")
    os.chown(n0_home / "identity.pem", UIDS["A"], UIDS["A"])
    nodes: dict[str, GroupNode] = {}
    result: dict = {"ok": False}
    try:
        nodes["n0"] = GroupNode("n0", out, event, [], seeder.peer_id, UIDS["A"])
        nodes["n0"].args.remove("--peers")
        nodes["n0"].start()
        wait_for(nodes["n0"].status, 120, "n0 to start")
        addrs = wait_for(lambda: _addrs_from_log(nodes["n0"].log), 30, "n0's join line")
        for name in ("n1", "n2", "n3", "n4"):
            nodes[name] = GroupNode(name, out, event, addrs, seeder.peer_id, UIDS[GROUPS[name]])
            nodes[name].start()
        wait_for(lambda: all((n.head()[1] or -1) >= 0 for n in nodes.values()), 300, "round 0 to commit on all five")
        split_round = max(n.head()[1] for n in nodes.values())
        partition(True)
        t_split = time.monotonic()
        # While split, neither side holds 4 of 5 signatures: nothing commits. Keep it split until
        # each side has seen a round fail (the rule, not a fixed wait, decides).
        wait_for(lambda: all(_failed(n) for n in nodes.values()), 240, "a failed round on every node while split")
        result["committed_while_split"] = max(n.head()[1] for n in nodes.values()) > split_round + 1
        result["split_s"] = time.monotonic() - t_split
        partition(False)
        t_heal = time.monotonic()

        def one_head():
            heads = {name: n.head() for name, n in nodes.items()}
            ids = {h[0] for h in heads.values()}
            rounds = {h[1] for h in heads.values()}
            return heads if len(ids) == 1 and None not in rounds and min(rounds) > split_round + 1 else None

        result["heads"] = wait_for(one_head, 300, "one head on all five after the link returned", interval=2.0)
        result["heal_s"] = time.monotonic() - t_heal
        result["ok"] = True
    except pytest.fail.Exception as e:  # wait_for timed out
        result["error"] = str(e)
        result["heads_at_error"] = {name: n.head() for name, n in nodes.items()}
    finally:
        for n in nodes.values():
            n.stop(timeout=30)
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def _failed(node: SwarmNode) -> bool:
    s = node.status() or {}
    return (s.get("round_counters") or {}).get("rounds_failed", 0) >= 1


def _addrs_from_log(log: Path) -> list[str]:
    import re

    m = re.search(r"p2pmodel join --peers (.+?) --event-id", log.read_text())
    return m.group(1).split() if m else []


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
