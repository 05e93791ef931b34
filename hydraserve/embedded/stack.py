"""The embedded default stack: S3, a model, loaderd per node, placement, gateway, on one machine.

Used by `hydraserve demo`, `hydraserve up` and the end-to-end tests. Every component is a real
process talking real protocols: moto's S3 server over HTTP, loaderd and the placement
service as `hydraserve` child processes, workers spawned per cold start by the local backend;
the gateway runs in this process. With ``link_mbit`` (and root) the nodes are network
namespaces whose links tc caps both ways (hydraserve.embedded.netns): each node's loaderd and
workers run inside its namespace and listen on its address, S3, placement and the gateway stay
outside, so every fetch and every stage-to-stage transfer crosses a capped link. Without root
it says why (``emulation``) and runs on loopback. ``close()`` stops everything in reverse order
(the namespaces last) and checks that no shared-memory segment of ours is left behind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydraserve.activator.embedded.gateway import Gateway, create_gateway_app
from hydraserve.auth import write_token_file
from hydraserve.contracts.function import FunctionConfig, setting_default
from hydraserve.embedded.aio_server import BackgroundAioServer
from hydraserve.embedded.demo_model import push_directory
from hydraserve.embedded.supervisor import StackSupervisor, SupervisedDaemon, SupervisedPool
from hydraserve.errors import HydraError, TemporaryError
from hydraserve.loaderd.registry import node_segment_files, remove_if_empty
from hydraserve.processes import ChildProcess, check_port_free, free_port, hydraserve_command
from hydraserve.provider.embedded.local import LocalBackend, LocalNode
from hydraserve.provider.embedded.process import NodeHost
from hydraserve.runtime.embedded.forkserver_client import ForkServerClient, pool_memory_gb, serving_status

if TYPE_CHECKING:
    from hydraserve.embedded.netns import EmulatedCluster
    from hydraserve.weights.model_files import StoredModelFiles

log = logging.getLogger(__name__)

GATEWAY_TOKEN_ENV = "HYDRASERVE_GATEWAY_TOKEN"  # the gateway's admin token (else one is made)
LOADERD_NAMESPACE_PORT = 7070  # a node's namespace is ours alone (workers use 41000+)


@dataclass
class StackOptions:
    """What to start. The defaults make the demo: 2 nodes, a generated ~130 MB Llama."""

    nodes: int = 2
    node_gpu_memory_gb: float = 24.0
    node_nic_gbps: float = 16.0
    loaderd_budget_bytes: int = 2 << 30
    function_name: str = "tiny-llama"
    model_dir: Path | None = None  # a local HF directory to push; default: generate one
    tiny: dict[str, Any] = field(default_factory=lambda: {
        "arch": "llama", "layers": 8, "hidden": 512, "heads": 8, "kv_heads": 4,
        "intermediate": 1408, "vocab": 8192, "dtype": "float32", "shard_size": "24MB"})
    idle_timeout_s: float = setting_default("idle_timeout_s")
    ttft_slo_s: float = setting_default("ttft_slo_s")
    function: dict[str, Any] = field(default_factory=dict)  # more FunctionConfig fields (consolidate, ...)
    more_functions: dict[str, str] = field(default_factory=dict)  # name -> local HF directory (pushed) or s3:// URI
    host: str = "127.0.0.1"
    gateway_port: int = 0
    run_dir: Path | None = None
    progress: bool = True
    s3_host: str | None = None  # where the S3 server listens (default: host)
    s3_prefix: list[str] = field(default_factory=list)  # command prefix, e.g. ip netns exec NS
    link_mbit: float | None = None  # nodes as network namespaces, links capped at this (root); None: loopback
    drain_timeout_s: float = 30.0  # on stop, requests in flight get this long to finish
    supervise_interval_s: float = 1.0  # how often a dead loaderd is looked for (and started again)
    reconcile_interval_s: float = 5.0  # how often placement learns what each loaderd really holds
    pool_size: int = 1  # idle pre-imported runtime processes per node (runtime/embedded/forkserver.py); 0: no pool
    worker: dict[str, Any] = field(default_factory=dict)  # more WorkerEnvironment fields (dtype, kv_cache_bytes, ...)


class LocalStack:
    """Start with ``with LocalStack(options) as stack:``; ``stack.gateway_url`` is the way in."""

    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        self._own_run_dir = self.options.run_dir is None
        self.run_dir = self.options.run_dir or Path(tempfile.mkdtemp(prefix="hydraserve-run-"))
        self._cleanups: list[tuple[str, Any]] = []
        self.node_names = [f"node{i}-{secrets.token_hex(2)}" for i in range(self.options.nodes)]
        self.model_uri = ""
        self.gateway: Gateway | None = None
        self.gateway_url = ""
        self.gateway_token = ""
        self.gateway_token_file: Path | None = None
        self.s3_env_file: Path | None = None  # KEY=value lines for clients of the embedded S3 (model push)
        self.leftovers: list[str] = []  # segments found after close (should stay empty)
        self.nodes: list[LocalNode] = []
        self.supervisor: StackSupervisor | None = None
        self.cluster: EmulatedCluster | None = None
        self.emulation = "loopback"  # what the nodes are, in words (the demo and `up` print it)

    # lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self) -> LocalStack:
        from hydraserve.embedded.s3 import EmbeddedS3

        opts = self.options
        check_port_free(opts.host, opts.gateway_port)  # before minutes of set-up, not after
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._emulate_nodes()
        starting_pools = self._start_pools()  # they import torch while S3 starts and the model is pushed
        s3_host = self.cluster.host_ip if self.cluster else opts.s3_host or opts.host
        # its keys only; every object written through to disk, so a restart (the supervisor's) keeps them
        self.s3 = EmbeddedS3(host=s3_host, prefix=opts.s3_prefix, require_auth=True, persist=True).start()
        self._cleanups.append(("s3", self.s3.close))
        s3_env = self.s3.client_env()
        self.s3_env_file = write_token_file(self.run_dir / "s3.env", "".join(f"{k}={v}\n" for k, v in s3_env.items()))
        self.model_uri = self._prepare_model()

        token = secrets.token_urlsafe(24)
        token_file = write_token_file(self.run_dir / "loaderd.token", token)
        daemons = [self._start_loaderd(name, token_file, token, s3_env) for name in self.node_names]
        nodes = self.nodes = [node for node, _ in daemons]

        placement_port = free_port(opts.host)
        placement_token = secrets.token_urlsafe(24)
        placement_token_file = write_token_file(self.run_dir / "placement.token", placement_token)
        placement = ChildProcess("placement", hydraserve_command(
            "placement", "--host", opts.host, "--port", str(placement_port), "--token-file", str(placement_token_file)),
            log_path=self.run_dir / "placement.log")
        placement.wait_healthy(f"http://{opts.host}:{placement_port}/healthz")
        self._cleanups.append(("placement", placement.stop))
        from hydraserve.provider.client import PlacementClient

        self.placement = PlacementClient(f"http://{opts.host}:{placement_port}", placement_token)
        for _, daemon in daemons:
            self.placement.register_node(daemon.info)
        pools = self._account_pools(starting_pools, {d.info.name: d for _, d in daemons})
        self.supervisor = StackSupervisor([d for _, d in daemons], self.placement, s3=self.s3,
                                          pools=[starting_pools[name][0] for name in pools],
                                          interval_s=opts.supervise_interval_s, reconcile_s=opts.reconcile_interval_s)
        self._cleanups.append(("loaderd supervisor", self.supervisor.start().close))

        backend = LocalBackend(self.placement, nodes, run_dir=self.run_dir / "workers",
                               open_model=self.open_model, s3_endpoint_url=self.s3.endpoint_url,
                               worker_env=s3_env, worker_settings=self.worker_settings, pools=pools)
        self._cleanups.append(("workers", backend.close))
        self.backend = backend
        self.gateway = Gateway(backend, drain_timeout_s=opts.drain_timeout_s)
        function = FunctionConfig(name=opts.function_name, model_uri=self.model_uri,
                                  idle_timeout_s=opts.idle_timeout_s, ttft_slo_s=opts.ttft_slo_s, **opts.function)
        backend.prepare(function)  # read the model's sizes at deploy time
        self.gateway.register(function)
        for name, target in opts.more_functions.items():  # `up --function NAME=DIR|URI`
            uri = target if target.startswith("s3://") else push_directory(self.s3, Path(target), name,
                                                                           progress=opts.progress)
            more = FunctionConfig(name=name, model_uri=uri, idle_timeout_s=opts.idle_timeout_s,
                                  ttft_slo_s=opts.ttft_slo_s, **opts.function)
            backend.prepare(more)
            self.gateway.register(more)
        self.gateway_token = os.environ.get(GATEWAY_TOKEN_ENV) or secrets.token_urlsafe(24)
        self.gateway_token_file = write_token_file(self.run_dir / "gateway.token", self.gateway_token)
        server = BackgroundAioServer(create_gateway_app(self.gateway, self.gateway_token), opts.host, opts.gateway_port,
                                     drain_timeout_s=opts.drain_timeout_s).start()
        self._cleanups.append(("gateway", server.close))
        self.gateway_url = server.url
        return self

    def close(self) -> None:
        """Stop everything (reverse order), then check /dev/shm for leftovers of our nodes."""
        while self._cleanups:
            name, stop = self._cleanups.pop()
            try:
                stop()
            except Exception as exc:
                log.warning("stopping %s failed: %s", name, exc)
        self.leftovers = self.leftover_segments()
        for path in self.leftovers:  # a crashed daemon's segments: remove, and say so
            log.warning("removing leftover shared memory segment %s", path)
            with contextlib.suppress(OSError):
                os.unlink(path)
            remove_if_empty(os.path.dirname(path))  # its model's directory, unless another node's segments are there
        if self._own_run_dir and not os.environ.get("HYDRASERVE_KEEP_RUN_DIR"):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def leftover_segments(self) -> list[str]:
        return [path for node in self.node_names for path in node_segment_files("/dev/shm", node)]

    @property
    def worker_settings(self) -> dict[str, object]:
        """Every worker's extra settings and share of this machine's cores: the emulated nodes share them, and a
        stage's idle OpenMP threads would spin on the core another stage computes on (measured:
        a group of 4 decoded at 44 ms a token with torch's 2 threads each, 22 ms with 1; a
        single worker 17 ms either way)."""
        return {"torch_threads": max(1, (os.cpu_count() or 1) // self.options.nodes), **self.options.worker}

    def open_model(self, uri: str) -> StoredModelFiles:
        """A model in the embedded S3, read with the stack's keys."""
        from hydraserve.weights.model_files import open_model

        return open_model(uri, client=self.s3.client())

    def function_url(self, name: str | None = None) -> str:
        return f"{self.gateway_url}/functions/{name or self.options.function_name}"

    # parts -------------------------------------------------------------------------------
    def _prepare_model(self) -> str:
        from hydraserve.embedded.demo_model import prepare_and_push

        return prepare_and_push(self.s3, self.run_dir / "model", self.options.model_dir,
                                self.options.tiny, self.options.function_name, progress=self.options.progress)

    def _emulate_nodes(self) -> None:
        """Network namespaces with capped links for the nodes, if asked for and possible."""
        opts = self.options
        if opts.link_mbit is None:
            return
        from hydraserve.embedded.netns import EmulatedCluster, NodeSpec, netns_available

        usable, why = netns_available()
        if not usable:
            self.emulation = f"loopback: links not capped ({why})"
            log.warning("nodes run on loopback, links not capped: %s", why)
            return
        self.cluster = EmulatedCluster([NodeSpec(name, rate_mbit=opts.link_mbit) for name in self.node_names]).start()
        self._cleanups.append(("network namespaces", self.cluster.close))
        self.emulation = (f"{len(self.node_names)} network namespaces, each link capped at {opts.link_mbit:g} Mbit/s "
                          "both ways (tc)")

    def _node_host(self, name: str) -> NodeHost:
        """Where the node's processes run: its namespace's address and command prefix, or loopback."""
        if self.cluster is None:
            return NodeHost(self.options.host)
        emulated = self.cluster.nodes[name]
        return NodeHost(emulated.ip, tuple(emulated.prefix))

    def _start_pools(self) -> dict[str, tuple[SupervisedPool, ForkServerClient]]:
        """Each node's warm pool (a fork server in the node's namespace), not waited for yet."""
        if self.options.pool_size <= 0:
            return {}
        token = secrets.token_urlsafe(24)
        token_file = write_token_file(self.run_dir / "pool.token", token)
        pools = {}
        for name in self.node_names:
            socket_path = self.run_dir / f"pool-{name}.sock"
            spawn = functools.partial(ChildProcess, f"pool {name}", [
                *self._node_host(name).prefix, sys.executable, "-m", "hydraserve.runtime.embedded.forkserver", "--socket",
                str(socket_path), "--token-file", str(token_file), "--node", name, "--pool-size",
                str(self.options.pool_size)], log_path=self.run_dir / f"pool-{name}.log")
            pool = SupervisedPool(f"the warm pool of {name}", spawn, spawn(), node=name)
            self._cleanups.append((f"pool {name}", lambda pool=pool: pool.process.stop()))  # whichever runs now
            pools[name] = (pool, ForkServerClient(socket_path, token))
        return pools

    def _account_pools(self, pools: dict[str, tuple[SupervisedPool, ForkServerClient]],
                       daemons: dict[str, SupervisedDaemon]) -> dict[str, ForkServerClient]:
        """Wait for each pool, measure what it holds and register that with its node; a node
        whose budget has no room for it (409) or whose pool did not start spawns its workers."""
        kept = {}
        for name, (supervised, pool) in pools.items():
            process = supervised.process
            seen: list[dict[str, object]] = []

            def serving(pool: ForkServerClient = pool, seen: list[dict[str, object]] = seen) -> bool:
                status = serving_status(pool)
                if status is not None:
                    seen.append(status)
                return status is not None

            try:
                if not process.wait_until(serving, 120.0):  # raises if it exited
                    raise TemporaryError(f"the warm pool of {name} did not serve within 120 s")
                memory = pool_memory_gb(seen[-1])
                info = daemons[name].info.model_copy(update={"pool_size": self.options.pool_size,
                                                             "pool_memory_gb": memory})
                self.placement.register_node(info)
            except (HydraError, RuntimeError) as exc:
                log.warning("no warm pool on %s, its workers will be spawned: %s", name, exc)
                process.stop(grace_s=2)
                continue
            daemons[name].info = info
            kept[name] = pool
        return kept

    def _start_loaderd(self, name: str, token_file: Path, token: str,
                       env: dict[str, str]) -> tuple[LocalNode, SupervisedDaemon]:
        """One node's loaderd, and how to start it again on the same address if it dies."""
        from hydraserve.contracts.plan import NodeInfo
        from hydraserve.loaderd.daemon import spawn_loaderd

        opts = self.options
        host, nic_gbps = self._node_host(name), opts.node_nic_gbps
        port = free_port(opts.host)
        if self.cluster is not None:
            port = LOADERD_NAMESPACE_PORT
            nic_gbps = (opts.link_mbit or 0) / 1000  # what the planner must believe: the cap
        spawn = functools.partial(spawn_loaderd, port=port, node_name=name, budget_bytes=opts.loaderd_budget_bytes,
                                  token=token, token_file=token_file, host=host.ip, prefix=host.prefix,
                                  endpoint_url=self.s3.endpoint_url, env=env,
                                  log_path=self.run_dir / f"loaderd-{name}.log")
        process = spawn()
        node = LocalNode(name=name, loaderd_url=process.url, loaderd_token=process.token,  # its node's admin token
                         gpu_memory_gb=opts.node_gpu_memory_gb, nic_gbps=nic_gbps, host=host)
        info = NodeInfo(name=name, gpus=1, gpu_memory_gb=node.gpu_memory_gb, nic_gbps=nic_gbps, loaderd_url=process.url)
        daemon = SupervisedDaemon(f"loaderd of {name}", spawn, process, info=info)
        self._cleanups.append((f"loaderd {name}", lambda: daemon.process.stop()))  # whichever process runs now
        return node, daemon
