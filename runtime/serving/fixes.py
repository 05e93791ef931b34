"""Fixes we carry for vLLM 0.32 on CPUs, applied by our plugin in every vLLM process.

1. **Pipeline parallel in eager mode.** A CPU worker of a pipeline stage other than the first
   allocates its buffers for the hidden states it receives (``intermediate_tensors``) only in
   the warm-up forward, which the CPU worker skips in eager mode with an explicit KV-cache size
   (``cpu_worker._should_warm_up_model``). Its first step then fails
   (``assert self.intermediate_tensors is not None``) and the engine core dies with
   ``KeyError`` in ``Scheduler.update_from_output``: the pipeline-parallel crash seen here.
   The fix allocates them right after the model loads, as the warm-up would have.
2. **Fork, not spawn, for our workers.** The CPU platform forces ``spawn`` for the engine core
   and worker processes, so each imports vLLM again (7 s here). A worker that sets
   ``HYDRASERVE_VLLM_FORK=1`` (ours do: they fork before any torch thread pool exists) keeps
   ``fork``; every other vLLM user of this environment is left as vLLM decides. A forked child
   forgets its parent's signal wake-up descriptor: it is the socket of the parent's asyncio
   loop, and Python writes every signal number the child receives to it, so an engine core
   told to stop (SIGTERM) made the worker above it believe it had been told to stop too. And it
   dies with the thread that forked it (``PR_SET_PDEATHSIG``): a pipeline stage's vLLM worker
   whose parent went (SIGKILLed, or gone without stopping it) spun on forever, deaf to
   SIGTERM, since vLLM's parent-death monitor marks it stopping and then never stops it.
   And it closes its copies of the worker's HTTP sockets (the listener and the connections it
   had accepted, all on the port in ``HYDRASERVE_HTTP_PORT``): an engine forked while a client
   held a kept-alive connection kept that connection open after the worker closed it, so the
   client's next request on it was read by no one (the gateway waited 300 s for an answer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any

log = logging.getLogger(__name__)
FORK_KEY = "HYDRASERVE_VLLM_FORK"
HTTP_PORT_KEY = "HYDRASERVE_HTTP_PORT"


def apply_fixes() -> None:
    """Both fixes, each only if the code it fixes is there (a newer vLLM may have neither)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    _allocate_pipeline_buffers_after_load()
    _keep_fork_for_our_workers()


def _allocate_pipeline_buffers_after_load() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.load_model
    if getattr(original, "_hydraserve_fix", False):
        return

    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from vllm.distributed.parallel_state import get_pp_group

        if not get_pp_group().is_first_rank and getattr(self, "intermediate_tensors", None) is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)

    load_model._hydraserve_fix = True  # type: ignore[attr-defined]
    CPUModelRunner.load_model = load_model  # type: ignore[method-assign]


def _keep_fork_for_our_workers() -> None:
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__  # type: ignore[attr-defined]
    if getattr(original, "_hydraserve_fix", False):
        return

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        original(cls, vllm_config)
        if os.environ.get(FORK_KEY) == "1":
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"

    check_and_update_config._hydraserve_fix = True  # type: ignore[attr-defined]
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign,assignment]
    os.register_at_fork(after_in_child=_forget_the_parents_signal_wakeup)


def _forget_the_parents_signal_wakeup() -> None:
    # Only vLLM's children of a worker (whose HTTP port is known by then): a warm pool that
    # imported vLLM runs this hook too, and its pooled children must outlive their fork server.
    if os.environ.get(FORK_KEY) != "1" or not os.environ.get(HTTP_PORT_KEY):
        return
    signal.set_wakeup_fd(-1)
    _close_the_parents_http_sockets()
    _die_with_parent()


def _close_the_parents_http_sockets() -> None:
    """Closes this process's descriptors of TCP sockets on the worker's HTTP port (the parent's
    serving loop owns them; this process never runs that loop)."""
    port = os.environ.get(HTTP_PORT_KEY)
    if not port:
        return
    import psutil

    for connection in psutil.Process().net_connections(kind="tcp"):
        if connection.fd >= 0 and connection.laddr and connection.laddr.port == int(port):
            with contextlib.suppress(OSError):
                os.close(connection.fd)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """SIGKILL when the forking thread's process ends (Linux); nothing elsewhere."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent went between the fork and here
        os._exit(1)
