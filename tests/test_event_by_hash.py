"""The swarm carries the event: a joiner with only an event id gets the manifest and the seed
version from peers, by hash, and trusts nothing else (daemon/manifest.py, daemon/joining.py,
sync.fetch_seed).

Guarantees:
- the event id is the sha256 of the manifest's canonical bytes (`EventConfig.manifest_bytes`);
- bytes a peer serves for an id are accepted only if they are at most `MAX_MANIFEST` long,
  hash to the id, are JSON, are a valid event, and are that event's canonical form; anything
  else is a `ManifestRejected` naming why (pure rules: no sockets in those tests);
- an event too big to be served is refused when it is made, naming the problem;
- over real transports (hivemind DHT + p2pd on 127.0.0.1): a peer that serves wrong bytes is
  refused and the next one is asked; a peer without the manifest is skipped; no peer at all is
  an `EventUnavailable` by the deadline, never a crash; the seed version is fetched by id with
  every object, and a version with parents is refused as a seed;
- what is local to a machine (`--data`, an hf event's model folder) comes from the node: the
  folder is written from the seed version's files; charlm refuses `--data`, hf requires it.

The 2-node swarms that join this way are in tests/test_hf_swarm.py and tests/test_walkthrough.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import pytest_asyncio
import torch

from p2pmodel.cli import main
from p2pmodel.daemon.config import ConfigError, EventConfig, NodeConfig, event_from_mapping
from p2pmodel.daemon.joining import EventUnavailable, MODEL_FOLDER, fetch_event, peer_ids_of, task_options
from p2pmodel.daemon.manifest import ManifestRejected, event_from_manifest_bytes
from p2pmodel.daemon.node import NodeError, _local_event
from p2pmodel.daemon.sync import SyncError, fetch_seed
from p2pmodel.daemon.transport import Transport
from p2pmodel.lineage import LineageStore
from p2pmodel.protocols.limits import MAX_MANIFEST

EVENT = EventConfig(name="byhash", seeder="ab" * 20, inner_steps=7, codec={"encoder": "int8"})
EVENT_ID = EVENT.event_hash()


def _id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ the manifest's rules (pure)


def test_the_event_id_is_the_sha256_of_the_canonical_manifest():
    assert EVENT_ID == _id(EVENT.manifest_bytes())
    assert json.loads(EVENT.manifest_bytes()) == dataclasses.asdict(EVENT)


def test_the_canonical_manifest_reads_back_as_the_event():
    assert event_from_manifest_bytes(EVENT.manifest_bytes(), EVENT_ID) == EVENT


def test_bytes_of_another_event_are_rejected():
    other = dataclasses.replace(EVENT, inner_steps=8).manifest_bytes()
    with pytest.raises(ManifestRejected, match="hash to"):
        event_from_manifest_bytes(other, EVENT_ID)


def test_an_oversized_manifest_is_rejected_before_it_is_hashed_or_parsed():
    big = b" " * (MAX_MANIFEST + 1)
    with pytest.raises(ManifestRejected, match="more than"):
        event_from_manifest_bytes(big, _id(big))


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\xff\xfe not text", "not JSON"),
        (b"{\"name\": ", "not JSON"),
        (b"[1, 2]", "not a valid event"),
        (json.dumps({**dataclasses.asdict(EVENT), "codec": {"densty": 1}}, sort_keys=True).encode(), "densty"),
        (json.dumps(dataclasses.asdict(EVENT), indent=1).encode(), "canonical"),  # same event, other bytes
        (json.dumps({"name": "byhash"}).encode(), "canonical"),  # defaults left out: another encoding
    ],
    ids=["not-utf8", "truncated", "not-a-table", "invalid-event", "pretty-printed", "partial"],
)
def test_a_malformed_manifest_is_rejected_even_when_its_hash_matches(data, why):
    with pytest.raises(ManifestRejected, match=why) as e:
        event_from_manifest_bytes(data, _id(data))
    assert "\n" not in str(e.value)


def test_an_event_too_big_to_serve_is_refused_when_it_is_made():
    with pytest.raises(ConfigError, match="peers accept at most"):
        event_from_mapping({"task_options": {"blob": "x" * MAX_MANIFEST}})


def test_the_join_lines_addresses_give_the_peers_to_ask():
    addrs = ["/ip4/127.0.0.1/tcp/4001/p2p/QmA", "/ip4/10.0.0.2/tcp/4001/p2p/QmA", "/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/tcp/2/p2p/QmB"]
    assert peer_ids_of(addrs) == ["QmA", "QmB"]


@pytest.mark.parametrize("value", ["abc", "AB" * 32, "ab" * 31])
def test_a_malformed_event_id_is_one_line_naming_the_flag(value, tmp_path, capsys):
    assert main(["join", "--event-id", value, "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err
    assert "--event-id" in err and err.count("\n") == 1
    assert not (tmp_path / "home").exists()


def _config(tmp_path, **flags) -> NodeConfig:
    return NodeConfig(home=str(tmp_path / "home"), peers=("/ip4/127.0.0.1/tcp/1/p2p/QmA",), **flags)


def test_an_event_file_that_is_not_the_event_id_is_refused(tmp_path):
    path = tmp_path / "event.json"
    path.write_text(json.dumps(dataclasses.asdict(EVENT)))
    with pytest.raises(ConfigError, match="not the --event-id") as e:
        _local_event(_config(tmp_path, event=str(path), event_id="cd" * 32), tmp_path, "ef" * 20)
    assert e.value.source == "--event"


def test_an_event_id_alone_on_a_new_home_is_fetched_and_on_an_old_one_must_match(tmp_path):
    assert _local_event(_config(tmp_path, event_id=EVENT_ID), tmp_path, "ef" * 20) is None  # fetched from peers
    (tmp_path / "event.json").write_text(EVENT.to_json())
    assert _local_event(_config(tmp_path, event_id=EVENT_ID), tmp_path, "ef" * 20) == EVENT  # a restart: no fetch
    with pytest.raises(NodeError, match="belongs to event byhash"):
        _local_event(_config(tmp_path, event_id="cd" * 32), tmp_path, "ef" * 20)


# ------------------------------------------------------------------ what is local to a node


def _seed_store(tmp_path, files: dict[str, bytes]) -> tuple[LineageStore, str]:
    store = LineageStore.init(tmp_path / "lineage")
    v = store.commit({"w": torch.arange(4.0)}, parents=[], message="seed", time=0.0, files=files)
    return store, v.id


def test_charlm_refuses_data_it_does_not_use(tmp_path):
    with pytest.raises(ConfigError, match="built-in data") as e:
        task_options(EventConfig(), ["mine.txt"], None, tmp_path)
    assert e.value.source == "--data"


def test_an_hf_event_needs_the_volunteers_own_text(tmp_path):
    store, seed = _seed_store(tmp_path, {"config.json": b"{}"})
    with store, pytest.raises(ConfigError, match="--data FILE") as e:
        task_options(EventConfig(task="hf", seed_version=seed), [], store, tmp_path)
    assert e.value.source == "--data"


def test_an_hf_nodes_model_folder_is_written_from_the_seed_versions_files(tmp_path):
    files = {"config.json": b'{"model_type": "gpt2"}', "tokenizer.json": b"{}", "../escape": b"no"}
    store, seed = _seed_store(tmp_path, files)
    with store:
        options = task_options(EventConfig(task="hf", seed_version=seed, task_options={"context": 8}), ["a.txt"], store, tmp_path / "home")
    folder = tmp_path / "home" / MODEL_FOLDER
    assert options == {"context": 8, "text_files": ["a.txt"], "model_dir": str(folder)}
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json"]  # plain names only
    assert (folder / "config.json").read_bytes() == files["config.json"] and not (tmp_path / "home" / "escape").exists()


# ------------------------------------------------------------------ over real transports


@pytest.fixture(scope="module")
def seed_lineage(tmp_path_factory):
    path = tmp_path_factory.mktemp("founder")
    store = LineageStore.init(path / "lineage")
    seed = store.commit({"w": torch.arange(6.0), "b": torch.ones(2)}, parents=[], message="seed", time=0.0, files={"config.json": b"{}"})
    child = store.commit({"w": torch.zeros(6)}, parents=[seed.id], message="not a seed", time=1.0)
    yield store, seed, child
    store.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def peers(seed_lineage):
    """An honest peer (serves the manifest and the lineage), a liar (serves other bytes under the
    event id), a bloated peer (serves more than MAX_MANIFEST bytes under it), a peer that has
    nothing, and a joiner bootstrapped through the liar."""
    store = seed_lineage[0]
    honest = await Transport.create()
    honest.put_blob(EVENT.manifest_bytes(), kind="manifest")
    honest.add_source(lambda oid: store.read_object(oid) if store.has_object(oid) else None)
    liar = await Transport.create(initial_peers=await honest.visible_maddrs())
    forged = dataclasses.replace(EVENT, seeder="cd" * 20).manifest_bytes()
    liar.add_source(lambda oid: forged if oid == EVENT_ID else None)
    bloated = await Transport.create(initial_peers=await honest.visible_maddrs())
    bloated.add_source(lambda oid: b" " * (MAX_MANIFEST + 1) if oid == EVENT_ID else None)
    empty = await Transport.create(initial_peers=await honest.visible_maddrs())
    joiner = await Transport.create(initial_peers=await liar.visible_maddrs())
    yield {"honest": honest, "liar": liar, "bloated": bloated, "empty": empty, "joiner": joiner}
    for t in (joiner, empty, bloated, liar, honest):
        await t.shutdown()


def _name(t: Transport) -> str:
    return t.peer_id.to_base58()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.multiprocess
async def test_liars_are_refused_and_the_next_peer_serves_the_event(peers):
    order = [_name(peers[n]) for n in ("liar", "bloated", "empty", "honest")]
    event, sources = await fetch_event(peers["joiner"], order, EVENT_ID, timeout=60)
    assert event == EVENT
    assert sources[0] == _name(peers["honest"])
    assert _name(peers["liar"]) not in sources and _name(peers["bloated"]) not in sources
    received = peers["joiner"].counters.snapshot()["manifest"]["received"]
    assert received < 2 * len(EVENT.manifest_bytes()) + 16 * 1024  # the bloated copy was refused by its size, unread


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.multiprocess
async def test_peers_the_dht_knows_are_asked_when_the_bootstrap_has_nothing(peers):
    event, sources = await fetch_event(peers["joiner"], [_name(peers["empty"])], EVENT_ID, timeout=60)
    assert event == EVENT and sources[0] == _name(peers["honest"])


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.multiprocess
async def test_an_event_nobody_serves_is_a_typed_error_by_the_deadline(peers):
    with pytest.raises(EventUnavailable) as e:
        await fetch_event(peers["joiner"], [_name(peers["empty"])], "ee" * 32, timeout=3)
    assert e.value.event_id == "ee" * 32 and e.value.reasons


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.multiprocess
async def test_the_seed_version_is_fetched_by_id_with_every_object(peers, seed_lineage, tmp_path):
    _, seed, _ = seed_lineage
    with LineageStore.init(tmp_path / "joiner") as store:
        got = await fetch_seed(peers["joiner"], store, seed.id, [_name(peers["empty"]), _name(peers["honest"])])
        assert got.id == seed.id and store.resolve("main") == seed.id
        assert torch.equal(store.state_dict("main")["w"], torch.arange(6.0))
        assert store.get_file(got.files["config.json"]) == b"{}" and store.verify().ok


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.multiprocess
async def test_a_version_with_parents_is_refused_as_a_seed(peers, seed_lineage, tmp_path):
    child = seed_lineage[2]
    with LineageStore.init(tmp_path / "joiner") as store, pytest.raises(SyncError, match="parents"):
        await fetch_seed(peers["joiner"], store, child.id, [_name(peers["honest"])])
    with LineageStore.open(tmp_path / "joiner") as store:
        assert store.branches() == {}
