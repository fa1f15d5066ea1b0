"""Version control for models: git's object model, for tensors.

- `objects.py`     — object types and canonical bytes: tensor and file blobs, `Version`
                     records (id = sha256 of header + canonical msgpack), `TensorEntry`,
                     `Annotations` (metrics + certificate, outside the id), `tensor_oid`.
- `store.py`       — `LineageStore`: objects on disk (atomic writes, verified reads), commit,
                     resolve, log/children queries; ObjectMissing / ObjectCorrupt.
- `refs.py`        — ref names and revision syntax (`main~3`, `HEAD^2`, prefixes); ref errors.
- `index.py`       — the SQLite index: versions, parent edges, refs, HEAD, annotations.
- `maintenance.py` — `verify` (fsck), `gc`, and `free_pruned` (objects only pruned versions need).
- `retention.py`   — which versions keep their tensors (`RetentionPolicy`, `plan_pruning`, pure)
                     and `apply_retention`; pruned versions keep record, annotations, certificate.

See docs/ARCHITECTURE.md ("p2pmodel.lineage") for the contract.
"""

from p2pmodel.lineage.index import ANY, VersionInfo
from p2pmodel.lineage.objects import (
    DTYPES,
    Annotations,
    InvalidObject,
    LineageError,
    TensorEntry,
    UnsupportedDtype,
    Version,
    tensor_oid,
)
from p2pmodel.lineage.refs import AmbiguousRef, InvalidRefName, RefConflict, RefError, RefNotFound
from p2pmodel.lineage.maintenance import GcRefused, GcReport, Problem, RepairReport, VerifyReport
from p2pmodel.lineage.store import (
    LineageStore,
    ObjectCorrupt,
    ObjectMissing,
    PruneRefused,
    RepositoryExists,
    RepositoryNotFound,
    VersionPruned,
)
from p2pmodel.lineage.retention import InvalidRetention, RetentionPolicy, RetentionReport, apply_retention, plan_pruning

__all__ = [
    "ANY",
    "DTYPES",
    "AmbiguousRef",
    "Annotations",
    "GcRefused",
    "GcReport",
    "InvalidObject",
    "InvalidRetention",
    "InvalidRefName",
    "LineageError",
    "LineageStore",
    "ObjectCorrupt",
    "ObjectMissing",
    "Problem",
    "PruneRefused",
    "RefConflict",
    "RefError",
    "RefNotFound",
    "RepairReport",
    "RetentionPolicy",
    "RetentionReport",
    "RepositoryExists",
    "RepositoryNotFound",
    "TensorEntry",
    "UnsupportedDtype",
    "Version",
    "VersionInfo",
    "VerifyReport",
    "VersionPruned",
    "apply_retention",
    "plan_pruning",
    "tensor_oid",
]
