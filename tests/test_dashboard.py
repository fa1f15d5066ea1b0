"""The dashboard: its JSON API over the node's lineage, its page, and `p2pmodel dashboard`.

Guarantees: `/api/lineage` lists HEAD's branch newest first with, per version, its parents,
metrics, contributor count, CI votes and screened deltas, bounded by `limit` (1..500) and saying
when it cut; `/api/version/<id>` takes a full id or a unique hex prefix and returns the merge
spec, contributors, metrics, each CI vote opened and checked, and the screened deltas with their
reasons; `/api/diff/<id>` compares a version with its first parent; `/api/credits` is the
leaderboard of `p2pmodel.credits`, with the names and samples the node saw announced. Bad input (not hex, ambiguous, unknown, out-of-range or
non-integer limits, unknown routes, other methods, another Host) is a JSON error with a 4xx
code, never a traceback or a file read; a server without a lineage answers 503. The page and
its assets (uPlot vendored, no CDN) are served with their content types; anything else under
/dashboard/ is 404. The command prints the dashboard URL found from the node's home.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import pytest
import torch
from p2pmodel.daemon.status import StatusServer, dashboard_url, status_url_from_home
from p2pmodel.protocols.messages import Vote
from p2pmodel.protocols.signing import PeerIdentity, sign

from p2pmodel.cli import main as cli_main
from p2pmodel.errors import UsageError
from p2pmodel.lineage import LineageStore, Version

STATE = {"peer_id": "ab" * 20, "round": 3, "phase": "training", "head": {"id": None, "round": 2, "eval_loss": 2.0}}
ALICE, BOB, MALLORY = (PeerIdentity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))


def _round_version(store: LineageStore, parent: str, round_: int, scale: float, screened: bool) -> str:
    """A swarm round's version: merge spec with two deltas (and a screened liar), certified by two votes."""
    merge = {
        "method": "linear", "params": {},
        "deltas": [[ALICE.peer_id, "a" * 64, 64], [BOB.peer_id, "b" * 64, 32]],
        "members": [ALICE.peer_id, BOB.peer_id, MALLORY.peer_id], "proposal": "c" * 64,
        "outer": {"lr": 0.7, "momentum": 0.9, "nesterov": True},
    }
    if screened:
        merge["screened"] = [[MALLORY.peer_id, "norm 40x the median"]]
    v = store.commit({"w": torch.full((4, 4), scale), "b": torch.zeros(4)}, parents=[parent], message=f"round {round_}",
                     time=1000.0 + round_, author=ALICE.peer_id, round=round_, merge=merge,
                     contributors=(ALICE.peer_id, BOB.peer_id), metrics={"eval_loss": 3.0 - round_ / 2})
    votes = [sign(Vote(round=round_, base_version=parent, proposal_hash="c" * 64, version_id=v.id, voter=who.peer_id,
                       metrics={"eval_loss": 3.0 - round_ / 2}), who) for who in (ALICE, BOB)]
    store.annotate(v.id, certificate={"round": round_, "proposal": "c" * 64, "votes": votes})
    return v.id


@pytest.fixture
def lineage(tmp_path):
    store = LineageStore.init(tmp_path / "lineage")
    seed = store.commit({"w": torch.ones(4, 4), "b": torch.zeros(4)}, message="seed", time=1000.0, author="founder").id
    r1 = _round_version(store, seed, 1, 2.0, screened=True)
    r2 = _round_version(store, r1, 2, 3.0, screened=False)
    yield store, [seed, r1, r2]
    store.close()


@pytest.fixture
async def server(lineage):
    store, _ = lineage
    srv = await StatusServer.create(lambda: STATE, port=0, lineage=store)
    yield srv
    await srv.close()


def _base(srv: StatusServer) -> str:
    return srv.url.removesuffix("/status")


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


async def get_json(srv: StatusServer, path: str) -> tuple[int, dict]:
    code, ctype, body = await asyncio.to_thread(_get, _base(srv) + path)
    assert ctype == "application/json", (path, ctype)
    return code, json.loads(body)


