"""Start a loaderd: in this process (tests, the demo) or as a `hydraserve loaderd` subprocess.

``LoaderDaemon`` wires a LoaderService, its Flask app and a waitress server; ``spawn_loaderd``
runs the CLI in a child process (optionally inside a network namespace via a command prefix)
and waits until it answers. Used by hydraserve.cli.loaderd, the demo and the benchmark.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from hydraserve.auth import NodeKeys, node_admin_token
from hydraserve.http_server import DrainingServer
from hydraserve.loaderd.api import create_app
from hydraserve.loaderd.client import LoaderClient, PeerReader
from hydraserve.loaderd.models import Opener
from hydraserve.loaderd.service import LoaderConfig, LoaderService, PeerFactory
from hydraserve.processes import ChildProcess, hydraserve_command
from hydraserve.weights.fetch import RangeReader


def peer_factory(keys: NodeKeys) -> PeerFactory:
    def make(url: str, model_key: str) -> RangeReader:
        return PeerReader(url, keys, model_key)
    return make


class LoaderDaemon:
    """One node's daemon in this process: ``with LoaderDaemon(config, secret) as d: d.url``.
    ``secret`` is the install's loaderd secret; the daemon answers its node's keys derived from
    it (hydraserve.auth.NodeKeys), and ``token`` is its node's admin token."""

    def __init__(self, config: LoaderConfig, secret: str, *, host: str = "127.0.0.1", port: int = 0,
                 open_model: Opener | None = None) -> None:
        keys = NodeKeys.derive(secret, config.node_name)
        self.token = keys.admin
        self.service = LoaderService(config, open_model=open_model, peer_source=peer_factory(keys))
        self.server = DrainingServer(create_app(self.service, keys), host, port, threads=16)
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="loaderd-reaper", daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> LoaderClient:
        return LoaderClient(self.url, self.token)

    def start(self) -> LoaderDaemon:
        self.server.start()
        self._reaper.start()
        return self

    def _reap_loop(self) -> None:
        """Drop expired prefetch pins and leases of dead readers, once a second."""
        while not self._stopping.wait(1.0):
            self.service.reap()

    def stop(self) -> None:
        """Stop serving, stop fetching, unlink every segment."""
        self._stopping.set()
        self.server.close()
        self.service.close()

    def __enter__(self) -> LoaderDaemon:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class DaemonProcess(ChildProcess):
    """A `hydraserve loaderd` child process (SIGTERM makes it unlink its segments)."""

    def __init__(self, argv: Sequence[str], url: str, token: str, log_path: Path | None,
                 env: dict[str, str] | None) -> None:
        super().__init__("loaderd", argv, log_path=log_path, env=env)
        self.url = url
        self.token = token

    def client(self) -> LoaderClient:
        return LoaderClient(self.url, self.token)


def spawn_loaderd(*, port: int, node_name: str, budget_bytes: int, token: str, token_file: Path,
                  host: str = "127.0.0.1", connect_host: str | None = None,
                  endpoint_url: str | None = None, extra_args: Sequence[str] = (),
                  prefix: Sequence[str] = (), env: dict[str, str] | None = None,
                  log_path: Path | None = None, wait_s: float = 30.0) -> DaemonProcess:
    """Run `hydraserve loaderd` (after ``prefix``, e.g. ``ip netns exec NS``) and wait for it.
    ``token`` is the install's loaderd secret (in ``token_file``); the process's client uses the
    node's admin token derived from it."""
    args = ["loaderd", "--host", host, "--port", str(port), "--token-file", str(token_file),
            "--budget-bytes", str(budget_bytes), "--node-name", node_name, *extra_args]
    if endpoint_url:
        args += ["--endpoint-url", endpoint_url]
    daemon = DaemonProcess([*prefix, *hydraserve_command(*args)], f"http://{connect_host or host}:{port}",
                           node_admin_token(token, node_name), log_path, env)
    daemon.wait_healthy(daemon.url + "/healthz", wait_s)
    return daemon
