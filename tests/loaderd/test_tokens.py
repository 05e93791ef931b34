"""loaderd's tokens against real daemons: worker tokens expire and are good only at the nodes
they name, each node answers only its own admin token, a peer read carries a peer token (never
the reader's admin token or the install's secret), and a long-lived worker keeps access across
a renewal of its token file."""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from hydraserve.auth import NodeKeys, TokenFile, mint_peer_token, mint_worker_token, node_admin_token
from hydraserve.contracts.loader import AttachRequest
from hydraserve.errors import ForbiddenError, UnauthorizedError
from hydraserve.loaderd.client import LoaderClient
from hydraserve.loaderd.daemon import LoaderDaemon
from hydraserve.loaderd.service import LoaderConfig

from .conftest import LocalStores, llama_like, write_model

SECRET = "install-secret-" + "s" * 24
URI = "s3://bucket/model"


@pytest.fixture
def two_nodes(shm_guard: str, tmp_path: Path) -> Iterator[tuple[LoaderDaemon, LoaderDaemon]]:
    """Nodes A and B of one install (one loaderd secret), both able to read the model."""
    root = write_model(tmp_path / "m", llama_like(layers=2))
    daemons = [LoaderDaemon(LoaderConfig(node_name=f"{shm_guard}-{x}", budget_bytes=64 << 20, chunk_bytes=4096),
                            SECRET, open_model=LocalStores({URI: root})).start() for x in "ab"]
    yield daemons[0], daemons[1]
    for d in daemons:
        d.stop()


def _worker_token(*nodes: str, expires_at: float, model: str = URI) -> str:
    return mint_worker_token({n: node_admin_token(SECRET, n) for n in nodes}, subject="default/chat",
                             model_uri=model, expires_at=expires_at)


def _status(d: LoaderDaemon, token: str) -> requests.Response:
    return requests.get(d.url + "/v1/index", params={"model_uri": URI}, timeout=10,
                        headers={"Authorization": f"Bearer {token}"})


def test_an_expired_worker_token_is_refused_with_401_saying_so(two_nodes: tuple[LoaderDaemon, LoaderDaemon]) -> None:
    a, _ = two_nodes
    node = a.service.config.node_name
    assert _status(a, _worker_token(node, expires_at=time.time() + 60)).status_code == 200
    refused = _status(a, _worker_token(node, expires_at=time.time() - 1))
    assert refused.status_code == 401
    assert "expired" in refused.json()["error"]["message"]


def test_a_token_issued_for_node_a_is_refused_at_node_b(two_nodes: tuple[LoaderDaemon, LoaderDaemon]) -> None:
    a, b = two_nodes
    na, nb = a.service.config.node_name, b.service.config.node_name
    token = _worker_token(na, expires_at=time.time() + 60)
    assert _status(a, token).status_code == 200
    refused = _status(b, token)
    assert refused.status_code == 401 and f"not node {nb}" in refused.json()["error"]["message"]
    both = _worker_token(na, nb, expires_at=time.time() + 60)  # a token for both nodes: good at both
    assert _status(a, both).status_code == 200 and _status(b, both).status_code == 200
    # each node answers only its own admin token: A's is useless at B, the install's secret at both
    assert LoaderClient(a.url, a.token).status().node_name == na
    for d, token in ((b, a.token), (a, SECRET), (b, SECRET)):
        with pytest.raises(UnauthorizedError):
            LoaderClient(d.url, token).status()


def test_an_old_token_without_expiry_is_refused(two_nodes: tuple[LoaderDaemon, LoaderDaemon]) -> None:
    a, _ = two_nodes
    refused = _status(a, "hs1.eyJzdWIiOiJ4In0.abc")
    assert refused.status_code == 401 and "no expiry" in refused.json()["error"]["message"]


class _Recorder(http.server.ThreadingHTTPServer):
    """A real HTTP hop in front of a daemon that records every Authorization header it passes on."""

    def __init__(self, target: str) -> None:
        self.target, self.seen = target, []  # type: list[str]
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization", "")
                recorder.seen.append(auth)
                resp = requests.get(recorder.target + self.path, headers={"Authorization": auth} if auth else {},
                                    timeout=10)
                self.send_response(resp.status_code)
                self.send_header("Content-Type", resp.headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_a_peer_read_carries_a_peer_token_never_the_admin_token(two_nodes: tuple[LoaderDaemon, LoaderDaemon]) -> None:
    holder, asker = two_nodes
    lease = holder.service.attach(AttachRequest(model_uri=URI))
    deadline = time.monotonic() + 10
    while any(s.state == "filling" for s in holder.service.status().segments) and time.monotonic() < deadline:
        time.sleep(0.02)
    hop = _Recorder(holder.url)
    try:
        got = LoaderClient(asker.url, asker.token).attach(AttachRequest(model_uri=URI, peers=[hop.url]))
        deadline = time.monotonic() + 10
        while any(s.state == "filling" for s in asker.service.status().segments) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert asker.service.metrics.bytes_fetched.labels(source="peer")._value.get() == got.bytes_total > 0
        sent = [h for h in hop.seen if h]
        assert sent and all(h.startswith("Bearer hsp1.") for h in sent)
        for secret in (asker.token, holder.token, SECRET):
            assert not any(secret in h for h in hop.seen)
        peer_token = sent[0].removeprefix("Bearer ")
    finally:
        hop.shutdown()
        hop.server_close()
    # what the holder was sent reads ranges there only: nothing else, and nothing at another node
    with pytest.raises(ForbiddenError):
        LoaderClient(holder.url, peer_token).status()
    with pytest.raises(ForbiddenError):
        LoaderClient(holder.url, peer_token).index(URI)
    with pytest.raises(UnauthorizedError, match="not node"):
        LoaderClient(asker.url, peer_token).read_range(lease.model_key, "model.safetensors", 0, 8)
    keys = NodeKeys.derive(SECRET, asker.service.config.node_name)
    stale = mint_peer_token(keys, holder.service.config.node_name, time.time() - 3600)
    with pytest.raises(UnauthorizedError, match="expired"):
        LoaderClient(holder.url, stale).read_range(lease.model_key, "model.safetensors", 0, 8)


def test_a_long_lived_worker_keeps_access_across_token_renewal(two_nodes: tuple[LoaderDaemon, LoaderDaemon],
                                                                tmp_path: Path) -> None:
    """A pod's token sits in its mounted worker Secret; the interceptor rewrites it before it
    expires and the kubelet swaps the file (a rename): the worker's heartbeats carry on."""
    a, _ = two_nodes
    node = a.service.config.node_name
    token_file = tmp_path / "loaderd-token"

    def renew(token: str) -> None:  # as the kubelet updates a Secret volume: atomically
        tmp = tmp_path / "incoming"
        tmp.write_text(token)
        os.replace(tmp, token_file)

    first = _worker_token(node, expires_at=time.time() + 1.5)
    renew(first)
    worker = LoaderClient(a.url, TokenFile(token_file))
    lease = worker.attach(AttachRequest(model_uri=URI, heartbeat_s=30))
    assert worker.renew(lease.lease_id).released is False
    renew(_worker_token(node, expires_at=time.time() + 3600))
    time.sleep(max(0.0, int(time.time() + 1.5) + 1 - time.time()))  # the first token has expired
    with pytest.raises(UnauthorizedError, match="expired"):  # a worker that kept its first token is refused
        LoaderClient(a.url, first).renew(lease.lease_id)
    worker.renew(lease.lease_id)  # ours reads the renewed one
    assert worker.release(lease.lease_id).released
