"""Hugging Face round trip: commit a transformers model folder, export it with `--format hf`,
and `from_pretrained` gives a model with bit-identical logits.

Covers a tiny GPT-2 (tied `lm_head` omitted by `save_pretrained`), a tiny Llama (untied
`lm_head`), and a GPT-2 whose full state dict (with `lm_head.weight`, sharing storage with
`wte` in memory) was written as plain safetensors: the export drops the tied copy as
transformers expects. Models are built locally; nothing is downloaded (HF_HUB_OFFLINE=1).
The commands run in-process through `p2pmodel.cli.main` (the CLI as a subprocess is
covered by test_cli_repo.py); this file is about the exported folder.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from p2pmodel.checkpoint import open_checkpoint, write_safetensors
from p2pmodel.cli import main

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

INPUT = torch.tensor([[1, 5, 9, 42, 7, 99, 3, 0]])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "repo"
    assert main(["--repo", str(path), "init"]) == 0
    return path


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                   max_position_embeddings=64, tie_word_embeddings=False,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def _round_trip(repo, src, out, message) -> torch.nn.Module:
    assert main(["--repo", str(repo), "commit", str(src), "-m", message]) == 0
    assert main(["--repo", str(repo), "export", "HEAD", "-o", str(out), "--format", "hf"]) == 0
    return transformers.AutoModelForCausalLM.from_pretrained(out).eval()


def test_gpt2_folder_exports_to_a_loadable_model_with_identical_logits(repo, tmp_path):
    model = _gpt2()
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    loaded = _round_trip(repo, tmp_path / "src", tmp_path / "out", "gpt2")
    assert torch.equal(_logits(loaded), _logits(model))
    assert (tmp_path / "out" / "config.json").read_bytes() == (tmp_path / "src" / "config.json").read_bytes()


def test_llama_with_untied_head_exports_with_identical_logits(repo, tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    loaded = _round_trip(repo, tmp_path / "src", tmp_path / "out", "llama")
    assert "lm_head.weight" in open_checkpoint(tmp_path / "out").names()
    assert torch.equal(_logits(loaded), _logits(model))


def test_state_dict_with_storage_shared_head_exports_as_transformers_expects(repo, tmp_path):
    model = _gpt2()
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()  # tied in memory
    src = tmp_path / "src"
    write_safetensors(src / "model.safetensors", sd, {"format": "pt"})
    model.config.to_json_file(src / "config.json")
    loaded = _round_trip(repo, src, tmp_path / "out", "gpt2 state dict")
    assert "lm_head.weight" not in open_checkpoint(tmp_path / "out").names()
    assert torch.equal(_logits(loaded), _logits(model))


def test_sharded_export_loads_with_identical_logits(repo, tmp_path):
    model = _gpt2()
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    assert main(["--repo", str(repo), "commit", str(tmp_path / "src"), "-m", "gpt2 again"]) == 0
    out = tmp_path / "out"
    assert main(["--repo", str(repo), "export", "HEAD", "-o", str(out), "--max-shard-size", "20KB"]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(loaded), _logits(model))
