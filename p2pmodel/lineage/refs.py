"""Ref names and revision expressions, as git users write them.

A ref is a branch (`refs/heads/<name>`) or a tag (`refs/tags/<name>`); short names mean
branches where a ref is set, and are looked up as branch then tag where one is read.
`HEAD` names the current branch (kept in the index). Refs only move by compare-and-swap
(`LineageStore.set_ref(name, new, old)`), like dulwich's `set_if_equals`.

A revision is a base followed by ancestry suffixes, read left to right:

    <base>   := HEAD | <64-hex id> | <branch> | <tag> | refs/heads/<b> | refs/tags/<t> | <hex prefix, >= 4>
    <suffix> := ~<n> (n-th first-parent ancestor; `~` = ~1) | ^<n> (n-th parent; `^` = ^1, ^0 = itself)

e.g. `main~3`, `HEAD^2`, `v1.0~2^2~1`, `3f9a1c^`.
"""

from __future__ import annotations

import re

from p2pmodel.lineage.objects import LineageError

__all__ = [
    "RefError",
    "RefNotFound",
    "AmbiguousRef",
    "RefConflict",
    "InvalidRefName",
    "BRANCH_PREFIX",
    "TAG_PREFIX",
    "MIN_PREFIX",
    "full_ref_name",
    "short_ref_name",
    "check_ref_name",
    "parse_revision",
]

BRANCH_PREFIX = "refs/heads/"
TAG_PREFIX = "refs/tags/"
MIN_PREFIX = 4  # shortest hex prefix accepted as an abbreviated id

_SUFFIX = re.compile(r"([~^])(\d*)")
# git's check-ref-format, simplified: no control chars, spaces, ~^:?*[\, no '..', no '@{', not ending in '.lock' or '/'
_BAD_NAME = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|^/|/$|//|\.lock$|^\.|/\.")


class RefError(LineageError):
    """A revision or ref name that cannot be used as asked."""


class RefNotFound(RefError):
    """No version matches the revision."""

    def __init__(self, ref: str, reason: str = "no such version, branch or tag"):
        self.ref = ref
        self.reason = reason
        super().__init__(f"cannot resolve {ref!r}: {reason}")


class AmbiguousRef(RefError):
    """An abbreviated id matches several versions."""

    def __init__(self, ref: str, candidates: list[str]):
        self.ref = ref
        self.candidates = sorted(candidates)
        shown = ", ".join(c[:12] for c in self.candidates[:8])
        more = f" and {len(self.candidates) - 8} more" if len(self.candidates) > 8 else ""
        super().__init__(f"{ref!r} is ambiguous: it matches {shown}{more}; use more digits")


class RefConflict(RefError):
    """A compare-and-swap found the ref somewhere other than where the caller expected."""

    def __init__(self, name: str, expected: str | None, actual: str | None):
        self.name = name
        self.expected = expected
        self.actual = actual
        super().__init__(f"ref {name} moved: expected {expected or '(absent)'}, found {actual or '(absent)'}")


class InvalidRefName(RefError):
    """A name that cannot be a branch or tag."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"{name!r} is not a valid branch or tag name")


def check_ref_name(name: str) -> None:
    """Raise InvalidRefName unless `name` (full or short) is acceptable as a ref name."""
    short = short_ref_name(name)
    if not short or short == "HEAD" or _BAD_NAME.search(short):
        raise InvalidRefName(name)


def full_ref_name(name: str, default_prefix: str = BRANCH_PREFIX) -> str:
    """`refs/...` names are kept; a short name gets `default_prefix` (a branch by default)."""
    return name if name.startswith("refs/") else default_prefix + name


def short_ref_name(name: str) -> str:
    """`refs/heads/main` -> `main`, `refs/tags/v1` -> `v1`; other names are returned as is."""
    for prefix in (BRANCH_PREFIX, TAG_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def parse_revision(rev: str) -> tuple[str, list[tuple[str, int]]]:
    """Split a revision into its base and suffix operations: `main~2^2` -> ("main", [("~", 2), ("^", 2)]).

    Raises RefNotFound on an empty base or malformed suffix.
    """
    rev = rev.strip()
    cut = len(rev)
    for i, ch in enumerate(rev):
        if ch in "~^":
            cut = i
            break
    base, rest = rev[:cut], rev[cut:]
    if not base:
        raise RefNotFound(rev, "empty revision")
    ops: list[tuple[str, int]] = []
    pos = 0
    while pos < len(rest):
        m = _SUFFIX.match(rest, pos)
        if not m:
            raise RefNotFound(rev, f"malformed suffix {rest[pos:]!r}")
        ops.append((m.group(1), int(m.group(2)) if m.group(2) else 1))
        pos = m.end()
    return base, ops
