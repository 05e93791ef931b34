"""Measurements shared by the benchmarks: machine CPU saturation, a process's memory and the
object store's own throughput (the figures every result is reported beside)."""

from __future__ import annotations

import time
from typing import Any


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} has no VmRSS (gone?)")


class CpuMeter:
    """Fraction of the machine's cores busy since it was made (every emulated node shares them)."""

    def __init__(self) -> None:
        self._start = _cpu_times()

    def busy(self) -> float:
        busy, total = (now - then for now, then in zip(_cpu_times(), self._start, strict=True))
        return round(busy / total, 3) if total else 0.0


def store_throughput(s3_client: Any, uri: str) -> tuple[float, int]:
    """MB/s of whole-file GETs of the model's safetensors, one after another (the store's own
    rate, from this process), and the bytes read."""
    from hydraserve.weights.model_files import open_model
    from hydraserve.weights.s3_uri import parse_s3_uri

    files = open_model(uri, client=s3_client)
    location = parse_s3_uri(uri)
    total, start = 0, time.perf_counter()
    for name in files.safetensors_files():
        obj = location.child(name)
        total += len(s3_client.get_object_bytes(obj.bucket, obj.key))
    return total / (time.perf_counter() - start) / 1e6, total
