"""Peers behind NAT still contribute and serve their deltas: relays, and deltas served on.

The node's role (daemon/reachability.py): with a public address it relays for others; with only
private ones it reserves a relay slot at a public peer and announces the circuit address, which
other peers dial (daemon/transport.py hands it to p2pd in go-multiaddr's encoding). Every peer
that fetched a delta serves it on (daemon/rounds.py), so a peer that cannot reach the delta's
author gets it from someone who could.

Pure guarantees: the role `--reachability` and the node's own addresses give; one relay
address per relay peer (p2pd waits for every trusted relay address it was given); relay ids
read from circuit addresses; circuit addresses kept for dialling and encoded as p2pd parses them.

In network namespaces (tests/nat_lab.py: each home behind its own masquerading router that drops
every connection the outside opens; needs root, `ip` and `iptables`, else skipped). This is the
one place peers use addresses other than 127.0.0.1: a NAT cannot be built on loopback. Every
process binds its own lab address, and no lab namespace has a link to the host's network:
- a home holds a slot at the public peer and announces its relay address;
- another home dials that address and fetches a 1 MiB object through the relay: more than
  go-libp2p's default relay allows per connection (128 KiB), so the public peer relays with
  p2pd's own limits;
- one public peer and two homes behind separate NATs commit every round, and every home is
  credited in every round once all have joined (tests/nat_swarm.py; `scripts/nat_study` runs
  larger swarms and prints a table).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nat_lab import NatLab, lab_problem  # noqa: E402
from swarm_nodes import wait_for  # noqa: E402

from p2pmodel.daemon.config import ConfigError, NodeConfig, check_node_config  # noqa: E402
from p2pmodel.daemon.reachability import plan_relays, relay_candidates, relays_in  # noqa: E402
from p2pmodel.daemon.status import format_status  # noqa: E402
from p2pmodel.daemon.transport import dialable_maddrs  # noqa: E402

RELAY = "QmbwXGLfHrewMkRSbBAk8Af8WhSygcJNGYgU2e9Qcp99hV"
HOME = "QmTpZK3Rfj3CspXYY5wfhPYfaFhuSHu3j1EJVgVp7sQmb8"
PEER_SCRIPT = Path(__file__).with_name("nat_peer.py")


# ------------------------------------------------------------------------------ pure


@pytest.mark.parametrize("wanted, own, relays, mode", [
    ("auto", ["/ip4/11.0.0.11/tcp/1", "/ip4/127.0.0.1/tcp/1"], [], "public"),
    ("auto", ["/ip4/10.1.0.2/tcp/1", "/ip4/127.0.0.1/tcp/1"], [f"/ip4/11.0.0.11/tcp/1/p2p/{RELAY}"], "private"),
    ("auto", ["/ip4/10.1.0.2/tcp/1"], [], "local"),  # a LAN founder: nobody to relay through
    ("auto", ["/ip4/127.0.0.1/tcp/1"], [f"/ip4/127.0.0.1/tcp/2/p2p/{RELAY}"], "local"),  # one machine
    ("public", ["/ip4/10.1.0.2/tcp/1"], [], "public"),  # a forwarded port: the flag wins
    ("private", ["/ip4/11.0.0.11/tcp/1"], [f"/ip4/11.0.0.12/tcp/1/p2p/{RELAY}"], "private"),  # a firewall
    ("local", ["/ip4/11.0.0.11/tcp/1"], [], "local"),
])  # fmt: skip
def test_the_role_follows_the_flag_else_the_nodes_own_addresses(wanted, own, relays, mode):
    assert plan_relays(wanted, own, relays).mode == mode


def test_a_private_node_needs_a_peer_to_relay_through():
    with pytest.raises(ValueError, match="relay through"):
        plan_relays("private", ["/ip4/10.1.0.2/tcp/1"], ["/ip4/11.0.0.11/tcp/1"])  # no /p2p/ id: not a relay


def test_only_a_private_node_reserves_relay_slots_and_only_it_skips_relay_discovery():
    private = plan_relays("private", [], [f"/ip4/11.0.0.11/tcp/1/p2p/{RELAY}"])
    assert private.p2p_options() == {
        "force_reachability": "private", "use_auto_relay": True, "trusted_relays": [f"/ip4/11.0.0.11/tcp/1/p2p/{RELAY}"],
    }  # fmt: skip
    assert private.p2pd_flags() == {"relayDiscovery": False} and private.waits_for_relay
    public = plan_relays("public", [], [])
    assert public.p2p_options() == {"force_reachability": "public"} and not public.p2pd_flags()
    assert plan_relays("local", [], []).p2p_options() == {}


def test_each_relay_peer_is_trusted_once_at_its_most_public_address():
    got = relay_candidates([
        f"/ip4/127.0.0.1/tcp/1/p2p/{RELAY}",
        f"/ip4/11.0.0.11/tcp/1/p2p/{RELAY}",
        f"/ip4/10.0.0.5/tcp/1/p2p/{RELAY}",
        f"/ip4/11.0.0.12/tcp/2/p2p/{RELAY}/p2p-circuit/p2p/{HOME}",  # relayed: not a relay itself
        "/ip4/11.0.0.13/tcp/3",  # no peer id
        "garbage",
    ])  # fmt: skip
    assert got == [f"/ip4/11.0.0.11/tcp/1/p2p/{RELAY}"]


def test_relay_ids_are_read_from_circuit_addresses_only():
    assert relays_in([f"/ip4/11.0.0.11/tcp/1/p2p/{RELAY}/p2p-circuit/p2p/{HOME}", f"/ip4/10.1.0.2/tcp/1/p2p/{HOME}"]) == [RELAY]


def test_a_circuit_address_is_kept_for_dialling_in_go_multiaddrs_encoding():
    (circuit,) = dialable_maddrs(HOME, [f"/ip4/11.0.0.11/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{HOME}"])
    assert str(circuit) == f"/ip4/11.0.0.11/tcp/4001/p2p/{RELAY}/p2p-circuit"
    # /ip4 11.0.0.11 /tcp 4001 /p2p <34-byte multihash> /p2p-circuit; hivemind writes a CIDv1 there instead
    multihash = "1220ca16d7532e05803268069265b876e129142ca81c4837002367f3bf5424d4551c"
    assert circuit.to_bytes().hex() == "040b00000b" + "060fa1" + "a503" + "22" + multihash + "a202"


def test_a_circuit_through_the_peer_itself_is_not_dialled():
    assert dialable_maddrs(HOME, [f"/ip4/11.0.0.11/tcp/1/p2p/{HOME}/p2p-circuit/p2p/{HOME}"]) == []


def test_the_reachability_flag_is_checked_before_the_node_starts():
    with pytest.raises(ConfigError, match="--reachability"):
        check_node_config(NodeConfig(reachability="open"))
    with pytest.raises(ConfigError, match="relay through"):
        check_node_config(NodeConfig(reachability="private"))  # no --relays, no --peers


def test_status_shows_the_nodes_own_reachability():
    text = format_status({"reachability": {
        "mode": "private", "decided_by": "auto: only private addresses here", "addresses": "private",
        "relayed_by": [RELAY], "connections": {"direct": 2, "relayed": 1},
    }})  # fmt: skip
    assert f"reach    private (auto: only private addresses here); relayed by {RELAY[:12]}…; connections 2 direct, 1 relayed" in text


# ------------------------------------------------------------------------------ namespaces


@pytest.fixture(scope="module")
def lab_ok():
    why = lab_problem()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def relayed(lab_ok, tmp_path_factory):
    """pub1 (public), home1 and home2 (private, behind separate NATs); home1 fetches home2's 1 MiB blob."""
    out = tmp_path_factory.mktemp("nat_transport")
    lab = NatLab.build(homes=2, publics=1)
    procs: list[subprocess.Popen] = []

    def start(host: str, *args: str) -> None:
        log = open(out / f"{host}.log", "w")
        cmd = [sys.executable, str(PEER_SCRIPT), str(out), host, "--listen", lab.address(host), *args]
        procs.append(lab.popen(host, cmd, stdout=log, stderr=log))

    def state(host: str) -> dict | None:
        path = out / f"{host}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def alive(value):
        """`value`, after checking that no peer exited early (fail at once with the logs, not at the deadline)."""
        for host, p in zip(("pub1", "home2", "home1"), procs):
            if p.poll() is not None:
                pytest.fail(f"{host} exited with {p.returncode}:\n{_logs(out)}")
        return value

    try:
        start("pub1", "--reachability", "auto")
        pub = wait_for(lambda: alive(state("pub1")), 60, "pub1 to start")
        start("home2", "--reachability", "auto", "--serve-bytes", str(1 << 20), "--peers", *pub["addrs"])
        start("home1", "--reachability", "auto", "--fetch-from", "home2", "--peers", *pub["addrs"])
        t0 = time.monotonic()
        home1 = wait_for(lambda: alive((state("home1") or {}).get("fetch") and state("home1")), 120, f"home1's fetch (logs in {out})")
        yield {"pub1": pub, "home1": home1, "home2": state("home2"), "seconds": time.monotonic() - t0}
    finally:
        (out / "stop").touch()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        lab.teardown()


