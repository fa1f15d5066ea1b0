"""The root of p2pmodel's error hierarchy.

Every error raised on purpose derives from `P2PModelError`, so the command line can turn it
into a one-line message and an exit code instead of a traceback. Subclasses live next to
the code that raises them (lineage errors in `p2pmodel.lineage`, merge errors in
`p2pmodel.merge`, wire errors in `p2pmodel.protocols`) and carry fields, not just prose.
"""

from __future__ import annotations

__all__ = ["P2PModelError", "UsageError"]


class P2PModelError(Exception):
    """Base of every error p2pmodel raises on purpose. `exit_code` is what the CLI returns."""

    exit_code: int = 1


class UsageError(P2PModelError):
    """The user asked for something that cannot be done as asked (bad flag combination, bad value)."""

    exit_code = 2
