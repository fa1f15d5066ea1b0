"""p2pmodel: build models the way open-source software is built.

Map of the core (this package imports neither `p2pmodel.protocols` nor `p2pmodel.daemon`):

- `lineage/`   — version control for models: content-addressed tensors, versions, refs, index.
- `merge/`     — merge methods registered by name, and the streaming merge engine.
- `tasks/`     — training-task plugins (`charlm` built in, Hugging Face causal LM adapter).
- `training.py`— the inner loop and DiLoCo's outer step.
- `versioning.py`, `screening.py`, `ci.py` — the version a round commits, the deltas its merge
  leaves out, and the CI gate (pure functions every peer runs the same).
- `credits.py`, `peers.py` — the contributor leaderboard; what a node knows of its swarm's peers
  (display names made safe, reachability, rates: the status's `swarm` section).
- `checkpoint/` — reading and writing checkpoints (safetensors files and folders).
- `dtypes.py`, `atomic.py` — the safetensors dtype table; atomic file writes.
- `cli/`       — the `p2pmodel` command line (porcelain over everything).

`p2pmodel.protocols` (source in `protocols/`) is the pure wire layer; `p2pmodel.daemon`
(source in `daemon/`) is the asyncio node. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
