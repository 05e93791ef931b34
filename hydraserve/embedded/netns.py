"""Emulated cluster nodes: one network namespace per node, joined by veth to a bridge in the
root namespace, each node's link capped with tc in both directions.

Used by the loader benchmark and reusable by any other benchmark or demo that needs nodes with
a real bandwidth cap. Needs root and iproute2; ``netns_available()`` says why not otherwise.
Everything the run creates is named after its pid and a random run id and removed on exit, on
exceptions and on SIGTERM; ``cleanup_stale()`` removes what runs whose pid is dead left behind.

    with EmulatedCluster([NodeSpec("n0", rate_mbit=400)]) as cluster:
        node = cluster.nodes["n0"]
        subprocess.run([*node.prefix, "ping", "-c1", cluster.host_ip])
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

NS_PREFIX = "hsn"


@dataclass(frozen=True)
class NodeSpec:
    """A node to emulate: its name and its link cap (None: uncapped veth)."""

    name: str
    rate_mbit: float | None = None
    burst: str = "256kb"
    latency: str = "50ms"


@dataclass
class EmulatedNode:
    """A created node: run commands in it with ``[*node.prefix, cmd...]``."""

    spec: NodeSpec
    netns: str
    ip: str
    veth_host: str
    veth_node: str

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    @property
    def link_mb_s(self) -> float | None:
        """The cap in MB/s (10^6 bytes), as reported next to measured throughputs."""
        return None if self.spec.rate_mbit is None else self.spec.rate_mbit / 8


def netns_available() -> tuple[bool, str]:
    """Whether this process can create namespaces and tc qdiscs, and if not, why."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found (install iproute2)"
    probe = f"{NS_PREFIX}{os.getpid()}probe{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return False, f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, "ok"


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}")


def _quiet(cmd: Sequence[str]) -> None:
    subprocess.run(list(cmd), capture_output=True)


class EmulatedCluster:
    """Nodes behind one bridge; the root namespace (S3, clients) reaches them at ``node.ip``."""

    def __init__(self, specs: Sequence[NodeSpec], *, subnet: str | None = None) -> None:
        if not 1 <= len(specs) <= 200:
            raise ValueError("1..200 nodes")
        if len({s.name for s in specs}) != len(specs):
            raise ValueError("node names must be unique")
        self.specs = list(specs)
        self.run_id = secrets.token_hex(2)
        octet = 16 + int(self.run_id, 16) % 200
        self.subnet = subnet or f"10.{octet}.{int(self.run_id[:2], 16) % 250}"
        self.host_ip = f"{self.subnet}.1"
        self.bridge = f"hsb{self.run_id}"
        self.nodes: dict[str, EmulatedNode] = {}
        self._made_bridge = False
        self._closed = False
        self._old_handlers: dict[int, Any] = {}

    def _ns_name(self, i: int) -> str:
        return f"{NS_PREFIX}{os.getpid()}-{self.run_id}-{i}"

    def start(self) -> EmulatedCluster:
        atexit.register(self.close)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:
                pass  # not the main thread: atexit and the context manager still clean up
        try:
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            self._made_bridge = True
            _run(["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            for i, spec in enumerate(self.specs):
                self._add_node(i, spec)
        except BaseException:
            self.close()
            raise
        return self

    def _add_node(self, i: int, spec: NodeSpec) -> None:
        ns = self._ns_name(i)
        host_end, node_end = f"hsv{self.run_id}{i}h", f"hsv{self.run_id}{i}n"
        node = EmulatedNode(spec, ns, f"{self.subnet}.{10 + i}", host_end, node_end)
        _run(["ip", "netns", "add", ns])
        self.nodes[spec.name] = node
        _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end])
        _run(["ip", "link", "set", node_end, "netns", ns])
        _run(["ip", "link", "set", host_end, "master", self.bridge])
        _run(["ip", "link", "set", host_end, "up"])
        _run([*node.prefix, "ip", "addr", "add", f"{node.ip}/24", "dev", node_end])
        _run([*node.prefix, "ip", "link", "set", node_end, "up"])
        _run([*node.prefix, "ip", "link", "set", "lo", "up"])
        if spec.rate_mbit is not None:
            tbf = ["tbf", "rate", f"{spec.rate_mbit}mbit", "burst", spec.burst, "latency", spec.latency]
            # downloads into the node leave the bridge through host_end; uploads leave node_end
            _run(["tc", "qdisc", "add", "dev", host_end, "root", *tbf])
            _run([*node.prefix, "tc", "qdisc", "add", "dev", node_end, "root", *tbf])

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A second signal (`timeout` forwards the one it got, pkill hits both) must not cut the
        # teardown short by raising SystemExit from inside it: ignore them until it is done.
        for other in self._old_handlers:
            signal.signal(other, signal.SIG_IGN)
        self.close()
        previous = self._old_handlers.get(signum)
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    def close(self) -> None:
        """Remove the namespaces (their veths go with them) and the bridge. Idempotent, and
        done to the end by whichever call gets there (a signal arriving meanwhile runs it again
        from its handler, every step of which may be repeated)."""
        if self._closed:
            return
        for node in self.nodes.values():
            pids = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _quiet(["ip", "link", "del", node.veth_host])
            _quiet(["ip", "netns", "del", node.netns])
        if self._made_bridge:
            _quiet(["ip", "link", "del", self.bridge])
        for signum, handler in self._old_handlers.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, TypeError):
                pass
        self._closed = True
        atexit.unregister(self.close)

    def __enter__(self) -> EmulatedCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass
class StaleReport:
    namespaces: list[str] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)


def cleanup_stale() -> StaleReport:
    """Remove namespaces (and bridges) of runs whose creating process no longer exists."""
    report = StaleReport()
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    live_runs: set[str] = set()
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-([0-9a-f]{{4}})-\d+", name)
        if not m:
            continue
        if os.path.exists(f"/proc/{m.group(1)}"):
            live_runs.add(m.group(2))
            continue
        _quiet(["ip", "netns", "del", name])
        report.namespaces.append(name)
    links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    for m in re.finditer(r"^\d+: (hsb([0-9a-f]{4}))[:@]", links, re.M):
        if m.group(2) not in live_runs:
            has_ports = subprocess.run(["ip", "-o", "link", "show", "master", m.group(1)],
                                       capture_output=True, text=True).stdout.strip()
            if not has_ports:
                _quiet(["ip", "link", "del", m.group(1)])
                report.bridges.append(m.group(1))
    return report


if __name__ == "__main__":
    print(cleanup_stale())
