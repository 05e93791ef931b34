"""`hydraserve bench loaderd-startup`: how fast a node's loader daemon starts and how much memory
it holds: the time from spawning `hydraserve loaderd` until /healthz answers, its resident set
once up, and whether torch is mapped into it (a byte mover needs none). Medians over
``--repeats`` daemons; one JSON object last. Stdlib only: the daemon is measured, not this."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="daemons to start, one after another")
    parser.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_one(index: int) -> dict[str, float | bool]:
    fd, token_file = tempfile.mkstemp(prefix="loaderd-bench-token-")
    os.write(fd, b"b" * 32)
    os.close(fd)
    port = _free_port()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "hydraserve.cli", "loaderd", "--port", str(port),
                             "--token-file", token_file, "--budget-bytes", str(1 << 30),
                             "--node-name", f"startup{os.getpid()}x{index}", "--endpoint-url", "http://127.0.0.1:9"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"loaderd exited with code {proc.returncode}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.2).read()
                break
            except OSError:
                time.sleep(0.005)
        up_s = time.monotonic() - started
        time.sleep(0.3)  # settled: nothing more is imported on the idle path
        status = open(f"/proc/{proc.pid}/status").read()
        rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
        torch = "libtorch" in open(f"/proc/{proc.pid}/maps").read()
        return {"startup_s": up_s, "rss_mb": rss_kb / 1024, "torch": torch}
    finally:
        proc.terminate()
        proc.wait(10)
        os.unlink(token_file)


def run(args: argparse.Namespace) -> int:
    runs = [start_one(i) for i in range(args.repeats)]
    for r in runs:
        print(f"up in {r['startup_s']:.3f} s, {r['rss_mb']:.1f} MB resident, torch {'mapped' if r['torch'] else 'absent'}",
              file=sys.stderr)
    print(json.dumps({"benchmark": "loaderd_startup",
                      "startup_s": round(statistics.median(float(r["startup_s"]) for r in runs), 3),
                      "rss_mb": round(statistics.median(float(r["rss_mb"]) for r in runs), 1),
                      "torch_imported": any(bool(r["torch"]) for r in runs),
                      "runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs]}))
    return 0
