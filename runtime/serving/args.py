"""The one translation of a worker's environment into vLLM's engine arguments and environment.

Called by the worker (hydraserve.runtime.serving.engine) and the pipeline stage that follows
a group's head (hydraserve.runtime.serving.stage) before vLLM builds anything, and by the
benchmarks that run vLLM with our loader. vLLM's own argument parser reads the result
(``vllm serve`` takes the same arguments), so its defaults and checks stay vLLM's. No vLLM
import here: the worker computes this while vLLM is still importing.

A pipeline group is vLLM's own pipeline parallelism across nodes: stage i is node rank i of
``--nnodes p``, the head (stage 0) is the master whose address and port the plan gave as its
stage link, and ``VLLM_PP_LAYER_PARTITION`` makes vLLM build exactly the plan's layers on each
stage (the planner balances bytes, so stages are uneven).
"""

from __future__ import annotations

import json
import os
import socket

from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.runtime.serving.extension import QUALNAME as EXTENSION
from hydraserve.runtime.serving.fixes import FORK_KEY

LOAD_FORMAT = "hydraserve"  # registered by hydraserve.runtime.serving.plugin


def served_model_name(settings: WorkerEnvironment) -> str:
    """The name clients pass as ``model``: the function's, else the model directory's."""
    return settings.function or settings.model_uri.rstrip("/").rsplit("/", 1)[-1]


AUTO_FIT_CONTEXT = -1  # vLLM's max_model_len: as long as the KV cache holds


def engine_cli_args(settings: WorkerEnvironment, model_dir: str) -> list[str]:
    """``vllm serve`` arguments for this worker; ``model_dir`` holds its config and tokenizer (and,
    for vLLM's own loaders, its weights, or is the s3:// URI Run:ai streams them from)."""
    args = ["--model", model_dir, "--served-model-name", served_model_name(settings),
            "--load-format", settings.load_format, "--worker-extension-cls", EXTENSION,
            "--max-num-seqs", str(settings.max_batch), "--kv-cache-memory-bytes", str(settings.kv_cache_bytes),
            "--disable-fastapi-docs", "--disable-uvicorn-access-log"]
    if settings.load_format == LOAD_FORMAT:
        stage = settings.stage.model_dump() if settings.stage is not None else None
        args += ["--model-loader-extra-config", json.dumps({"stage": stage})]
    if settings.enforce_eager:
        args.append("--enforce-eager")
    if settings.dtype:
        args += ["--dtype", settings.dtype]
    # unset: the longest context the KV cache holds (vLLM's auto-fit), up to the model's own; a
    # model whose full context does not fit its memory grant serves shorter requests, never fails
    args += ["--max-model-len", str(settings.max_model_len or AUTO_FIT_CONTEXT)]
    group = settings.stage
    if group is None or group.num_stages == 1:
        return args  # vLLM on CPUs runs its worker in a process of its own (multiproc) either way
    head_host, head_port = settings.peers[0].rsplit(":", 1)
    return [*args, "--distributed-executor-backend", "mp", "--pipeline-parallel-size", str(group.num_stages),
            "--nnodes", str(group.num_stages), "--node-rank", str(group.index),
            "--master-addr", ip_address_of(head_host), "--master-port", head_port]


def ip_address_of(host: str) -> str:
    """``host`` as an IPv4 address, looked up here (a stage's Service name on Kubernetes): vLLM's
    process group resolves the master's name in C++, with none of this process's resolvers."""
    return str(socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)[0][4][0])


# Variables every process that runs vLLM for us sets before importing it (a warm pool too:
# huggingface_hub reads its offline switch at import).
PROCESS_ENV = {
    FORK_KEY: "1",  # our processes fork vLLM's engine and workers (hydraserve.runtime.serving.fixes)
    "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",  # nothing leaves the cluster
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # models come from S3 or loaderd, never a hub
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # emulated nodes share the cores: the kernel places threads
}


# Every variable engine_environment may set (one it leaves out for a worker is unset).
ENGINE_KEYS = frozenset({*PROCESS_ENV, "OMP_NUM_THREADS", "VLLM_PP_LAYER_PARTITION", "VLLM_HOST_IP",
                         "GLOO_SOCKET_IFNAME", "SAGEMAKER_CONTAINER_LOG_LEVEL",
                         "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "AWS_EC2_METADATA_DISABLED"})


def engine_environment(settings: WorkerEnvironment) -> dict[str, str]:
    """Variables vLLM reads for this worker (set before it is imported)."""
    env = dict(PROCESS_ENV)
    # vLLM's app set-up runs SageMaker's hosting standards, which set the root logger (and its
    # handlers) to this level, ERROR unless told: every log line of ours below it would vanish.
    env["SAGEMAKER_CONTAINER_LOG_LEVEL"] = os.environ.get("HYDRASERVE_LOG_LEVEL", "INFO")
    if settings.torch_threads:
        env["OMP_NUM_THREADS"] = str(settings.torch_threads)
    if len(settings.group_layers) > 1:
        env["VLLM_PP_LAYER_PARTITION"] = ",".join(str(n) for n in settings.group_layers)
    if settings.load_format == "runai_streamer":  # the streamer's S3 client, as DESIGN.md measured it
        env |= {"RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "AWS_EC2_METADATA_DISABLED": "true"}
        if settings.s3_endpoint_url:
            env["AWS_ENDPOINT_URL"] = settings.s3_endpoint_url
    if settings.host not in ("127.0.0.1", "0.0.0.0", "localhost"):
        env["VLLM_HOST_IP"] = settings.host  # the address its peers reach it on (a node's namespace)
        interface = interface_of(settings.host)
        if interface is not None:  # gloo would take the host name's address (loopback in a namespace)
            env["GLOO_SOCKET_IFNAME"] = interface
    return env


def interface_of(address: str) -> str | None:
    """The network interface of this process's network namespace that holds ``address``."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == address for a in addresses):
            return name
    return None
