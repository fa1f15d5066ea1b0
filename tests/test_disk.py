"""A full disk pauses a node's training, not the node (daemon/disk.py): the watch's rule."""

from __future__ import annotations

import errno

from p2pmodel.daemon.disk import DiskWatch, is_disk_full_error


class FakeDisk:
    """Free bytes the test sets; shutil.disk_usage's shape."""

    def __init__(self, free: int):
        self.free = free

    def __call__(self, path: str):
        from p2pmodel.daemon.disk import _Usage

        return _Usage(10**12, 10**12 - self.free, self.free)


def test_under_min_free_the_disk_is_full_and_it_clears_only_with_room_to_spare():
    disk = FakeDisk(10_000)
    w = DiskWatch("/x", 1_000, usage=disk)
    assert not w.check() and not w.full
    disk.free = 999
    assert w.check() and w.full and w.status()["free_bytes"] == 999 and "999 bytes free" in w.reason
    disk.free = 1_200  # above min_free but not by half again: stays full (no flapping)
    assert not w.check() and w.full
    disk.free = 1_500
    assert w.check() and not w.full and w.status()["since"] is None


def test_enospc_from_a_write_marks_the_disk_full_other_errors_do_not():
    w = DiskWatch("/x", 1_000, usage=FakeDisk(10**9))
    assert not w.on_error(PermissionError(errno.EACCES, "denied"))
    assert not w.full
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("commit failed") from e
    except RuntimeError as wrapped:
        assert is_disk_full_error(wrapped)
        assert w.on_error(wrapped) and w.full and "No space left" in w.reason
