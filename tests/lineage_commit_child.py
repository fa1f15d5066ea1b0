"""Child program for tests/test_lineage_atomicity.py: commit one large version, then exit.

Usage: python lineage_commit_child.py REPO SEED N_TENSORS ELEMENTS
The tensors are `make_model(SEED, N_TENSORS, ELEMENTS)`; the parent kills this process
with SIGKILL while it writes, at points it picks by watching the objects folder.
"""

from __future__ import annotations

import sys

import torch

SHARED = 8  # tensors every model shares (seed 0), so commits also exercise dedup


def make_model(seed: int, n: int, elements: int) -> dict[str, torch.Tensor]:
    """Deterministic tensors: the first SHARED are the same for every seed, the rest depend on it."""
    out = {}
    for i in range(n):
        g = torch.Generator().manual_seed(i if i < SHARED else seed * 10_000 + i)
        out[f"block{i:03d}.weight"] = torch.randn(elements, generator=g)
    return out


def main() -> None:
    from p2pmodel.lineage import LineageStore

    torch.set_num_threads(1)
    repo, seed, n, elements = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = LineageStore.open(repo)
    model = make_model(seed, n, elements)
    store.commit(model, message=f"seed {seed}")


if __name__ == "__main__":
    main()
