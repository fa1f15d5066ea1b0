"""The README's walkthrough, run as a new user would, with the real `p2pmodel` command.

    researcher$ p2pmodel seed --task charlm --name my-event ... -o my-event/
    researcher$ p2pmodel join --home my-event/founder --event my-event/event.toml   # seed printed it
    volunteer$  p2pmodel join --peers ... --event-id ...                            # the pasted line
    volunteer$  p2pmodel status
    volunteer$  p2pmodel log --graph --repo ~/.p2pmodel/node/lineage
    volunteer$  p2pmodel dashboard --no-open

Every command is a subprocess in its own working folder; HOME is a temporary folder, so the
volunteer's node lives where a new user's would (`~/.p2pmodel/node`), and the volunteer has
nothing but the line the founder printed. Only `--status-port 0` and one CPU thread are added
(this machine runs other tests), and the event is tiny (short rounds).

Guarantees checked: each command succeeds and prints what the README says; the volunteer's
node commits the same versions as the founder's, with both as contributors; Ctrl-C (SIGINT)
ends both nodes with exit code 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from swarm_nodes import wait_for

from p2pmodel.daemon.status import StatusUnavailable, fetch_status
from p2pmodel.lineage import LineageStore

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(400)]

EXE = Path(sys.executable).with_name("p2pmodel")
P2PMODEL = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "p2pmodel.cli"]
TINY = [  # a tiny model and short rounds; the README shows only --set inner_steps=20
    "inner_steps=5", "collect_window=10", "proposal_timeout=5", "round_deadline=30", "min_members=2",
    "task_options.n_layer=1", "task_options.n_embd=32", "task_options.n_head=2", "task_options.context=16",
    "task_options.train_bytes=20000", "task_options.eval_batches=1",
]  # fmt: skip
TEST_FLAGS = ["--status-port", "0", "--cpu-threads", "1"]


def _run(cwd: Path, env: dict, *args: str) -> str:
    proc = subprocess.run([*P2PMODEL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"p2pmodel {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def _line_after(log: Path, prefix: str) -> str | None:
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.strip().startswith(prefix):
            return line.strip()
    return None


def _status(home: Path) -> dict | None:
    try:
        return fetch_status(json.loads((home / "node.json").read_text())["status_url"], timeout=5)
    except (OSError, ValueError, KeyError, StatusUnavailable):
        return None


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    researcher, volunteer, home = root / "researcher", root / "volunteer", root / "home"
    for d in (researcher, volunteer, home):
        d.mkdir()
    env = dict(os.environ, HOME=str(home), PYTHONUNBUFFERED="1")
    out: dict = {"root": root, "volunteer": volunteer, "node": home / ".p2pmodel" / "node"}
    out["seed"] = _run(researcher, env, "seed", "--task", "charlm", "--name", "my-event", *(a for s in TINY for a in ("--set", s)), "-o", "my-event/")
    founder_cmd = out["seed"].strip().splitlines()[-1].split()  # the line seed printed last
    assert founder_cmd[0] == "p2pmodel"
    procs: list[subprocess.Popen] = []
    try:
        with open(root / "founder.log", "w") as log:
            procs.append(subprocess.Popen([*P2PMODEL, *founder_cmd[1:], *TEST_FLAGS], cwd=researcher, env=env, stdout=log, stderr=log))
        out["join_line"] = wait_for(lambda: _line_after(root / "founder.log", "p2pmodel join --peers"), 120, "the founder's join line")
        with open(root / "volunteer.log", "w") as log:  # the pasted line, as is
            procs.append(subprocess.Popen([*P2PMODEL, *out["join_line"].split()[1:], *TEST_FLAGS], cwd=volunteer, env=env, stdout=log, stderr=log))
        founder_home = researcher / "my-event" / "founder"

        def committed_together():
            heads = [(_status(h) or {}).get("head") or {} for h in (founder_home, out["node"])]
            return heads if all((h.get("round") or -1) >= 2 for h in heads) else None

        out["heads"] = wait_for(committed_together, 240, "rounds committed by both nodes")
        out["status"] = _run(volunteer, env, "status")
        out["log"] = _run(volunteer, env, "log", "--graph", "--repo", "~/.p2pmodel/node/lineage".replace("~", str(home)))
        out["dashboard"] = _run(volunteer, env, "dashboard", "--no-open")
        with urllib.request.urlopen(out["dashboard"].strip(), timeout=10) as page:
            out["page"] = (page.status, page.read().decode())
        for p in procs:  # Ctrl-C in each terminal
            p.send_signal(signal.SIGINT)
        out["codes"] = [p.wait(timeout=60) for p in procs]
        out["founder_home"] = founder_home
        yield out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_seed_prints_the_line_that_starts_the_founder(walk):
    last = walk["seed"].strip().splitlines()[-1].strip()
    event = walk["root"].resolve() / "researcher" / "my-event"
    assert last == f"p2pmodel join --home {event / 'founder'} --event {event / 'event.toml'}"  # from any folder


def test_the_founder_prints_a_line_of_addresses_and_the_event_id(walk):
    words = walk["join_line"].split()
    assert words[:3] == ["p2pmodel", "join", "--peers"] and words[-2] == "--event-id"
    assert all(w.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/" in w for w in words[3:-2])


def test_the_volunteer_needed_nothing_but_the_pasted_line(walk):
    assert list(walk["volunteer"].iterdir()) == []  # no event file, no model, nothing written there
    event_id = walk["join_line"].split()[-1]
    stored = (walk["node"] / "event.json").read_text()
    from p2pmodel.daemon.config import event_from_mapping

    assert event_from_mapping(json.loads(stored)).event_hash() == event_id


def test_both_nodes_commit_the_same_versions_with_both_as_contributors(walk):
    chains = []
    for home in (walk["founder_home"], walk["node"]):
        with LineageStore.open(home / "lineage") as store:
            chains.append(store.log("main"))
    ids = sorted([[v.id for v in c] for c in chains], key=len)
    assert ids[0] == ids[1][len(ids[1]) - len(ids[0]) :] and len(ids[1]) - len(ids[0]) <= 1
    assert any(len(v.contributors) == 2 for v in chains[1])


def test_status_shows_the_volunteers_node_on_a_head_the_swarm_committed(walk):
    assert "event    my-event" in walk["status"]
    head, round_ = re.search(r"^head     ([0-9a-f]{16})  round (\d+)", walk["status"], re.M).groups()
    with LineageStore.open(walk["founder_home"] / "lineage") as store:
        assert store.get_version(head).round == int(round_) >= 2


def test_log_graph_shows_the_rounds_with_their_contributors_and_ci(walk):
    rounds = [line for line in walk["log"].splitlines() if "round=" in line]
    assert len(rounds) >= 3 and "contributors=2" in walk["log"] and "ci=passed" in walk["log"]
    assert "seed of event my-event" in walk["log"].strip().splitlines()[-1]


def test_dashboard_prints_the_url_the_node_serves(walk):
    url = walk["dashboard"].strip()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/dashboard/")
    status, html = walk["page"]
    assert status == 200 and "<html" in html.lower()


def test_ctrl_c_leaves_both_nodes_with_exit_code_0(walk):
    assert walk["codes"] == [0, 0]
