"""Start a loaderd: in this process (tests, the demo) or as a `hydraserve loaderd` subprocess.

``LoaderDaemon`` wires a LoaderService, its Flask app and a waitress server; ``spawn_loaderd``
runs the CLI in a child process (optionally inside a network namespace via a command prefix)
and waits until it answers. Used by hydraserve.loaderd.commands, the demo and the benchmark.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydraserve.http_server import DrainingServer
from hydraserve.loaderd.api import create_app
from hydraserve.loaderd.client import LoaderClient, PeerReader
from hydraserve.loaderd.fetcher import RangeReader
from hydraserve.loaderd.model_index import ModelIndex
from hydraserve.loaderd.service import LoaderConfig, LoaderService, PeerFactory, Resolver, SourceFactory


def default_backends() -> tuple[Resolver, SourceFactory]:
    """Model resolution and ranged reads through hydraserve.weights (the S3 client)."""
    from hydraserve.loaderd.s3_model import S3RangeReader, resolve_model

    return resolve_model, S3RangeReader


def peer_factory(token: str) -> PeerFactory:
    def make(url: str, index: ModelIndex) -> RangeReader:
        return PeerReader(url, token, index.key)
    return make


class LoaderDaemon:
    """One node's daemon in this process: ``with LoaderDaemon(config, token) as d: d.url``."""

    def __init__(self, config: LoaderConfig, token: str, *, host: str = "127.0.0.1", port: int = 0,
                 resolver: Resolver | None = None, s3_source: SourceFactory | None = None) -> None:
        if resolver is None or s3_source is None:
            default_resolver, default_source = default_backends()
            resolver = resolver or default_resolver
            s3_source = s3_source or default_source
            from hydraserve.loaderd.s3_model import client_for

            client_for(config.endpoint_url)  # warm: the first prefetch should not pay for it
        self.token = token
        self.service = LoaderService(config, resolver=resolver, s3_source=s3_source,
                                     peer_source=peer_factory(token))
        self.server = DrainingServer(create_app(self.service, token), host, port, threads=16)
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


def new_token_file(directory: str | Path | None = None) -> tuple[str, Path]:
    """A random token written to a 0600 file (for --token-file)."""
    token = secrets.token_urlsafe(24)
    fd, path = tempfile.mkstemp(prefix="loaderd-token-", dir=directory)
    os.fchmod(fd, 0o600)
    os.write(fd, token.encode())
    os.close(fd)
    return token, Path(path)


@dataclass
class DaemonProcess:
    """A `hydraserve loaderd` child process."""

    proc: subprocess.Popen[bytes]
    url: str
    token: str
    log_path: Path | None = None

    def client(self) -> LoaderClient:
        return LoaderClient(self.url, self.token)

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM (the daemon unlinks its segments), SIGKILL after ``timeout_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def spawn_loaderd(*, port: int, node_name: str, budget_bytes: int, token: str, token_file: Path,
                  host: str = "127.0.0.1", connect_host: str | None = None,
                  endpoint_url: str | None = None, extra_args: Sequence[str] = (),
                  prefix: Sequence[str] = (), env: dict[str, str] | None = None,
                  log_path: Path | None = None, wait_s: float = 30.0) -> DaemonProcess:
    """Run `hydraserve loaderd` (after ``prefix``, e.g. ``ip netns exec NS``) and wait for it."""
    cmd = [*prefix, sys.executable, "-m", "hydraserve.cli", "loaderd", "--host", host,
           "--port", str(port), "--token-file", str(token_file), "--budget-bytes", str(budget_bytes),
           "--node-name", node_name, *extra_args]
    if endpoint_url:
        cmd += ["--endpoint-url", endpoint_url]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, **(env or {})})
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]
    daemon = DaemonProcess(proc, f"http://{connect_host or host}:{port}", token, log_path)
    client = LoaderClient(daemon.url, token)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"loaderd exited with {proc.returncode} (log: {log_path})")
        if client.healthy():
            return daemon
        time.sleep(0.1)
    daemon.stop()
    raise RuntimeError(f"loaderd did not answer at {daemon.url} within {wait_s} s")