# ------------------------------------------------------------------------------ /api/lineage

async def test_lineage_lists_the_branch_newest_first_with_parents(server, lineage):
    _, (seed, r1, r2) = lineage
    code, got = await get_json(server, "/api/lineage")
    assert code == 200 and got["head"] == r2 and got["branch"] == "main" and got["truncated"] is False
    assert [(v["id"], v["parents"]) for v in got["versions"]] == [(r2, [r1]), (r1, [seed]), (seed, [])]


async def test_lineage_rows_carry_metrics_contributors_ci_votes_and_screened_counts(server):
    _, got = await get_json(server, "/api/lineage")
    r2, r1, seed = got["versions"]
    assert (r1["contributors"], r1["ci_votes"], r1["screened"], r1["metrics"]) == (2, 2, 1, {"eval_loss": 2.5})
    assert (r2["screened"], r2["refs"]) == (0, ["main"])
    assert (seed["contributors"], seed["ci_votes"], seed["round"]) == (0, 0, None)


async def test_lineage_limit_bounds_the_answer_and_says_it_cut(server, lineage):
    _, (_, _, r2) = lineage
    code, got = await get_json(server, "/api/lineage?limit=1")
    assert code == 200 and [v["id"] for v in got["versions"]] == [r2] and got["truncated"] is True


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=ten", "limit=", "limit=1e3"])
async def test_lineage_limit_out_of_range_or_not_an_integer_is_400(server, query):
    code, got = await get_json(server, f"/api/lineage?{query}")
    assert code == 400 and got["status"] == 400 and "limit" in got["error"]


async def test_an_empty_lineage_lists_no_versions(tmp_path):
    store = LineageStore.init(tmp_path / "empty")
    srv = await StatusServer.create(lambda: STATE, port=0, lineage=store)
    try:
        code, got = await get_json(srv, "/api/lineage")
    finally:
        await srv.close()
        store.close()
    assert code == 200 and got["versions"] == [] and got["head"] is None


# ------------------------------------------------------------------------------ /api/version

async def test_version_shows_merge_spec_contributors_metrics_and_screened_deltas(server, lineage):
    _, (seed, r1, r2) = lineage
    code, got = await get_json(server, f"/api/version/{r1}")
    assert code == 200 and got["id"] == r1 and got["parents"] == [seed] and got["children"] == [r2]
    assert got["merge"]["method"] == "linear" and got["merge"]["deltas"][0] == [ALICE.peer_id, "a" * 64, 64]
    assert got["contributors"] == [ALICE.peer_id, BOB.peer_id] and got["metrics"] == {"eval_loss": 2.5}
    assert got["screened"] == [{"peer": MALLORY.peer_id, "reason": "norm 40x the median"}]


async def test_version_opens_and_checks_each_ci_vote(server, lineage):
    _, (_, r1, _) = lineage
    _, got = await get_json(server, f"/api/version/{r1}")
    assert [(v["voter"], v["valid"], v["metrics"]) for v in got["ci"]["votes"]] == [
        (ALICE.peer_id, True, {"eval_loss": 2.5}), (BOB.peer_id, True, {"eval_loss": 2.5})]


async def test_a_vote_for_another_version_or_a_forged_one_is_shown_invalid(lineage):
    store, (seed, r1, r2) = lineage
    other = sign(Vote(round=1, base_version=seed, proposal_hash="c" * 64, version_id=r2, voter=BOB.peer_id, metrics={}), BOB)
    store.annotate(r1, certificate={"round": 1, "proposal": "c" * 64, "votes": [other, b"garbage"]})
    srv = await StatusServer.create(lambda: STATE, port=0, lineage=store)
    try:
        _, got = await get_json(srv, f"/api/version/{r1}")
    finally:
        await srv.close()
    assert [v["valid"] for v in got["ci"]["votes"]] == [False, False]


async def test_a_unique_prefix_names_a_version(server, lineage):
    _, (_, r1, _) = lineage
    code, got = await get_json(server, f"/api/version/{r1[:10]}")
    assert code == 200 and got["id"] == r1


