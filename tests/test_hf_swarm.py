"""A Hugging Face event joined with nothing but the join line (issue 9: "the swarm carries the
event").

A tiny GPT-2 folder is built here (nothing downloaded) and seeded with `p2pmodel seed --from`.
The founder runs `join --event event.toml --data its-text`; a volunteer in another working
folder runs the founder's printed line plus `--home` and `--data its-own-text`: no event file,
no model folder, no path of the founder's. Both are real `p2pmodel join` processes (hivemind
DHT + p2pd on 127.0.0.1).

Guarantees checked:
- the volunteer fetches the manifest and the seed version by hash and trains with the founder:
  rounds commit with both as contributors, and both lineages hold the same version ids;
- the volunteer's model folder was written from the seed version (config.json, no weights);
- a version committed by the swarm exports with `--format hf` and loads with `from_pretrained`
  (round versions keep the seed's config.json).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from swarm_nodes import JOIN, SwarmNode, wait_for

from p2pmodel.cli import main
from p2pmodel.lineage import LineageStore

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(400)]

SETTINGS = {
    "inner_steps": 3,
    "collect_window": 10.0,  # waited out only while a peer is missing; rounds close once both delivered
    "proposal_timeout": 5.0,
    "round_deadline": 30.0,  # what a round costs that the joiner entered too late to commit
    "min_members": 2,
    # each peer scores a version on its own held-out text: the gate compares like with like
    # only per peer, and a 2-layer model on 2 kB of text moves a lot per round
    "ci_max_regression": 1.0,
    "ci_max_regression_best": 1.0,
    "task_options.context": 16,
    "task_options.batch_size": 4,
    "task_options.eval_batches": 1,
}


class CommandNode(SwarmNode):
    """A `p2pmodel join` process run with exactly these arguments (plus `--home`), from `cwd`."""

    def __init__(self, name: str, root: Path, args: list[str], *, home: Path, cwd: Path):
        self.name, self.home, self.log, self.log_stdout = name, home, root / f"{name}.log", True
        self.args, self.cwd, self.proc, self.p2pd = [*JOIN, *args, "--home", str(home)], cwd, None, []

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, cwd=self.cwd, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _join_line(log: Path) -> list[str] | None:
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.strip().startswith("p2pmodel join --peers"):
            return line.split()[2:]  # what follows `p2pmodel join`
    return None


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    import torch

    root = tmp_path_factory.mktemp("hfswarm")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "researcher" / "tiny")
    (root / "researcher" / "notes.txt").write_text("the founder's own notes on tiny models. " * 60)
    volunteer = root / "volunteer"
    volunteer.mkdir()
    (volunteer / "mine.txt").write_text("a volunteer writes about something else entirely. " * 60)
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    assert main(["seed", "--from", str(root / "researcher" / "tiny"), "--name", "hfswarm", *sets, "-o", str(root / "researcher" / "ev")]) == 0

    common = ["--status-port", "0", "--device", "cpu", "--cpu-threads", "1"]
    researcher = root / "researcher"
    founder = CommandNode("founder", root, ["--event", "ev/event.toml", "--data", "notes.txt", *common], home=researcher / "ev" / "founder", cwd=researcher)
    nodes = [founder]
    try:
        founder.start()
        line = wait_for(lambda: _join_line(founder.log), 120, "the founder's join line")
        joiner = CommandNode("volunteer", root, [*line, "--data", "mine.txt", *common], home=volunteer / "home", cwd=volunteer)
        nodes.append(joiner)
        joiner.start()

        def both_committed():
            heads = [n.head() for n in nodes]
            return heads if all((r or -1) >= 2 for _, r in heads) else None

        heads = wait_for(both_committed, 240, "rounds committed by both nodes")
        for n in nodes:
            n.proc.send_signal(signal.SIGTERM)
        codes = [n.stop(signal_it=False) for n in nodes]
        yield {"root": root, "line": line, "volunteer": volunteer, "founder": founder, "joiner": joiner, "heads": heads, "codes": codes}
    finally:
        for n in nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.stop(timeout=20)


def _chain(home: Path) -> list:
    with LineageStore.open(home / "lineage") as store:
        return store.log("main")


def test_the_join_line_is_only_addresses_and_the_event_id(swarm):
    line = swarm["line"]
    assert line[0] == "--peers" and line[-2] == "--event-id" and len(line[-1]) == 64
    assert all(a.startswith("/ip4/127.0.0.1/") for a in line[1:-2])


def test_the_volunteer_had_no_event_file_and_no_model_files(swarm):
    home = swarm["joiner"].home
    assert sorted(p.name for p in swarm["volunteer"].iterdir()) == ["home", "mine.txt"]
    assert (home / "model" / "config.json").is_file() and not list((home / "model").glob("*.safetensors"))


def test_both_nodes_commit_the_same_versions_with_both_as_contributors(swarm):
    founder, joiner = _chain(swarm["founder"].home), _chain(swarm["joiner"].home)
    shorter, longer = sorted([[v.id for v in founder], [v.id for v in joiner]], key=len)
    assert shorter == longer[len(longer) - len(shorter) :] and len(longer) - len(shorter) <= 1
    assert len(shorter) >= 3 and shorter[-1] == founder[-1].id  # from the same seed on
    assert any(len(v.contributors) == 2 for v in joiner), "no round merged both peers' deltas"
    assert swarm["codes"] == [0, 0]


def test_a_committed_version_exports_as_a_folder_transformers_loads(swarm, tmp_path):
    import torch
    import transformers

    repo = swarm["joiner"].home / "lineage"
    assert main(["--repo", str(repo), "export", "main", "-o", str(tmp_path / "out"), "--format", "hf"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with LineageStore.open(repo) as store:
        assert store.get_version("main").round is not None  # a round's version, not the seed
        want = store.state_dict("main")["transformer.h.0.mlp.c_fc.weight"]
    assert torch.equal(model.state_dict()["transformer.h.0.mlp.c_fc.weight"], want)
