"""A small internet in network namespaces: public peers on a shared "WAN", homes behind NAT routers.

    lab = NatLab.build(homes=2, publics=1)     # needs root, `ip` and `iptables`
    lab.popen("home1", [...])                  # a process inside home1's namespace
    lab.teardown()                             # removes every namespace it made

Layout (every name carries a per-run tag, so two runs never share a namespace):

    pub1 11.0.0.11 ─┐
    pub2 11.0.0.12 ─┤ bridge in "wan" ├─ 11.0.0.101 router1 10.1.0.1 ── 10.1.0.2 home1
                    │                 └─ 11.0.0.102 router2 10.2.0.1 ── 10.2.0.2 home2

- The WAN uses 11.0.0.0/24: a public range, so that libp2p treats the public peers' addresses
  as public (it will not build relay addresses on private ones), and no namespace has any link
  to the host's network, so nothing can leave the lab whatever address a process dials.
- A router masquerades what its home sends to the WAN (`iptables -t nat ... MASQUERADE`) and
  drops every connection the WAN opens towards the home: a home can dial out, never be dialled.
- Unknown destinations are blackholed (silently dropped), as on the internet, where dialling
  another home's private address times out rather than failing at once.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable, TypeVar

__all__ = ["NatLab", "lab_problem"]

WAN_PREFIX = "11.0.0"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def lab_problem() -> str:
    """Why a lab cannot be built here ("" when it can): not root, a tool missing, no netns."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    import shutil

    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install -y iproute2 iptables)"
    name = f"p2pn-probe-{uuid.uuid4().hex[:6]}"
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "netns", "exec", name, "iptables", "-t", "nat", "-S")
    except RuntimeError as e:
        return f"network namespaces or iptables do not work here: {e}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return ""


@dataclass
class NatLab:
    """The namespaces of one run. Build with `NatLab.build(...)`; always `teardown()`."""

    tag: str
    homes: list[str] = field(default_factory=list)  # "home1", ... (each behind its own router)
    publics: list[str] = field(default_factory=list)  # "pub1", ...
    _made: list[str] = field(default_factory=list)  # namespaces created, in order

    @classmethod
    def build(cls, *, homes: int, publics: int) -> "NatLab":
        lab = cls(tag=uuid.uuid4().hex[:6])
        try:
            lab._build(homes, publics)
        except BaseException:
            lab.teardown()
            raise
        return lab

    def ns(self, host: str) -> str:
        """The namespace name of `host` ("pub1", "home2", "router2", "wan")."""
        return f"p2pn{self.tag}-{host}"

    def address(self, host: str) -> str:
        """The IPv4 address `host` has on its own network."""
        kind, n = host.rstrip("0123456789"), int(host[len(host.rstrip("0123456789")) :])
        if kind == "pub":
            return f"{WAN_PREFIX}.{10 + n}"
        if kind == "home":
            return f"10.{n}.0.2"
        raise ValueError(host)

    def public_address(self, host: str) -> str:
        """Where the WAN sees `host`'s connections come from (its router's address for a home)."""
        return self.address(host) if host.startswith("pub") else f"{WAN_PREFIX}.{100 + int(host[4:])}"

    def popen(self, host: str, args: list[str], **kwargs) -> subprocess.Popen:
        """Start `args` inside `host`'s namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *args], **kwargs)

    def call_in(self, host: str, fn: Callable[[], T]) -> T:
        """Run `fn` in a thread whose sockets live in `host`'s namespace (to reach a node's
        status API on its own 127.0.0.1). Network namespaces are per thread in Linux."""
        out: dict = {}

        def target() -> None:
            try:
                fd = os.open(f"/run/netns/{self.ns(host)}", os.O_RDONLY)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                out["value"] = fn()
            except BaseException as e:  # handed to the caller's thread
                out["error"] = e

        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def teardown(self) -> None:
        """Delete every namespace this lab made (their veths go with them). Idempotent."""
        while self._made:
            subprocess.run(["ip", "netns", "delete", self._made.pop()], capture_output=True)

    # ------------------------------------------------------------------------------ building

    def _add(self, host: str) -> str:
        name = self.ns(host)
        _run("ip", "netns", "add", name)
        self._made.append(name)
        self._in(host, "ip", "link", "set", "lo", "up")
        return name

    def _in(self, host: str, *cmd: str) -> None:
        _run("ip", "netns", "exec", self.ns(host), *cmd)

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        """A cable between `a`'s interface `a_if` and `b`'s `b_if`."""
        tmp_a, tmp_b = f"v{self.tag}{uuid.uuid4().hex[:4]}a", f"v{self.tag}{uuid.uuid4().hex[:4]}b"
        _run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _run("ip", "link", "set", tmp_a, "netns", self.ns(a))
        _run("ip", "link", "set", tmp_b, "netns", self.ns(b))
        self._in(a, "ip", "link", "set", tmp_a, "name", a_if)
        self._in(b, "ip", "link", "set", tmp_b, "name", b_if)
        self._in(a, "ip", "link", "set", a_if, "up")
        self._in(b, "ip", "link", "set", b_if, "up")

    def _build(self, homes: int, publics: int) -> None:
        self._add("wan")
        self._in("wan", "ip", "link", "add", "br0", "type", "bridge")
        self._in("wan", "ip", "link", "set", "br0", "up")
        for i in range(1, publics + 1):
            host = f"pub{i}"
            self._add(host)
            self._veth(host, "eth0", "wan", f"p{i}")
            self._in("wan", "ip", "link", "set", f"p{i}", "master", "br0")
            self._in(host, "ip", "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            self._in(host, "ip", "route", "add", "blackhole", "default")
            self.publics.append(host)
        for j in range(1, homes + 1):
            home, router = f"home{j}", f"router{j}"
            self._add(router)
            self._add(home)
            self._veth(router, "wan0", "wan", f"r{j}")
            self._in("wan", "ip", "link", "set", f"r{j}", "master", "br0")
            self._veth(router, "lan0", home, "eth0")
            self._in(router, "ip", "addr", "add", f"{self.public_address(home)}/24", "dev", "wan0")
            self._in(router, "ip", "addr", "add", f"10.{j}.0.1/24", "dev", "lan0")
            self._in(router, "ip", "route", "add", "blackhole", "default")
            self._in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self._in(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE")
            self._in(router, "iptables", "-A", "FORWARD", "-i", "wan0", "-o", "lan0",
                     "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
            self._in(router, "iptables", "-A", "FORWARD", "-i", "wan0", "-o", "lan0", "-j", "DROP")
            self._in(home, "ip", "addr", "add", f"{self.address(home)}/24", "dev", "eth0")
            self._in(home, "ip", "route", "add", "default", "via", f"10.{j}.0.1")
            self.homes.append(home)
