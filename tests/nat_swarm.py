"""Driver: a swarm whose volunteers sit behind separate NAT routers (tests/nat_lab.py), until
every peer has committed `rounds` rounds after all had joined; then the founder's lineage says
who was credited in each round.

    python tests/nat_swarm.py OUT_DIR [--homes 2] [--publics 1] [--rounds 3] [--home-reachability auto]

Needs root. Writes OUT_DIR/result.json (and one log per node). The founder runs on pub1 with a
public address; every other node joins with the founder's join line (all its addresses, as a
volunteer pastes it). `--home-reachability local` starts the homes without relays (hivemind's
defaults), for comparison with the relayed run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pytest  # noqa: E402  (wait_for fails through pytest.fail)
from nat_lab import NatLab  # noqa: E402
from swarm_nodes import SwarmNode, wait_for  # noqa: E402

from p2pmodel.daemon.identity import save_identity  # noqa: E402
from p2pmodel.daemon.status import StatusUnavailable, fetch_status  # noqa: E402
from p2pmodel.lineage import LineageStore  # noqa: E402
from p2pmodel.protocols.signing import PeerIdentity  # noqa: E402

EVENT = {
    "name": "nat",
    "inner_steps": 8,
    "collect_window": 10.0,
    "proposal_timeout": 4.0,
    "round_deadline": 45.0,
    "task_options": {"train_bytes": 200_000, "eval_batches": 2},
}


class LabNode(SwarmNode):
    """A SwarmNode running inside one of the lab's namespaces, listening on its lab address only."""

    def __init__(self, lab: NatLab, host: str, root: Path, event: Path, peers: list[str], seeder: str, reachability: str):
        super().__init__(host, root, event, peers, seeder, log_stdout=True)
        self.lab, self.host = lab, host
        self.args = ["ip", "netns", "exec", lab.ns(host), *self.args, "--host-maddrs", f"/ip4/{lab.address(host)}/tcp/0"]
        if reachability:
            self.args += ["--reachability", reachability]
        if not peers:
            self.args.remove("--peers")

    def status(self) -> dict | None:
        try:
            url = json.loads((self.home / "node.json").read_text())["status_url"]
            return self.lab.call_in(self.host, lambda: fetch_status(url, timeout=5))
        except (OSError, ValueError, KeyError, StatusUnavailable):
            return None


def run(out: Path, *, homes: int = 2, publics: int = 1, rounds: int = 3, home_reachability: str = "", timeout: float = 600) -> dict:
    """The scenario; returns what result.json holds (`ok`, per-round credits, per-node reachability)."""
    out.mkdir(parents=True, exist_ok=True)
    event = out / "event.json"
    event.write_text(json.dumps({**EVENT, "min_members": homes + publics}))
    seeder = PeerIdentity.generate()
    (out / "pub1").mkdir(exist_ok=True)
    save_identity(seeder, out / "pub1" / "identity.pem")
    lab = NatLab.build(homes=homes, publics=publics)
    nodes: dict[str, LabNode] = {}
    result: dict = {"ok": False, "homes": homes, "publics": publics, "home_reachability": home_reachability or "auto"}
    t0 = time.monotonic()
    try:
        nodes["pub1"] = LabNode(lab, "pub1", out, event, [], seeder.peer_id, "")
        nodes["pub1"].start()
        addrs = wait_for(lambda: _join_addrs(nodes["pub1"].log), 180, "the founder's join line")
        for host in [*lab.publics[1:], *lab.homes]:
            nodes[host] = LabNode(lab, host, out, event, addrs, seeder.peer_id, home_reachability if host.startswith("home") else "")
            nodes[host].start()
        joined = wait_for(lambda: _all_in_a_round(nodes), 240, "every node to be in a round", interval=2.0)
        result["joined_s"] = round(time.monotonic() - t0, 1)
        target = max(joined) + rounds

        def committed() -> bool:
            return all((n.head()[1] or -1) >= target for n in nodes.values())

        wait_for(committed, timeout, f"every node to commit round {target}", interval=2.0)
        result["rounds_s"] = round(time.monotonic() - t0 - result["joined_s"], 1)
        result["all_joined_round"], result["last_round"] = max(joined), target  # rounds after the first are measured
        result["nodes"] = {name: _summary(n.status() or {}) for name, n in nodes.items()}
        result["ok"] = True
    except pytest.fail.Exception as e:  # a wait timed out: keep what the nodes say, for the report
        result["error"] = str(e)
        result["nodes"] = {name: _summary(n.status() or {}) for name, n in nodes.items()}
    finally:
        for n in nodes.values():
            n.stop(timeout=30)
        lab.teardown()
        peer_of = {name: _peer_id(out / name) for name in nodes}
        result["peer_ids"] = peer_of
        result["versions"] = _credits(out / "pub1" / "lineage", {v: k for k, v in peer_of.items()})
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _join_addrs(log: Path) -> list[str]:
    m = re.search(r"p2pmodel join --peers (.+?) --event-id", log.read_text())
    return m.group(1).split() if m else []


def _all_in_a_round(nodes: dict[str, LabNode]) -> list[int] | None:
    rounds = [(n.status() or {}).get("round") for n in nodes.values()]
    return [r for r in rounds] if all(isinstance(r, int) for r in rounds) else None


def _summary(status: dict) -> dict:
    reach = status.get("reachability") or {}
    counters = status.get("round_counters") or {}
    return {
        "mode": reach.get("mode"),
        "addresses": reach.get("addresses"),
        "relayed_by": reach.get("relayed_by"),
        "connections": reach.get("connections"),
        "head_round": (status.get("head") or {}).get("round"),
        "rounds_failed": counters.get("rounds_failed", 0),
        "errors": [e.get("message", "")[:160] for e in (status.get("errors") or [])][-5:],
    }


def _peer_id(home: Path) -> str | None:
    try:
        return json.loads((home / "node.json").read_text())["peer_id"]
    except (OSError, ValueError, KeyError):
        return None


def _credits(lineage: Path, name_of: dict[str, str]) -> list[dict]:
    """Each round version on the founder's main branch: its round, members and contributors (by node name)."""
    if not lineage.exists():
        return []
    store = LineageStore.open(lineage)
    try:
        versions = [v for v in store.log("main", limit=200) if v.round is not None]
        return [
            {
                "round": v.round,
                "members": sorted(name_of.get(p, p[:12]) for p in (v.merge or {}).get("members", ())),
                "contributors": sorted(name_of.get(p, p[:12]) for p in v.contributors),
            }
            for v in sorted(versions, key=lambda v: v.round)
        ]
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--homes", type=int, default=2)
    parser.add_argument("--publics", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--home-reachability", default="")
    args = parser.parse_args()
    result = run(args.out, homes=args.homes, publics=args.publics, rounds=args.rounds, home_reachability=args.home_reachability)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