def _logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(out.glob("*.log")))


@pytest.mark.multiprocess
def test_a_home_holds_a_slot_at_the_public_peer_and_announces_its_relay_address(relayed):
    pub, home2 = relayed["pub1"], relayed["home2"]
    assert pub["reachability"]["mode"] == "public"
    assert home2["reachability"]["mode"] == "private"
    assert home2["reachability"]["relayed_by"] == [pub["libp2p_id"]]
    assert any(f"/p2p/{pub['libp2p_id']}/p2p-circuit/p2p/{home2['libp2p_id']}" in a for a in home2["addrs"])


@pytest.mark.multiprocess
def test_a_home_fetches_another_homes_object_through_the_relay(relayed):
    fetch = relayed["home1"]["fetch"]
    assert fetch.get("bytes") == 1 << 20, fetch  # past go-libp2p's default 128 KiB per relayed connection
    assert relayed["home1"]["reachability"]["connections"]["relayed"] >= 1


@pytest.fixture(scope="module")
def swarm(lab_ok, tmp_path_factory):
    from nat_swarm import run

    result = run(tmp_path_factory.mktemp("nat_swarm"), homes=2, publics=1, rounds=2, timeout=300)
    assert result["ok"], result
    return result


def _measured(swarm: dict) -> list[dict]:
    return [v for v in swarm["versions"] if v["round"] > swarm["all_joined_round"]]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_homes_behind_separate_nats_and_a_public_peer_commit_every_round(swarm):
    # the lineage is read once the nodes stopped: rounds past the one waited for may be there too
    rounds = [v["round"] for v in _measured(swarm) if v["round"] <= swarm["last_round"]]
    assert rounds == list(range(swarm["all_joined_round"] + 1, swarm["last_round"] + 1)), swarm["versions"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_home_is_credited_in_every_round_once_all_joined(swarm):
    for v in _measured(swarm):
        assert {"home1", "home2"} <= set(v["contributors"]), v


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_homes_report_themselves_private_and_relayed_by_the_public_peer(swarm):
    for home in ("home1", "home2"):
        node = swarm["nodes"][home]
        assert node["mode"] == "private" and len(node["relayed_by"]) == 1, node
    assert swarm["nodes"]["pub1"]["mode"] == "public"
