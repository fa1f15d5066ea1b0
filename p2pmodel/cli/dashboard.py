"""`p2pmodel dashboard`: open a running node's web dashboard.

The node serves the dashboard itself (daemon/status.py, on 127.0.0.1); this command only finds
its URL (from `HOME/node.json`, as `p2pmodel status` does, or `--url`), checks that the node
answers, prints the URL and opens a browser unless `--no-open`.
"""

from __future__ import annotations

import argparse
import webbrowser

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dashboard", help="open a running node's web dashboard (served on 127.0.0.1)")
    p.add_argument("--home", default="~/.p2pmodel/node", help="the node's home folder (finds its status URL)")
    p.add_argument("--url", default=None, help="the node's status URL (default: read from HOME/node.json)")
    p.add_argument("--no-open", action="store_true", help="print the URL only; do not start a browser")
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from p2pmodel.daemon.status import dashboard_url, fetch_status, status_url_from_home

    status_url = args.url or status_url_from_home(args.home)
    fetch_status(status_url)  # StatusUnavailable (one line, exit 1) when no node answers there
    url = dashboard_url(status_url)
    print(url)
    if not args.no_open:
        webbrowser.open(url)
    return 0
