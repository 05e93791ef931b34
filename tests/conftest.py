"""Fixtures shared by every test folder: an embedded S3 server, generated tiny models, a guard
that no shared-memory segment is left behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (make forwards it to pytest when it is itself terminated) ends the run as Ctrl-C
    does: pytest then tears every fixture down, so the daemons they started (in sessions of their
    own, out of reach of the terminal's signal) are stopped and their temp dirs removed
    (tests/test_interrupted_run.py)."""
    import signal

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)

# ---- tiny generated models (hydraserve.modeltools.tiny); session-scoped, made once per run ----

@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (GQA 4/2 heads, hidden 64, vocab 512, fp32) with a chat template."""
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), TinySpec(arch="llama", kv_heads=2))


@pytest.fixture(scope="session")
def tiny_llama_greedy(tiny_llama_dir: Path) -> Any:
    """The reference no one here wrote: (greedy(ids, n), tokenizer) of Hugging Face transformers
    on the tiny Llama's weights, fp32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_llama_dir))

    def greedy(ids: list[int], n: int) -> list[int]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
        return list(out[0, len(ids):].tolist())

    return greedy, tokenizer


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer pre-LN OPT (hidden 64, vocab 512, fp32) without a chat template."""
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-opt"), TinySpec(arch="opt"))


@pytest.fixture(scope="session")
def group_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer Llama (hidden 256, vocab 4096, ~19 MB fp32): big enough that 50 Mbit/s NICs make
    the planner split it over two nodes (pipeline-group tests)."""
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("group-llama"),
                           TinySpec(arch="llama", layers=4, hidden=256, intermediate=512, vocab=4096, kv_heads=2))


# ---- embedded S3 (hydraserve.embedded.s3): a real moto server over HTTP on 127.0.0.1 ----

@pytest.fixture(scope="session")
def s3_server():  # -> hydraserve.embedded.s3.EmbeddedS3
    """A running moto S3 server for the whole session; tests use their own bucket names.

    Tests that kill it must bring it back (``s3_server.start()``) before they finish.
    """
    from hydraserve.embedded.s3 import EmbeddedS3

    with EmbeddedS3() as server:
        yield server


# ---- shared memory: segments named after a per-test node name, checked at the end ----

@pytest.fixture
def node_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def shm_guard(node_name: str) -> Iterator[str]:
    """Yields the node name; afterwards asserts nothing is left in /dev/shm and removes leftovers."""
    yield node_name
    left = remove_node_segments(node_name)
    _remove_unheld_lock(f"/dev/shm/hsld-{node_name}.lock")
    assert not left, f"segments left behind: {left}"


def remove_node_segments(node_name: str) -> list[str]:
    """Unlink what a daemon of this node name left in /dev/shm (its segments, in their models'
    directories, and those directories once empty); the paths removed."""
    from hydraserve.loaderd.registry import node_segment_files, remove_if_empty

    left = node_segment_files("/dev/shm", node_name)
    for path in left:
        os.unlink(path)
        remove_if_empty(os.path.dirname(path))
    return left


def _remove_unheld_lock(path: str) -> None:
    """A daemon the test killed could not remove its node lock (the next daemon of that node
    would take it over; no test node comes back): removed once no daemon holds it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except BlockingIOError:
        pass  # a daemon still runs with it (a test's own concern)
    finally:
        os.close(fd)


# ---- a warm pool of vLLM workers (runtime/embedded/forkserver.py --engine vllm); one per session ----

class VllmPool:
    """A fork server that imported vLLM once (7-9 s): each worker adopted from it starts in ~2 s."""

    def __init__(self, tmp: Path) -> None:
        import sys

        from hydraserve.auth import new_token_file
        from hydraserve.processes import ChildProcess
        from hydraserve.runtime.embedded.forkserver_client import ForkServerClient, wait_until_serving

        token, token_file = new_token_file(tmp)
        self.run_dir = tmp
        self.socket = tmp / "pool.sock"
        self.process = ChildProcess("pool", [sys.executable, "-m", "hydraserve.runtime.embedded.forkserver", "--socket",
                                             str(self.socket), "--token-file", str(token_file), "--pool-size", "1",
                                             "--node", "n0"], log_path=tmp / "pool.log")
        self.client = ForkServerClient(self.socket, token)
        wait_until_serving(self.client, 120)

    def launch(self, model_uri: str, pooled: bool = True, **fields: object):  # type: ignore[no-untyped-def]
        """A vLLM worker (a WorkerProcess) of ``model_uri`` (fp32 unless ``dtype`` says otherwise),
        adopted from the pool (or spawned: it imports vLLM itself); vLLM answers its first requests
        too unless ``first_token_engine`` says otherwise."""
        from hydraserve.contracts.worker import WorkerEnvironment
        from hydraserve.processes import free_port
        from hydraserve.provider.embedded.process import ProcessLauncher

        env = WorkerEnvironment.model_validate({
            "model_uri": model_uri, "function": "fn", "revision": "fn-00001", "instance_id": f"fn-{uuid.uuid4().hex[:6]}",
            "port": free_port(), "dtype": "float32", "kv_cache_bytes": 32 << 20,
            "first_token_engine": "vllm", **fields})
        return ProcessLauncher(self.run_dir / "workers", pools={"n0": self.client} if pooled else None).launch("n0", env)


@pytest.fixture(scope="session")
def vllm_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmPool]:
    pool = VllmPool(tmp_path_factory.mktemp("vllm-pool"))
    yield pool
    pool.process.stop(grace_s=5)
