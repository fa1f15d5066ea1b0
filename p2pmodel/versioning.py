"""The version a round commits: a pure function of its base version and the merged deltas.

Every honest peer runs `build_round_version` on the same inputs and must derive the same
version id, so everything that goes into the id comes from the arguments (never a clock or
the local machine): parents, tensors after the outer step, the outer momentum, the round's
time and proposer, the merge spec (method, parameters, deltas with weights, members,
proposal hash, outer optimizer) and the contributors (peers whose deltas were merged).

The daemon decodes the deltas (the wire codec lives in `p2pmodel.protocols`, which the core
does not import) and hands them here; this module does the arithmetic and the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from p2pmodel.lineage import LineageStore, Version
from p2pmodel.merge import METHODS, merge_deltas
from p2pmodel.screening import DeltaScreen, screen_deltas
from p2pmodel.training import TrainingError, outer_step

__all__ = [
    "Contribution",
    "RoundSpec",
    "OuterOptimizer",
    "RoundMerge",
    "merge_contributions",
    "merge_round",
    "version_of_merge",
    "build_round_version",
]


@dataclass(frozen=True)
class Contribution:
    """One peer's decoded delta and its weight in the merge (samples, capped by the proposer)."""

    peer_id: str
    delta_hash: str
    weight: float
    delta: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class OuterOptimizer:
    """The outer step every peer applies to the merged delta (DiLoCo's Nesterov SGD).

    `warmup_rounds`: rounds numbered below it average (lr 1, momentum 0, no momentum stored),
    and the momentum starts from zero at that round: from a random init, outer momentum over the
    first, large deltas costs more than it gives (scripts/sweep_outer, preset outer_warmup).
    """

    lr: float
    momentum: float
    nesterov: bool = True
    warmup_rounds: int = 0

    def at(self, round_: int) -> OuterOptimizer:
        """The step round `round_` takes: plain averaging during the warm-up, else this one."""
        if round_ < self.warmup_rounds:
            return OuterOptimizer(lr=1.0, momentum=0.0, nesterov=self.nesterov)
        return self


@dataclass(frozen=True)
class RoundSpec:
    """What the committed proposal fixes about the version (identical on every peer)."""

    round: int
    base_version: str
    proposer: str
    time: float
    method: str
    members: tuple[str, ...]
    proposal_hash: str
    params: Mapping[str, Any] = field(default_factory=dict)
    # peers the proposal left out of the merge, with the reason: recorded in the version
    excluded: tuple[tuple[str, str], ...] = ()


