"""The segment format: layout, byte-exact round trip, readiness flags, failure, permissions."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hydraserve.contracts.tensors import TensorEntry
from hydraserve.weights.model_files import LocalModelFiles
from hydraserve.weights.segment import (
    STATE_FAILED,
    SegmentFailedError,
    SegmentReader,
    SegmentWriter,
    plan_layout,
)

from .checkpoints import llama_tensors, write_model


def _tensors(root: Path) -> list[TensorEntry]:
    return list(LocalModelFiles(root).tensor_index().values())


def _fill(writer: SegmentWriter, root: Path) -> None:
    for run in writer.layout.runs:
        with open(root / run.file, "rb") as fh:
            fh.seek(run.file_start)
            writer.write(run.offset, fh.read(run.nbytes))
    for i in range(len(writer.layout.tensors)):
        writer.mark_ready(i)


def test_layout_keeps_file_neighbours_in_one_run_and_alignment() -> None:
    specs = [TensorEntry("a", "F32", (4,), "f", 100, 116), TensorEntry("b", "F32", (2,), "f", 116, 124),
             TensorEntry("c", "F32", (2,), "f", 200, 208), TensorEntry("d", "F32", (1,), "g", 8, 12)]
    layout = plan_layout("k", "grp", specs)
    assert [(r.file, r.file_start, r.file_end) for r in layout.runs] == [("f", 100, 124), ("f", 200, 208),
                                                                         ("g", 8, 12)]
    assert layout.data_offset % 4096 == 0
    for run in layout.runs:
        assert run.offset % 64 == run.file_start % 64
    assert layout.offsets[1] == layout.offsets[0] + 16  # contiguous inside the run


def test_round_trip_byte_exact_and_private(tmp_path: Path, shm_guard: str) -> None:
    root = write_model(tmp_path / "m", llama_tensors(layers=2))
    layout = plan_layout("key", "all", _tensors(root))
    path = f"/dev/shm/hsld-{shm_guard}-x"
    writer = SegmentWriter(layout, path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        _fill(writer, root)
        reader = SegmentReader(path)
        expected = load_file(str(root / "model.safetensors"))
        for i, slot in enumerate(reader.tensors):
            reader.wait_ready(i, timeout_s=1)
            assert bytes(reader.tensor_bytes(i)) == expected[slot.name].contiguous().view(torch.uint8).numpy().tobytes()
        assert reader.group == "all" and reader.model_key == "key"
        assert reader.tensors == layout.tensors and reader.offsets == layout.offsets
        reader.close()
    finally:
        writer.close()
        writer.unlink()


def test_reader_sees_tensor_ready_before_the_rest(tmp_path: Path, shm_guard: str) -> None:
    root = write_model(tmp_path / "m", llama_tensors(layers=1))
    layout = plan_layout("k", "g", _tensors(root))
    path = f"/dev/shm/hsld-{shm_guard}-y"
    writer = SegmentWriter(layout, path)
    reader = SegmentReader(path)
    try:
        first = layout.tensors[0]
        with open(root / first.file, "rb") as fh:
            fh.seek(first.start)
            writer.write(layout.offsets[0], fh.read(first.nbytes))
        writer.mark_ready(0)
        reader.wait_ready(0, timeout_s=1)
        assert reader.flag(1) == 0
        with pytest.raises(TimeoutError):
            reader.wait_ready(1, timeout_s=0.01)
        # a waiting reader is woken by failure instead of hanging
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                reader.wait_ready(1, timeout_s=10)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=wait)
        t.start()
        writer.set_state(STATE_FAILED)
        t.join(5)
        assert len(errors) == 1 and isinstance(errors[0], SegmentFailedError)
        reader.wait_ready(0, timeout_s=1)  # tensors published before the failure stay readable
    finally:
        reader.close()
        writer.close()
        writer.unlink()


def test_reader_rejects_foreign_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 128)
    with pytest.raises(ValueError, match="not a loaderd segment"):
        SegmentReader(str(junk))
