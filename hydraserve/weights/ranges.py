"""Plan the byte ranges that fetch a set of tensors: coalesced runs, split into GET chunks.

Pure planning, no I/O. Callers: the S3 tensor source (this process) and loaderd (which
fetches the same chunks into shared memory). A *run* is a stretch of tensors that are
contiguous in one file and in streaming order (the embeddings, layer 0, layer 1, ... as far
as the file keeps that order), up to ``chunk_bytes`` (a larger tensor is a run of its own); one
buffer holds a run and its tensors become ready together. A *chunk* is one ranged GET of at most ``chunk_bytes`` inside a run. Runs come in
streaming order (embeddings, layer 0, 1, ..., head), so a loader can start on layer 0 while
later layers download. Never a byte that no requested tensor needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hydraserve.weights.layout import order_for_streaming, stream_rank
from hydraserve.weights.safetensors_format import TensorEntry, TensorLocation

MiB = 1024 * 1024


@dataclass(frozen=True)
class FetchRun:
    """Tensors contiguous in ``file`` occupying bytes [start, end)."""

    file: str
    start: int
    end: int
    tensors: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FetchChunk:
    """One ranged GET: bytes [start, end) of run ``run`` (absolute offsets in its file)."""

    run: int
    start: int
    end: int


def _may_follow(previous: str, name: str) -> bool:
    """Whether ``name`` may share a run with ``previous`` (just before it in the file): same
    streaming group, or the next one (embeddings -> layer 0, layer i -> layer i + 1), so a run
    never makes a later layer wait for an unrelated one."""
    a, b = stream_rank(previous), stream_rank(name)
    return b == a or (b == (1, 0) and a[0] == 0) or (a[0] == b[0] == 1 and b[1] == a[1] + 1)


def plan_fetch(locations: Iterable[TensorLocation], chunk_bytes: int = 16 * MiB
               ) -> tuple[list[FetchRun], list[FetchChunk]]:
    """Runs (streaming order) and the chunks that fetch them, in the order to issue them."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    by_file: dict[str, list[TensorEntry]] = {}
    for loc in locations:
        by_file.setdefault(loc.file, []).append(loc.entry)
    runs: list[FetchRun] = []
    for file, entries in by_file.items():
        entries.sort(key=lambda e: e.start)
        current: list[TensorEntry] = []
        for entry in entries:
            if current and (entry.start != current[-1].end
                            or not _may_follow(current[-1].name, entry.name)
                            or entry.end - current[0].start > chunk_bytes):
                runs.append(FetchRun(file, current[0].start, current[-1].end, tuple(current)))
                current = []
            current.append(entry)
        if current:
            runs.append(FetchRun(file, current[0].start, current[-1].end, tuple(current)))
    ordered = order_for_streaming([_RunName(r) for r in runs])
    runs = [r.run for r in ordered]
    chunks = [FetchChunk(i, a, min(a + chunk_bytes, run.end))
              for i, run in enumerate(runs) for a in range(run.start, run.end, chunk_bytes)]
    return runs, chunks


@dataclass(frozen=True)
class _RunName:
    """A run seen by order_for_streaming through its first tensor's name."""

    run: FetchRun

    @property
    def name(self) -> str:
        return self.run.tensors[0].name
