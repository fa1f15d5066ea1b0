"""Watching a running swarm: the dashboard in a real headless Chromium, `status --swarm` and
`credits`, all against one local swarm of three `p2pmodel join` processes on 127.0.0.1.

Scenario (once per module): a stock `hivemind-dht`, then nodes n0 ("alice"), n1 ("bob's box")
and n2 (no name) with tiny rounds; Debian's `chromium`, driven by Playwright, opens n0's
dashboard once and every browser check below reads that same page, in order.

Guarantees: the page loads and runs with no console error or uncaught exception; it shows all
three peers (with the names they chose) and at least two committed versions; a version committed
after the page loaded appears without a reload; clicking a version shows its details (merge
spec, contributors, CI votes, diff to its parent); a screenshot lands in the test's tmp_path.
`status --swarm` lists every peer with its name, device, rounds, delivery rate, reachability
and our dial; `--watch` refreshes until SIGINT and exits 0; `credits` names the peers that chose
a name and credits each with samples trained and merged.

Chromium and Playwright come from `scripts/setup` (apt-get and the `test` extra); the browser
checks are skipped, saying why, only where they could not be installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from swarm_nodes import SwarmNode, seeded_swarm, stop_stock_dht, wait_for

from p2pmodel.cli import main as cli_main

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(240)]

# Rounds close as soon as all three delivered (min_members), so they take about a second here:
# commits keep coming while the page is open. CI thresholds are loose: two steps of a tiny
# model are noisy, and a refused version would only slow the checks down.
EVENT = {
    "name": "watchtest",
    "inner_steps": 2,
    "collect_window": 10.0,
    "proposal_timeout": 4.0,
    "round_deadline": 40.0,
    "min_members": 3,
    "train_ahead": False,
    "ci_max_regression": 1.0,
    "ci_max_regression_best": 1.0,
    "task_options": {"train_bytes": 50_000, "eval_batches": 1},
}
NAMES = {"n0": "alice", "n1": "bob's box"}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
POLL_S = 3.0  # the page's status poll (app.js POLL_MS)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    event, stock, addrs, seeder = seeded_swarm(root, EVENT)
    nodes = {n: SwarmNode(n, root, event, addrs, seeder) for n in ("n0", "n1", "n2")}
    for n, name in NAMES.items():
        nodes[n].args += ["--name", name]
    try:
        for node in nodes.values():
            node.start()
        # two committed rounds (versions besides the seed) on n0, and n0 has heard of everyone
        wait_for(lambda: (nodes["n0"].head()[1] or -1) >= 1, 120, "two rounds to commit", interval=0.3)
        ids = {n: wait_for(node.status, 30, f"{n}'s status", interval=0.3)["peer_id"] for n, node in nodes.items()}
        yield {"root": root, "nodes": nodes, "ids": ids}
    finally:
        for node in nodes.values():  # all at once, then wait for each
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in nodes.values():
            node.stop(timeout=20, signal_it=False)
        stop_stock_dht(stock)


# ------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def page(swarm, tmp_path_factory):
    """n0's dashboard in headless Chromium; `page.errors` collects console errors, uncaught
    exceptions and answers of 400 or more."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: scripts/setup installs it (apt-get install chromium) where it can")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("python playwright is not installed: scripts/setup installs it (pyproject's test extra)")
    from p2pmodel.daemon.status import dashboard_url, status_url_from_home

    dashboard = dashboard_url(status_url_from_home(swarm["nodes"]["n0"].home))
    with sync_playwright() as pw:
        # Debian's chromium, not a downloaded one; --no-sandbox: tests run as root
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            p = browser.new_page(viewport={"width": 1500, "height": 1400})
            errors: list[str] = []
            p.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text}"))
            p.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            p.on("response", lambda r: r.status >= 400 and errors.append(f"HTTP {r.status}: {r.url}"))  # names what failed
            p.errors = errors
            p.goto(dashboard, wait_until="load")
            p.evaluate("window.__loaded_once = true")  # gone if the page ever reloads
            yield p
        finally:
            browser.close()


def _versions(page) -> list[str]:
    """Ids of the committed round versions the lineage shows, newest first."""
    return page.eval_on_selector_all(
        "#lineage .row", "rows => rows.filter(r => /^r\\d+$/.test(r.querySelector('.badge')?.textContent || '')).map(r => r.dataset.id)"
    )


def test_the_dashboard_loads_without_console_errors(page):
    page.wait_for_selector("#live.ok", timeout=30_000)  # the first status poll answered
    page.wait_for_selector("#lineage .row", timeout=30_000)
    assert page.errors == []


def test_the_dashboard_shows_every_peer_with_its_name(page, swarm):
    def shown() -> str | None:
        text = page.inner_text("#peers")
        ok = all(pid[:10] in text for pid in swarm["ids"].values()) and all(n in text for n in NAMES.values())
        return text if ok else None

    text = wait_for(shown, 3 * POLL_S + 10, "the peers table to list all three nodes", interval=0.5)
    assert "(this node)" in text and page.inner_text("#peers-note").startswith("3 known")


def test_the_dashboard_shows_at_least_two_committed_versions(page):
    versions = wait_for(lambda: len(_versions(page)) >= 2 and _versions(page), 3 * POLL_S + 10, "two versions in the lineage", interval=0.5)
    assert len(set(versions)) == len(versions) >= 2