def merge_contributions(
    method: str, base: Mapping[str, torch.Tensor], contributions: Sequence[Contribution], *, seed: int, params: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Merge the deltas tensor by tensor in float32 (a tensor absent from a delta is zero there).

    Raises:
        TrainingError: no contributions, or the merged delta of a tensor is not finite.
        MergeError: the method is unknown or its parameters do not fit.
    """
    if not contributions:
        raise TrainingError("nothing to merge: the round lists no deltas")
    m = METHODS.get(method)  # an unknown name fails in merge_deltas with its typed error
    weights = [c.weight for c in contributions] if m is not None and m.param("weights") is not None else None
    merged: dict[str, torch.Tensor] = {}
    for name, t in base.items():
        parts = [
            c.delta[name].to(torch.float32) if name in c.delta else torch.zeros_like(t, dtype=torch.float32)
            for c in contributions
        ]
        merged[name] = merge_deltas(method, parts, weights=weights, seed=seed, name=name, **dict(params))
        if not torch.isfinite(merged[name]).all():
            raise TrainingError("the merged delta is not finite", (name,))
    return merged


@dataclass(frozen=True)
class RoundMerge:
    """What the merge of a round produced, before the outer step: the deltas it kept, those the
    screen left out (peer, reason), and the merged delta. `merge_round` computes it from whole
    deltas; a partitioned reduction assembles it from its owners' slices (p2pmodel.partition)."""

    kept: tuple[Contribution, ...]
    screened: tuple[tuple[str, str], ...]
    merged: Mapping[str, torch.Tensor]


def merge_round(
    base: Mapping[str, torch.Tensor],
    spec: RoundSpec,
    contributions: Sequence[Contribution],
    screen: DeltaScreen | None = None,
) -> RoundMerge:
    """Screen `contributions` (p2pmodel.screening) and merge the rest on `base`."""
    screened: list[tuple[str, str]] = []
    if screen is not None:
        result = screen_deltas([c.delta for c in contributions], screen)
        screened = [(contributions[i].peer_id, why) for i, why in result.excluded]
        contributions = [contributions[i] for i in result.kept]
    merged = merge_contributions(spec.method, base, contributions, seed=spec.round, params=spec.params)
    return RoundMerge(tuple(contributions), tuple(screened), merged)


def build_round_version(
    store: LineageStore,
    spec: RoundSpec,
    contributions: Sequence[Contribution],
    outer: OuterOptimizer,
    screen: DeltaScreen | None = None,
) -> tuple[Version, dict[str, torch.Tensor]]:
    """Screen `contributions` (p2pmodel.screening), merge the rest on `spec.base_version`,
    apply the outer step, store the tensors (`merge_round`, then `version_of_merge`).

    Returns `(version, params)`: the version record (not yet indexed: `store.put_version`
    indexes it once a quorum commits it) and its parameters. Deterministic: the same inputs
    give the same id on every machine (float32 CPU arithmetic, fixed order).
    """
    base = store.state_dict(spec.base_version)
    return version_of_merge(store, spec, merge_round(base, spec, contributions, screen), outer, base=base)


def version_of_merge(
    store: LineageStore,
    spec: RoundSpec,
    merge: RoundMerge,
    outer: OuterOptimizer,
    base: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Version, dict[str, torch.Tensor]]:
    """Apply the outer step to `merge` on `spec.base_version` (whose tensors `base` holds if
    given, read from `store` if not), store the tensors, and return `(version, params)` as
    `build_round_version` does."""
    base_version = store.get_version(spec.base_version)
    base = base if base is not None else store.state_dict(spec.base_version)
    contributions, screened, merged = merge.kept, merge.screened, dict(merge.merged)
    outer = outer.at(spec.round)  # what the version records is the step it took
    momentum = {k: store.get_tensor(e) for k, e in base_version.optimizer_state.items()} or None
    new_params, new_momentum = outer_step(base, merged, momentum, lr=outer.lr, mu=outer.momentum, nesterov=outer.nesterov)
    new_params = {k: v.to(base[k].dtype) for k, v in new_params.items()}
    tensors = {k: store.put_tensor(v) for k, v in new_params.items()}
    # momentum 0 never changes: storing zeros every round would only cost disk
    optimizer_state = {k: store.put_tensor(v) for k, v in new_momentum.items()} if outer.momentum else {}
    merge_spec: dict[str, Any] = {
        "method": spec.method,
        "params": dict(spec.params),
        "deltas": [[c.peer_id, c.delta_hash, c.weight] for c in contributions],
        "members": list(spec.members),
        "proposal": spec.proposal_hash,
        "outer": {"lr": outer.lr, "momentum": outer.momentum, "nesterov": outer.nesterov},
    }
    if spec.excluded:
        merge_spec["excluded"] = [[p, why] for p, why in spec.excluded]
    if screened:  # listed by the proposer, left out by the merge's screen (same on every peer)
        merge_spec["screened"] = [[p, why] for p, why in screened]
    version = Version(
        parents=(spec.base_version,),
        tensors=tensors,
        message=f"round {spec.round}: {spec.method} of {len(contributions)} deltas"
        + (f" ({len(screened)} screened out)" if screened else ""),
        time=spec.time,
        author=spec.proposer,
        round=spec.round,
        merge=merge_spec,
        contributors=tuple(c.peer_id for c in contributions),
        files=base_version.files,  # config.json, tokenizer files: a round changes the weights only
        optimizer_state=optimizer_state,
    )
    return version, new_params