@pytest.mark.parametrize("name", ["main", "HEAD", "..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "ABCDEF12", "abc", "g" * 64])
async def test_anything_but_hex_digits_is_refused_as_a_version_name(server, name):
    code, got = await get_json(server, f"/api/version/{name}")
    assert code in (400, 404) and got["status"] == code


async def test_an_unknown_version_is_404(server):
    code, got = await get_json(server, "/api/version/" + "0" * 64)
    assert code == 404 and "no version" in got["error"]


async def test_an_ambiguous_prefix_is_400(server, lineage):
    store, _ = lineage
    # records with no tensors cost nothing: make them until two ids share 4 hex digits (~300)
    seen: dict[str, Version] = {}
    for i in range(100_000):
        v = Version(parents=(), tensors={}, message=f"v{i}", time=float(i))
        if v.id[:4] in seen:
            break
        seen[v.id[:4]] = v
    store.put_version(seen[v.id[:4]])
    store.put_version(v)
    code, got = await get_json(server, f"/api/version/{v.id[:4]}")
    assert code == 400 and "more than one" in got["error"]


# ------------------------------------------------------------------------------ /api/diff, /api/credits

async def test_diff_compares_a_version_with_its_first_parent(server, lineage):
    _, (_, r1, r2) = lineage
    code, got = await get_json(server, f"/api/diff/{r2}")
    assert code == 200 and got["parent"] == r1 and got["tensors_moved"] == 1
    assert [t["name"] for t in got["tensors"]] == ["w"] and got["totals"]["counts"]["unchanged"] == 1
    assert got["tensors"][0]["l2_change"] == pytest.approx(4.0)  # 16 entries moved by 1


async def test_diff_of_a_root_version_has_no_parent(server, lineage):
    _, (seed, _, _) = lineage
    code, got = await get_json(server, f"/api/diff/{seed}")
    assert code == 200 and got["parent"] is None and got["tensors"] == []


async def test_diff_top_is_bounded(server, lineage):
    _, (_, _, r2) = lineage
    code, _ = await get_json(server, f"/api/diff/{r2}?top=101")
    assert code == 400


async def test_credits_are_the_leaderboard_over_the_branch(server):
    code, got = await get_json(server, "/api/credits")
    board = {p["peer"]: p for p in got["peers"]}
    assert code == 200 and got["versions"] == 3 and got["peers"][0]["peer"] == ALICE.peer_id
    assert (board[ALICE.peer_id]["samples_merged"], board[ALICE.peer_id]["deltas_accepted"]) == (128.0, 2)
    assert (board[MALLORY.peer_id]["deltas_screened"], board[MALLORY.peer_id]["samples_merged"]) == (1, 0.0)


async def test_credits_carry_the_names_and_samples_the_node_saw_announced(server, lineage):
    store, (_, _, r2) = lineage
    observed = {"names": {ALICE.peer_id: "alice"}, "samples": {ALICE.peer_id: 100, MALLORY.peer_id: 40}}
    store.annotate(r2, certificate={**store.annotations(r2).certificate, "observed": observed})
    code, got = await get_json(server, "/api/credits")
    board = {p["peer"]: p for p in got["peers"]}
    assert (board[ALICE.peer_id]["name"], board[ALICE.peer_id]["samples_trained"]) == ("alice", 164.0)  # r1: its weight, r2: announced
    assert (board[MALLORY.peer_id]["samples_trained"], board[BOB.peer_id]["name"]) == (40.0, None)


async def test_credits_limit_is_bounded(server):
    code, _ = await get_json(server, "/api/credits?limit=5001")
    assert code == 400


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("path", ["/api/", "/api/nope", "/api/version", "/api/version/abcd/extra", "/api/lineage/x"])
async def test_unknown_api_routes_are_json_404(server, path):
    code, got = await get_json(server, path)
    assert code == 404 and got["status"] == 404


async def test_other_methods_are_json_405(server):
    def post() -> tuple[int, str]:
        request = urllib.request.Request(_base(server) + "/api/lineage", data=b"{}", method="POST")
        try:
            urllib.request.urlopen(request, timeout=5)
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type")
        return 200, ""

    assert await asyncio.to_thread(post) == (405, "application/json")


async def test_a_request_addressed_to_another_host_is_refused(server):
    # a page elsewhere whose DNS name was rebound to 127.0.0.1 sends its own Host header
    code, ctype, _ = await asyncio.to_thread(_get, _base(server) + "/api/lineage", {"Host": "evil.example:80"})
    assert (code, ctype) == (403, "application/json")


async def test_a_server_without_lineage_answers_503(tmp_path):
    srv = await StatusServer.create(lambda: STATE, port=0)
    try:
        code, got = await get_json(srv, "/api/lineage")
    finally:
        await srv.close()
    assert code == 503 and "no lineage" in got["error"]


# ------------------------------------------------------------------------------ the page

@pytest.mark.parametrize("path,ctype", [
    ("/dashboard/", "text/html; charset=utf-8"),
    ("/dashboard/app.js", "text/javascript; charset=utf-8"),
    ("/dashboard/app.css", "text/css; charset=utf-8"),
    ("/dashboard/vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    ("/dashboard/vendor/uPlot.min.css", "text/css; charset=utf-8"),
    ("/dashboard/vendor/LICENSE.uPlot", "text/plain; charset=utf-8"),
])
async def test_the_page_and_its_assets_are_served_with_their_content_types(server, path, ctype):
    code, got_type, body = await asyncio.to_thread(_get, _base(server) + path)
    assert (code, got_type) == (200, ctype) and body


async def test_the_page_loads_nothing_from_outside_the_node(server):
    _, _, body = await asyncio.to_thread(_get, _base(server) + "/dashboard/")
    page = body.decode()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    for asset in ("/dashboard/app.js", "/dashboard/app.css", "/dashboard/vendor/uPlot.iife.min.js"):
        assert asset in page


async def test_the_vendored_chart_library_carries_its_license(server):
    _, _, body = await asyncio.to_thread(_get, _base(server) + "/dashboard/vendor/LICENSE.uPlot")
    assert b"MIT License" in body and b"Leon Sorokin" in body


async def test_dashboard_without_slash_redirects_to_the_page(server):
    code, _, body = await asyncio.to_thread(_get, _base(server) + "/dashboard")
    assert code == 200 and b"<html" in body  # urllib followed the 308


@pytest.mark.parametrize("path", ["/dashboard/../status", "/dashboard/%2e%2e/pyproject.toml", "/dashboard/vendor/",
                                  "/dashboard/lineage_api.py", "/dashboard/index.html/x", "/dashboardapp.js"])
async def test_nothing_but_the_listed_files_is_served_under_dashboard(server, path):
    def raw() -> bytes:  # raw socket: urllib would normalise the dots away
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            return s.recv(100)

    assert (await asyncio.to_thread(raw)).startswith(b"HTTP/1.1 404")


# ------------------------------------------------------------------------------ the command

def test_dashboard_url_is_derived_from_the_status_url():
    assert dashboard_url("http://127.0.0.1:8123/status") == "http://127.0.0.1:8123/dashboard/"


def test_a_home_without_node_json_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError):
        status_url_from_home(tmp_path)


async def test_the_command_prints_the_url_found_in_the_nodes_home(server, tmp_path, capsys):
    (tmp_path / "node.json").write_text(json.dumps({"pid": 1, "status_url": server.url, "peer_id": "ab" * 20}))
    code = await asyncio.to_thread(cli_main, ["dashboard", "--home", str(tmp_path), "--no-open"])
    assert code == 0 and capsys.readouterr().out.strip() == server.dashboard_url


def test_the_command_fails_in_one_line_when_no_node_answers(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "node.json").write_text(json.dumps({"status_url": f"http://127.0.0.1:{port}/status"}))
    assert cli_main(["dashboard", "--home", str(tmp_path), "--no-open"]) == 1
    assert "no node answers" in capsys.readouterr().err