def test_a_new_commit_appears_without_a_reload(page):
    before = set(_versions(page))
    newer = wait_for(lambda: set(_versions(page)) - before, 60, "a version committed after the page loaded", interval=0.5)
    assert newer and page.evaluate("window.__loaded_once === true")


def test_clicking_a_version_shows_its_details(page):
    vid = _versions(page)[1]  # not the newest: the page selects that one by itself
    page.click(f'#lineage .row[data-id="{vid}"]')
    page.wait_for_function(
        "id => document.querySelector('#details code')?.textContent === id && document.querySelector('#details').textContent.includes('tensors changed')",
        arg=vid, timeout=20_000,
    )
    details = page.inner_text("#details")
    contributors = int(re.search(r"Contributors \((\d+)\)", details).group(1))
    assert contributors >= 2 and "CI votes" in details and "merge\tlinear" in details.replace("\n", "\t")
    tables = page.eval_on_selector_all("#details table", "ts => ts.map(t => t.querySelectorAll('tbody tr').length)")
    assert tables[0] == contributors and tables[1] >= 2  # a row per merged delta; a quorum of 2 of 3 votes
    assert page.get_attribute(f'#lineage .row[data-id="{vid}"]', "class").endswith("selected")


def test_a_screenshot_lands_in_the_tests_folder_and_nothing_went_wrong(page, tmp_path):
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert page.errors == []


def test_every_version_committed_here_keeps_a_quorum_of_votes(swarm):
    # What the version details' "CI votes" show. A node that cast the last vote and committed in
    # the same step used to store its certificate without its own vote: 1 vote of 3.
    from p2pmodel.lineage import LineageStore

    with LineageStore.open(swarm["nodes"]["n0"].home / "lineage") as store:
        counts = {v.round: len((store.annotations(v.id).certificate or {}).get("votes", ())) for v in store.log("main") if v.round is not None}
    assert len(counts) >= 2 and min(counts.values()) >= 2, counts


# ------------------------------------------------------------------------------ the command line


def test_status_swarm_lists_every_peer_with_name_rounds_rate_and_reachability(swarm, capsys):
    ids, home = swarm["ids"], swarm["nodes"]["n0"].home

    def table() -> str | None:
        # rates need a peer's deltas of two consecutive rounds, received here
        assert cli_main(["status", "--swarm", "--home", str(home)]) == 0
        out = capsys.readouterr().out
        rows = [line for line in out.splitlines() if line.strip()[:12] in {i[:12] for i in ids.values()}]
        return out if len(rows) == 3 and all(re.search(r"\d+\.\d", r) for r in rows) else None

    out = wait_for(table, 60, "three peers with a rate in status --swarm", interval=1)
    row = {n: next(line for line in out.splitlines() if line.strip().startswith(i[:12])) for n, i in ids.items()}
    assert "alice" in row["n0"] and "this node" in row["n0"] and "self" in row["n0"]
    assert "bob's box" in row["n1"] and " ok " in row["n1"] and " ok " in row["n2"]
    assert all("cpu" in r and "loopback" in r for r in row.values())
    assert "loopback: announces only 127.0.0.1" in out


def test_status_swarm_json_is_the_nodes_swarm_section(swarm, capsys):
    assert cli_main(["status", "--swarm", "--json", "--home", str(swarm["nodes"]["n1"].home)]) == 0
    section = json.loads(capsys.readouterr().out)
    rows = {p["peer_id"]: p for p in section["peers"]}
    assert set(rows) == set(swarm["ids"].values()) and section["known"] == 3
    alice = rows[swarm["ids"]["n0"]]
    assert (alice["name"], alice["device"], alice["reachability"], alice["self"]) == ("alice", "cpu", "loopback", False)
    assert alice["addrs"] and all(a.startswith("/ip4/127.0.0.1/") for a in alice["addrs"])
    assert alice["delta_round"] is not None and alice["merged_round"] is not None


def test_watch_refreshes_until_ctrl_c_and_exits_0(swarm):
    cmd = [sys.executable, "-c", "import sys; from p2pmodel.cli import main; sys.exit(main())",
           "status", "--swarm", "--watch", "0.3", "--home", str(swarm["nodes"]["n2"].home)]
    # Ctrl-C as a terminal sends it: SIGINT at its default action, even when this test runs in a
    # background job (a shell starts those with SIGINT ignored, and children inherit that).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        stamps = 0
        deadline = time.monotonic() + 60
        while stamps < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            stamps += line.startswith("--- ")  # one time line per refresh (stdout is a pipe)
        assert stamps == 3
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # a loaded machine tears torch down slowly
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_credits_of_a_running_node_name_the_peers_that_chose_a_name(swarm, capsys):
    ids = swarm["ids"]
    assert cli_main(["credits", "--home", str(swarm["nodes"]["n2"].home), "--json"]) == 0
    rows = {p["peer"]: p for p in json.loads(capsys.readouterr().out)["peers"]}
    assert {rows[ids[n]]["name"] for n in ids} == {"alice", "bob's box", None}
    for n in ids:
        assert rows[ids[n]]["samples_merged"] > 0 and rows[ids[n]]["samples_trained"] >= rows[ids[n]]["samples_merged"]
        assert rows[ids[n]]["deltas_accepted"] >= 2
