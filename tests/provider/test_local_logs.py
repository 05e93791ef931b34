"""`fn logs` on the local backend: a failed cold start's worker (a real process) is gone, but its
log is read back, its end only, and never with a secret the worker was handed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from hydraserve.auth import mint_worker_token
from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.plan import NodeInfo
from hydraserve.contracts.timeline import Timeline
from hydraserve.errors import HydraError
from hydraserve.processes import tail_lines
from hydraserve.provider.embedded.local import LocalBackend, LocalNode
from hydraserve.provider.service import PlacementService
from hydraserve.weights.model_files import open_model

SECRET = "aws-secret-" + "s" * 24
NODE_TOKEN = "n" * 32


def test_a_failed_cold_starts_worker_log_is_read_back_without_secrets(tmp_path: Path, tiny_llama_dir: Path) -> None:
    placement = PlacementService()
    placement.register_node(NodeInfo(name="node0", gpus=1, gpu_memory_gb=40, nic_gbps=16))
    backend = LocalBackend(placement, [LocalNode("node0", "http://127.0.0.1:9", NODE_TOKEN)],  # a loaderd that is not there
                           open_model=open_model, run_dir=tmp_path / "run",
                           worker_env={"AWS_SECRET_ACCESS_KEY": SECRET}, ready_timeout_s=60)
    model = str(tmp_path / "no-such-model")
    shutil.copytree(tiny_llama_dir, model)
    function = FunctionConfig(name="broken", model_uri=model)
    backend.prepare(function)  # read at deploy time; gone by its cold start
    shutil.rmtree(model)
    try:
        with pytest.raises(HydraError):
            backend.start(function, Timeline())
        (worker,) = backend.worker_logs("broken", 50)
        assert (worker.stage, worker.node, worker.failed_start) == (0, "node0", True)
        assert "no-such-model" in worker.log and backend.worker_logs("other", 50) == []
        raw = backend.launcher.log_path(worker.instance, 0).read_text()
        token = mint_worker_token({"node0": NODE_TOKEN}, subject=f"{worker.instance}/0", model_uri=model,
                                  expires_at=time.time() + 60)  # one like the token it was handed
        assert SECRET not in raw and "hs2." not in raw  # the worker logs no secret itself
        with backend.launcher.log_path(worker.instance, 0).open("a") as log:  # raw output, never redacted by it
            log.write(f"Traceback: AWS_SECRET_ACCESS_KEY={SECRET} token={token}\n")
        (worker,) = backend.worker_logs("broken", 1)
        assert worker.log == "Traceback: AWS_SECRET_ACCESS_KEY=*** token=***"
    finally:
        backend.close()


def test_a_logs_tail_is_read_from_its_end_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "worker.log"
    path.write_text("".join(f'{{"msg": "line {i}"}}\n' for i in range(10_000)))
    assert tail_lines(path, 3).splitlines() == [f'{{"msg": "line {i}"}}' for i in (9997, 9998, 9999)]
    assert tail_lines(path, 3, block=7) == tail_lines(path, 3)  # blocks that cut lines
    capped = tail_lines(path, 10_000, max_bytes=1000).splitlines()
    assert capped[-1] == '{"msg": "line 9999"}' and len(capped) < 100 and capped[0].startswith('{"msg"')
    assert tail_lines(path, 20_000).count("\n") == 9999 and tail_lines(tmp_path / "none", 5) == ""
