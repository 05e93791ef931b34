"""What our vLLM load format feeds vLLM (runtime/serving/weight_stream.py), against a real loaderd:
tensors handed over whole, in streaming order, while later ones are still arriving; the daemon
SIGKILLed mid-fetch (the rest comes from S3); a truncated segment refused by name.

The ``load`` here stands in for vLLM's ``model.load_weights`` (it records what it is handed,
when); vLLM's own loading through this format is tested end to end with real workers
(tests/runtime/test_vllm_worker.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

from hydraserve.auth import new_token_file
from hydraserve.contracts.loader import PrefetchRequest
from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.timeline import Timeline
from hydraserve.loaderd.daemon import LoaderDaemon, spawn_loaderd
from hydraserve.loaderd.service import LoaderConfig
from hydraserve.processes import free_port
from hydraserve.runtime.loader_files import LoaderModelFiles
from hydraserve.runtime.serving.weight_stream import stream_weights
from hydraserve.weights.local import LocalTensorSource
from tests.conftest import remove_node_segments
from tests.loaderd.conftest import LocalStores, llama_like, write_manifest, write_model
from tests.loaderd.test_s3 import push

URI = "s3://models/stream"


def expected(local: Path) -> dict[str, torch.Tensor]:
    src = LocalTensorSource(local)
    return {n: src.get(n).clone() for n in src.tensor_names()}


class Recorder:
    """Plays vLLM's load_weights: takes each tensor as handed, copies it, checks it is whole."""

    def __init__(self, want: dict[str, torch.Tensor]) -> None:
        self.want = want
        self.names: list[str] = []
        self.whole: list[bool] = []
        self.lock = threading.Lock()

    def __call__(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        for name, tensor in weights:
            whole = torch.equal(tensor.clone(), self.want[name])  # as vLLM copies it, at once
            with self.lock:
                self.names.append(name)
                self.whole.append(whole)
        return set(self.names)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = write_model(tmp_path / "m", llama_like(layers=4, hidden=64, vocab=256))
    write_manifest(root, per_tensor=True)
    return root


def test_each_tensor_is_handed_over_whole_while_later_layers_are_still_held_back(model_dir: Path, shm_guard: str) -> None:
    stores = LocalStores({URI: model_dir})
    store = stores(URI, None)
    files_index = LocalTensorSource(model_dir)
    gate = threading.Event()
    store.gate = gate  # the reads of layer 3's bytes wait for the gate
    with LoaderDaemon(LoaderConfig(node_name=shm_guard, budget_bytes=64 << 20, concurrency=2, chunk_bytes=4096),
                      "s" * 32, open_model=stores) as d:
        files = LoaderModelFiles(URI, d.url, d.token)
        store.held = {(t.file, t.start) for t in files.tensor_index().values() if "layers.3." in t.name}
        recorder = Recorder(expected(model_dir))
        timeline = Timeline()
        result: list[Any] = []
        loading = threading.Thread(target=lambda: result.append(
            stream_weights(files, StageSpec.whole(4), recorder, timeline)))
        loading.start()
        before = [n for n in files.stage_tensor_names() if "layers.3." not in n and n not in ("model.norm.weight",
                                                                                                 "lm_head.weight")]
        deadline = time.monotonic() + 30
        while len(recorder.names) < len(before) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # give a wrongly eager stream the time to hand over what it must not
        with recorder.lock:
            assert recorder.names == before  # streaming order, up to the held layer
        assert loading.is_alive()  # waiting for layer 3's bytes
        gate.set()
        loading.join(30)
        files.release_leases()
    assert recorder.names == files.stage_tensor_names() and all(recorder.whole)
    assert result == [set(recorder.names)]
    names = [e.name for e in timeline.events]
    assert names == ["weights_attached", "first_tensor_loaded", "weights_loaded"]
    assert timeline.events[-1].detail["waited_for_bytes_s"] >= 0.2
    del files_index


def test_loaderd_killed_mid_fetch_the_rest_comes_from_s3(s3_server: Any, model_dir: Path, shm_guard: str,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    uri = push(s3_server, write_model(tmp_path / "big", llama_like(layers=6, hidden=128, vocab=1024)), "killed")
    want = expected(tmp_path / "big")
    token, token_file = new_token_file(tmp_path)
    d = spawn_loaderd(port=free_port(), node_name=shm_guard, budget_bytes=64 << 20, token=token,
                      token_file=token_file, endpoint_url=s3_server.endpoint_url, env=s3_server.client_env(),
                      log_path=tmp_path / "loaderd.log", extra_args=["--concurrency", "1", "--chunk-bytes", "4096"])
    try:
        files = LoaderModelFiles(uri, d.url, d.token, endpoint_url=s3_server.endpoint_url)
        handed: list[str] = []
        recorder = Recorder(want)

        def load(weights: Iterable[tuple[str, Any]]) -> set[str]:
            def killing() -> Any:
                for name, tensor in weights:
                    handed.append(name)
                    if len(handed) == 1:  # the fetch is under way: the daemon dies
                        d.proc.send_signal(signal.SIGKILL)
                        d.proc.wait(10)
                    yield name, tensor
            return recorder(killing())

        timeline = Timeline()
        stream_weights(files, StageSpec.whole(6), load, timeline)
        files.release_leases()
        assert recorder.names == files.stage_tensor_names() and all(recorder.whole)
        fallback = timeline.first("loaderd_fallback")
        assert fallback is not None and fallback.detail["tensors"] < len(recorder.names)
        assert timeline.events[-1].detail["via"] == "loaderd+s3"
    finally:
        d.stop()
        remove_node_segments(shm_guard)  # a SIGKILLed daemon cannot unlink (its next start would)


def test_a_truncated_segment_is_refused_naming_it(model_dir: Path, shm_guard: str) -> None:
    stores = LocalStores({URI: model_dir})
    with LoaderDaemon(LoaderConfig(node_name=shm_guard, budget_bytes=64 << 20), "s" * 32, open_model=stores) as d:
        lease = d.client().prefetch(PrefetchRequest(model_uri=URI))
        while any(s.state == "filling" for s in d.client().status().segments):
            time.sleep(0.01)
        victim = lease.segments[0].path
        os.truncate(victim, 4096)
        files = LoaderModelFiles(URI, d.url, d.token)
        with pytest.raises(ValueError, match=f"{victim}: header says \\d+ bytes, file has 4096"):
            stream_weights(files, StageSpec.whole(4), Recorder(expected(model_dir)), Timeline())
        files.release_leases()
        d.client().release(lease.lease_id)
