"""loaderd's budget against the tmpfs it writes to (issue 22 item 7): segments are sparse, so a
budget larger than the tmpfs's free space let loaderd create segments the tmpfs could not hold,
and the first write past a full tmpfs killed it with SIGBUS (exit 135). Now a segment is only
created where the tmpfs has room for it beside what the others have yet to fill. A real tmpfs of
8 MiB is mounted for the test (root: the CI runs as root, as the namespace tests need)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydraserve.contracts.tensors import TensorEntry
from hydraserve.errors import OverloadedError
from hydraserve.loaderd.registry import Registry
from hydraserve.weights.segment import plan_layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
MIB = 1 << 20


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "shm"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def layout(name: str, nbytes: int):  # type: ignore[no-untyped-def]
    return plan_layout(f"key-{name}", "g0", [TensorEntry(name, "U8", (nbytes,), "model.safetensors", 0, nbytes)])


def test_a_segment_the_tmpfs_cannot_hold_is_refused_not_a_sigbus(small_tmpfs: Path) -> None:
    registry = Registry("node0", 64 * MIB, shm_dir=str(small_tmpfs))  # the budget says 64 MiB fit
    first = layout("a", 5 * MIB)
    _lease, _segs, created = registry.acquire("s3://models/a", "key-a", [("seg-a", 0, "g0", first)], pin_s=60, pid=None)
    with pytest.raises(OverloadedError, match="has room for"):  # 5 MiB not yet written count as taken
        registry.acquire("s3://models/b", "key-b", [("seg-b", 0, "g0", layout("b", 5 * MIB))], pin_s=60, pid=None)
    created[0].writer.write(first.data_offset, b"\x01" * (5 * MIB))  # fills without a SIGBUS
    small = layout("c", 1 * MIB)
    registry.acquire("s3://models/c", "key-c", [("seg-c", 0, "g0", small)], pin_s=60, pid=None)  # what fits still does
    registry.close()
