"""Shared fixtures. Child processes started by tests are reaped at the end of the session."""

from __future__ import annotations

import os
import signal

import psutil  # installed with hivemind
import pytest


@pytest.fixture(scope="session", autouse=True)
def reap_children():
    yield
    me = psutil.Process(os.getpid())
    children = me.children(recursive=True)
    for child in children:
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
