"""`p2pmodel credits`: the contributor leaderboard of a lineage.

Reads a repository (`--repo`, found as every command finds it) or a node's lineage (`--home`:
`HOME/lineage`; safe while the node runs) and prints, per peer, the samples it trained and had
merged, its deltas accepted, screened out by the merge and excluded by the proposer, and the
versions it proposed. The board is `p2pmodel.credits.leaderboard` over HEAD's branch, with what
the node saw each peer announce (display names, samples): the dashboard's `/api/credits` is the
same computation, and `--json` prints the same object it serves:

    {"branch", "versions": n, "truncated": bool, "limit": n|null,
     "peers": [{"peer", "name", "samples_trained", "samples_merged", "deltas_accepted",
                "deltas_screened", "deltas_excluded", "deltas_rejected", "versions_proposed",
                "last_round"}]}

A display name is what the peer chose for itself; names are not unique, so the peer id is
always shown beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from p2pmodel.errors import UsageError

__all__ = ["register", "format_credits"]

_PEER_CHARS = 12  # hex digits of a peer id shown (as ids elsewhere in the CLI)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "credits",
        help="the contributor leaderboard: samples trained and merged, deltas accepted and rejected, per peer",
    )
    p.add_argument("--home", default=None, help="a node's home folder: read its lineage (HOME/lineage) instead of --repo")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="count only the newest N versions of the branch (default: all)")
    p.add_argument("--json", action="store_true", help="print the leaderboard as JSON (the dashboard's /api/credits)")
    p.set_defaults(func=cmd_credits)


def cmd_credits(args: argparse.Namespace) -> int:
    from p2pmodel.daemon.lineage_api import LineageApi
    from p2pmodel.lineage import LineageStore

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, not {args.limit}")
    path = Path(args.home).expanduser() / "lineage" if args.home else Path(args.repo)
    with LineageStore.open(path) as store:  # RepositoryNotFound names the path: one line, exit 1
        board = LineageApi(store).credits(args.limit)
    print(json.dumps(board, indent=2, sort_keys=True) if args.json else format_credits(board))
    return 0


def _samples(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    return f"{x:,.0f}" if float(x).is_integer() or abs(x) >= 100 else f"{x:,.1f}"


def format_credits(board: dict[str, Any]) -> str:
    """The leaderboard as aligned columns, best first (the `--json` object is its input)."""
    peers = board.get("peers") or []
    scope = f"the newest {board.get('versions', 0)} versions" if board.get("truncated") else f"{board.get('versions', 0)} versions"
    lines = [f"credits over {scope} of {board.get('branch') or '?'}"]
    if not peers:
        lines.append("  no contributions yet (only swarm rounds credit peers)")
        return "\n".join(lines)
    header = ("peer", "name", "trained", "merged", "accepted", "screened", "excluded", "proposed", "last round")
    rows = [
        (str(p.get("peer", ""))[:_PEER_CHARS], p.get("name") or "-", _samples(p.get("samples_trained")),
         _samples(p.get("samples_merged")), str(p.get("deltas_accepted", 0)), str(p.get("deltas_screened", 0)),
         str(p.get("deltas_excluded", 0)), str(p.get("versions_proposed", 0)),
         "-" if p.get("last_round") is None else str(p["last_round"]))
        for p in peers
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        # text columns flush left, counts flush right
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    lines.append("samples trained: announced for committed rounds (the merged weight where this node did not see "
                 "the announcement); names are chosen by each peer")
    return "\n".join(lines)
