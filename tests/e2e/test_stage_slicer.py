"""One stage slicer, three users. For every architecture the parity tests cover and p = 1..4,
on real checkpoints: the stages' tensors cover the model and overlap only where the head is
tied to the embedding; the placement's byte counts are the bytes of those tensors; the runtime
asks for exactly them; and loaderd's segments hold exactly them."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.loader import PrefetchRequest
from hydraserve.loaderd.service import LoaderConfig, LoaderService
from hydraserve.modeltools.tiny import make_tiny_model
from hydraserve.provider.model_spec import spec_of
from hydraserve.provider.stages import balanced_stage_plan, stage_bytes
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.loader import load_stage
from hydraserve.testing.counting_source import CountingSource
from hydraserve.weights.architectures import Part
from hydraserve.weights.layout import head_is_embedding, stage_tensors
from hydraserve.weights.model_files import LocalModelFiles
from hydraserve.weights.segment import SegmentReader
from tests.loaderd.conftest import LocalStores, write_manifest
from tests.variants import VARIANTS

LAYERS = 4  # room for four stages
URI = "s3://models/sliced"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sliced")
    dirs = {name: make_tiny_model(root / name, dataclasses.replace(spec, layers=LAYERS))
            for name, spec in VARIANTS.items()}
    for d in dirs.values():
        write_manifest(d, per_tensor=True)
    return dirs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_user_of_the_slicer_agrees(model_dirs: dict[str, Path], name: str, shm_guard: str) -> None:
    root = model_dirs[name]
    files = LocalModelFiles(root)
    arch, index = files.architecture(), files.tensor_index()
    cfg = ModelConfig.from_hf(files.config())
    spec = spec_of(FunctionConfig(name="sliced", model_uri=URI), files)  # head size 16: vLLM's CPU build refuses it
    unused = {n for n in index if arch.role(n).part is Part.UNUSED}
    tied = head_is_embedding(index, arch)
    service = LoaderService(LoaderConfig(node_name=shm_guard, budget_bytes=256 << 20),
                            open_model=LocalStores({URI: root}))
    try:
        for p in range(1, 5):
            plan = balanced_stage_plan(spec.per_layer_bytes(), spec.embed_bytes, spec.head_bytes, p)
            planned = stage_bytes(spec.per_layer_bytes(), spec.embed_bytes, spec.head_bytes, plan, spec.tied_bytes)
            slices = []
            for st, nbytes in zip(plan.stages, planned, strict=True):
                names = stage_tensors(index, st, arch)
                slices.append(set(names))
                assert len(names) == len(set(names))
                # the placement service counts exactly these bytes
                assert nbytes == sum(index[n].nbytes for n in names), (p, st.index)
                # the runtime asks for exactly these tensors
                source = CountingSource(root)
                load_stage(cfg, source, st)
                assert sorted(source.requested) == sorted(names), (p, st.index)
                # loaderd's segments hold exactly these tensors
                lease = service.prefetch(PrefetchRequest(model_uri=URI, stage=st))
                assert sorted(lease.tensor_names) == sorted(names)
                held = []
                for info in lease.segments:
                    reader = SegmentReader(info.path)
                    held += [t.name for t in reader.tensors]
                    reader.close()
                assert sorted(held) == sorted(names), (p, st.index)
            # together they cover the model; only the tied embedding is held twice (first, last)
            assert set().union(*slices) == set(index) - unused
            for (a, sa), (b, sb) in itertools.combinations(enumerate(slices), 2):
                shared = sa & sb
                if tied and (a, b) == (0, p - 1):
                    assert shared == {f"{arch.family.root}embed_tokens.weight"}
                else:
                    assert not shared, (p, a, b, shared)
            assert sum(planned) == spec.model_size_bytes + (spec.tied_bytes if tied and p > 1 else 0)
    finally:
        for seg in list(service.registry.segments.values()):
            seg.done.wait(10)
        service.close()
