"""The gateway under a burst: N concurrent requests to a function at zero (one cold start), then
a warm phase through the gateway and straight to the worker, side by side.

`hydraserve up` runs in its own process (the gateway and everything else, as a user runs it;
a small generated model so the worker is not what is measured); this process is the clients
(aiohttp, one connection per request). Printed: requests answered by status, the burst's wall
time, the gateway's /healthz p50/p99 while the burst waits and drains, memory per waiting
request (the `up` process's RSS growth over the most requests seen waiting at once: an upper
bound, it also holds the embedded S3 server), warm throughput through the gateway vs direct
(the same concurrency, six short rounds alternated, the median of their ratios), the latency the gateway adds (p50/p99 of sequential
one-token requests, gateway minus direct, interleaved), and CPU saturation (client, gateway and worker share
the 2 cores). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from measure import CpuMeter, rss_mb

FUNCTION = "bench"
ROUNDS = 6  # warm throughput: rounds, each through the gateway then direct
BODY = {"model": FUNCTION, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
ADMIN_TOKEN = secrets.token_urlsafe(24)  # given to `up` (HYDRASERVE_GATEWAY_TOKEN)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TINY = {"arch": "llama", "layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 256,
        "vocab": 2048, "dtype": "float32"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=10_000, help="concurrent requests sent to the function at zero")
    parser.add_argument("--warm-requests", type=int, default=3000, help="requests each way in the warm throughput rounds")
    parser.add_argument("--latency-requests", type=int, default=500, help="sequential requests per latency run")
    parser.add_argument("--concurrency", type=int, default=32, help="the function's per-instance concurrency")
    parser.set_defaults(func=run)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def burst(session: Any, gateway: str, n: int, pid: int) -> dict[str, Any]:
    """n requests at once; /healthz probed every 20 ms and RSS sampled until they are answered."""
    url = f"{gateway}/v1/completions"
    statuses: Counter[str] = Counter()

    async def one() -> None:
        try:
            async with session.post(url, json=BODY) as r:
                await r.read()
                statuses[str(r.status)] += 1
        except Exception as exc:
            statuses[type(exc).__name__] += 1

    base_rss = rss_mb(pid)
    start = time.perf_counter()
    tasks = [asyncio.create_task(one()) for _ in range(n)]
    probes: list[float] = []
    peak_waiting, peak_rss = 0, base_rss
    done = asyncio.gather(*tasks)
    while not done.done():
        t0 = time.perf_counter()
        try:
            async with session.get(f"{gateway}/healthz") as r:
                await r.read()
            probes.append(time.perf_counter() - t0)
        except Exception:
            probes.append(float("inf"))
        async with session.get(f"{gateway}/v1/functions", headers=ADMIN) as r:
            (fn,) = (await r.json())["functions"]
        if fn["waiting"] > peak_waiting:
            peak_waiting, peak_rss = fn["waiting"], rss_mb(pid)
        await asyncio.sleep(0.02)
    await done
    wall = time.perf_counter() - start
    return {"answered_by_status": dict(statuses), "lost": n - statuses.get("200", 0), "burst_wall_s": round(wall, 2),
            "healthz_p50_ms": round(percentile(probes, 0.5) * 1000, 2),
            "healthz_p99_ms": round(percentile(probes, 0.99) * 1000, 2), "healthz_probes": len(probes),
            "peak_waiting": peak_waiting,
            "kb_per_waiting_request": round((peak_rss - base_rss) * 1024 / peak_waiting, 2) if peak_waiting else None}


async def throughput(session: Any, url: str, n: int, concurrency: int) -> float:
    """Requests per second of n requests, concurrency at a time."""
    queue = iter(range(n))

    async def worker() -> None:
        for _ in queue:
            async with session.post(url, json=BODY) as r:
                await r.read()
                assert r.status == 200, r.status

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


async def latencies(session: Any, urls: list[str], n: int) -> list[list[float]]:
    """Seconds of n sequential one-token requests to each URL, interleaved (one to each in turn,
    so the machine's noise falls on all of them alike)."""
    body = BODY | {"max_tokens": 1}
    out: list[list[float]] = [[] for _ in urls]
    for _ in range(n):
        for url, times in zip(urls, out, strict=True):
            t0 = time.perf_counter()
            async with session.post(url, json=body) as r:
                await r.read()
            times.append(time.perf_counter() - t0)
    return out


async def measure(args: argparse.Namespace, gateway: str, pid: int) -> dict[str, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        result = await burst(session, gateway, args.requests, pid)
        async with session.get(f"{gateway}/v1/functions", headers=ADMIN) as r:
            (fn,) = (await r.json())["functions"]
        result["cold_starts"] = fn["cold_starts"]
        direct = fn["instances"][0]["url"] + "/v1/completions"
        through = f"{gateway}/v1/completions"
        rates: dict[str, list[float]] = {"gateway": [], "direct": []}
        per_round = max(1, args.warm_requests // ROUNDS)
        for _ in range(ROUNDS):  # short rounds, alternated: the machine's noise hits both alike
            rates["gateway"].append(await throughput(session, through, per_round, args.concurrency))
            rates["direct"].append(await throughput(session, direct, per_round, args.concurrency))
        via_gateway, straight = await latencies(session, [through, direct], args.latency_requests)
    gw_rps, direct_rps = statistics.median(rates["gateway"]), statistics.median(rates["direct"])
    ratios = [g / d for g, d in zip(rates["gateway"], rates["direct"], strict=True)]
    return result | {
        "warm_rps_gateway": round(gw_rps, 1), "warm_rps_direct": round(direct_rps, 1),
        "warm_throughput_ratio": round(statistics.median(ratios), 3),  # median of the rounds' ratios
        "warm_throughput_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "latency_direct_p50_ms": round(percentile(straight, 0.5) * 1000, 2),
        "added_latency_p50_ms": round((percentile(via_gateway, 0.5) - percentile(straight, 0.5)) * 1000, 2),
        "added_latency_p99_ms": round((percentile(via_gateway, 0.99) - percentile(straight, 0.99)) * 1000, 2)}


def admin_answers(url: str) -> bool:
    import requests

    try:
        return requests.get(f"{url}/v1/functions", headers=ADMIN, timeout=1).ok
    except requests.RequestException:
        return False


def run(args: argparse.Namespace) -> int:
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model
    from hydraserve.processes import ChildProcess, free_port, hydraserve_command, raise_open_files_limit

    raise_open_files_limit()
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    model = make_tiny_model(work / "model", TinySpec(**TINY))
    port = free_port()
    up = ChildProcess("up", hydraserve_command(
        "up", "--nodes", "1", "--port", str(port), "--function", FUNCTION, "--model-dir", str(model),
        "--idle-timeout", "3600", "--max-instances", "1", "--concurrency", str(args.concurrency),
        "--request-timeout", "900"), log_path=work / "up.log", env={"HYDRASERVE_GATEWAY_TOKEN": ADMIN_TOKEN})
    gateway = f"http://127.0.0.1:{port}"
    try:
        up.wait_until(lambda: admin_answers(gateway), 300)
        print(f"up; {args.requests} requests to {FUNCTION} at zero...", file=sys.stderr, flush=True)
        cpu = CpuMeter()
        result = asyncio.run(measure(args, gateway, up.proc.pid))
        result |= {"benchmark": "gateway", "requests": args.requests, "cpu_busy": cpu.busy(), "cpus": os.cpu_count()}
    except BaseException:
        print(f"up's log kept in {work}", file=sys.stderr)
        up.stop(grace_s=60)
        raise
    up.stop(grace_s=60)
    shutil.rmtree(work, ignore_errors=True)  # kept only when the run failed
    print(json.dumps(result), flush=True)
    return 0 if result["lost"] == 0 else 1
