"""Which HTTP server should the gateway run on? Park N requests on each candidate, as the
gateway does through a cold start, and measure what a parked request costs and whether
/healthz still answers.

Candidates: waitress + Flask (the gateway before issue 13: a thread per request), aiohttp,
and Starlette on uvicorn (httptools). Each runs in its own process; a parked request awaits
one shared event that ``/release`` sets. Printed per server: RSS per parked request, /healthz
p50/p99 while they are parked, and the time from release to the last answer. uvicorn and
Starlette are not dependencies of the product: ``pip install uvicorn starlette httptools``
to run this. Usage: python benchmarks/gateway_servers.py [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

from measure import rss_mb

from hydraserve.processes import raise_open_files_limit

SERVERS = {
    "aiohttp": """
import asyncio, sys
from aiohttp import web
released = asyncio.Event()
async def park(request):
    await released.wait()
    return web.Response(text="ok")
async def release(request):
    released.set()
    return web.Response(text="released")
async def healthz(request):
    return web.Response(text="ok")
app = web.Application()
app.add_routes([web.get("/park", park), web.get("/release", release), web.get("/healthz", healthz)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, backlog=16384)
""",
    "starlette_uvicorn": """
import asyncio, sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
released = asyncio.Event()
async def park(request):
    await released.wait()
    return PlainTextResponse("ok")
async def release(request):
    released.set()
    return PlainTextResponse("released")
async def healthz(request):
    return PlainTextResponse("ok")
app = Starlette(routes=[Route("/park", park), Route("/release", release), Route("/healthz", healthz)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", http="httptools",
            backlog=16384, limit_concurrency=None)
""",
    "waitress_flask": """
import sys, threading, waitress
from flask import Flask
released = threading.Event()
app = Flask("w")
@app.get("/park")
def park():
    released.wait()
    return "ok"
@app.get("/release")
def release():
    released.set()
    return "released"
@app.get("/healthz")
def healthz():
    return "ok"
waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=32, backlog=16384,
               connection_limit=20000, _quiet=True)
""",
}


async def get(port: int, path: str, timeout: float = 60.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def wait_up(port: int) -> None:
    for _ in range(200):
        try:
            await get(port, "/healthz", 1.0)
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("server did not come up")


async def measure(name: str, n: int, port: int) -> dict[str, object]:
    proc = subprocess.Popen([sys.executable, "-c", SERVERS[name], str(port)])
    try:
        await wait_up(port)
        base = rss_mb(proc.pid)
        parked = [asyncio.create_task(get(port, "/park", 120.0)) for _ in range(n)]
        await asyncio.sleep(3.0)  # every connection accepted and parked
        probes = []
        for _ in range(20):
            t0 = time.perf_counter()
            try:
                await get(port, "/healthz", 5.0)
                probes.append(time.perf_counter() - t0)
            except (TimeoutError, OSError):  # no answer, or the server died (waitress: select() > 1024 fds)
                probes.append(5.0)
        parked_rss = rss_mb(proc.pid) if proc.poll() is None else base
        t0 = time.perf_counter()
        with contextlib.suppress(OSError, TimeoutError):
            await get(port, "/release", 30.0)
        answers = await asyncio.gather(*parked, return_exceptions=True)
        drained = time.perf_counter() - t0
        ok = sum(1 for a in answers if isinstance(a, bytes) and a.startswith(b"HTTP/1.1 200"))
        probes.sort()
        return {"server": name, "requests": n, "answered_200": ok, "server_alive": proc.poll() is None,
                "kb_per_parked_request": round((parked_rss - base) * 1024 / n, 2),
                "healthz_p50_ms": round(statistics.median(probes) * 1000, 2),
                "healthz_p99_ms": round(probes[-1] * 1000, 2), "release_to_last_answer_s": round(drained, 2)}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    raise_open_files_limit()
    results = []
    for i, name in enumerate(SERVERS):
        results.append(asyncio.run(measure(name, args.requests, 18700 + i)))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"servers": results, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
