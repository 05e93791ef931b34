"""hydraserve/embedded/netns.py: emulated nodes come up reachable, and every trace goes away on exit,
also when start-up fails half way. Needs root and iproute2 (skipped with the reason otherwise)."""

from __future__ import annotations

import http.server
import subprocess
import threading

import pytest

from hydraserve.embedded.netns import EmulatedCluster, NodeSpec, netns_available

OK, WHY = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not OK, reason=WHY)]


def _leftovers(cluster: EmulatedCluster) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [n for n in (*[node.netns for node in cluster.nodes.values()], cluster.bridge) if n in names + links]


def test_nodes_reach_the_host_and_vanish_on_exit() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    with EmulatedCluster([NodeSpec("a", rate_mbit=100), NodeSpec("b")]) as cluster:
        server = http.server.ThreadingHTTPServer((cluster.host_ip, 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            for node in cluster.nodes.values():
                got = subprocess.run([*node.prefix, "curl", "-sf", f"http://{cluster.host_ip}:{server.server_port}/"],
                                     capture_output=True, text=True, timeout=10)
                assert got.stdout == "ok", got.stderr
            qdisc = subprocess.run(["tc", "qdisc", "show", "dev", cluster.nodes["a"].veth_host],
                                   capture_output=True, text=True).stdout
            assert "tbf" in qdisc and "100Mbit" in qdisc
            assert cluster.nodes["a"].link_mb_s == 12.5 and cluster.nodes["b"].link_mb_s is None
        finally:
            server.shutdown()
            server.server_close()
        assert len(_leftovers(cluster)) == 3
    assert _leftovers(cluster) == []


def test_failed_start_cleans_up() -> None:
    cluster = EmulatedCluster([NodeSpec("a"), NodeSpec("b", rate_mbit=10, burst="bogus")])  # tc rejects it
    with pytest.raises(RuntimeError, match="tc"):
        cluster.start()
    assert _leftovers(cluster) == []


def test_two_sigterms_in_a_row_still_remove_everything() -> None:
    """`timeout` forwards the SIGTERM it gets and pkill hits both: the second signal must not
    cut the teardown short."""
    import os
    import signal
    import sys
    import time

    script = ("import sys, time\n"
              "from hydraserve.embedded.netns import EmulatedCluster, NodeSpec\n"
              "c = EmulatedCluster([NodeSpec(f'n{i}', rate_mbit=50) for i in range(4)]).start()\n"
              "print(' '.join([*(n.netns for n in c.nodes.values()), c.bridge]), flush=True)\n"
              "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    names = child.stdout.readline().split()
    assert len(names) == 5
    os.kill(child.pid, signal.SIGTERM)
    time.sleep(0.005)  # the second lands while the first's teardown runs
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(30) == 128 + signal.SIGTERM
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert [n for n in names if n in listing + links] == []
