"""The HTTP API over a real waitress server: auth, clear errors for bad requests, the typed
client, metrics. Bytes come from local files; test_e2e covers S3."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from hydraserve.auth import mint_worker_token, node_admin_token
from hydraserve.contracts.loader import AttachRequest, PrefetchRequest
from hydraserve.errors import ForbiddenError, InvalidRequestError, NotFoundError, UnreachableError
from hydraserve.loaderd.client import LoaderClient
from hydraserve.loaderd.daemon import LoaderDaemon
from hydraserve.loaderd.registry import node_segment_files
from hydraserve.loaderd.service import LoaderConfig
from hydraserve.runtime.loader_files import LoaderModelFiles
from hydraserve.weights.tensor_sources import tensor_source

from .conftest import LocalStores, llama_like, write_manifest, write_model

SECRET = "t" * 32  # the install's loaderd secret
NODE = f"api{uuid.uuid4().hex[:8]}"
TOKEN = node_admin_token(SECRET, NODE)  # the daemon's own (its node's admin token)
URI = "s3://bucket/model"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoaderDaemon]:
    node = NODE
    root = write_model(tmp_path_factory.mktemp("api") / "m", llama_like(layers=2))
    write_manifest(root, per_tensor=True)
    d = LoaderDaemon(LoaderConfig(node_name=node, budget_bytes=64 << 20, chunk_bytes=4096),
                     SECRET, open_model=LocalStores({URI: root})).start()
    d.root = root  # type: ignore[attr-defined]
    yield d
    d.stop()
    assert not node_segment_files("/dev/shm", node)


def _post(d: LoaderDaemon, path: str, body: object, token: str = TOKEN) -> requests.Response:
    return requests.post(d.url + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_token_required(daemon: LoaderDaemon) -> None:
    r = requests.get(daemon.url + "/v1/status", timeout=5)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = _post(daemon, "/v1/prefetch", {"model_uri": URI}, token="wrong" * 8)
    assert r.status_code == 401
    assert requests.get(daemon.url + "/healthz", timeout=5).ok  # probes need no token


@pytest.mark.parametrize(("body", "fragment"), [
    ("not json", "not valid JSON"),
    ({}, "model_uri"),
    ({"model_uri": URI, "bogus": 1}, "bogus"),
    ({"model_uri": URI, "tensors": ["a"], "stage": {"index": 0, "num_stages": 1, "layer_start": 0,
                                                    "layer_end": 2, "num_layers": 2}}, "not both"),
    ({"model_uri": URI, "stage": {"index": 3, "num_stages": 2, "layer_start": 0, "layer_end": 1,
                                  "num_layers": 2}}, "stage"),
    ({"model_uri": URI, "tensors": ["nope"]}, "unknown tensors"),
    ({"model_uri": URI, "pin_s": -1}, "pin_s"),
])
def test_bad_prefetch_bodies_get_400_with_a_reason(daemon: LoaderDaemon, body: object, fragment: str) -> None:
    if isinstance(body, str):
        r = requests.post(daemon.url + "/v1/prefetch", data=body, timeout=5,
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    else:
        r = _post(daemon, "/v1/prefetch", body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]


def test_client_round_trip_and_errors(daemon: LoaderDaemon) -> None:
    client = daemon.client()
    lease = client.prefetch(PrefetchRequest(model_uri=URI))
    assert lease.bytes_total > 0
    status = client.status()
    assert status.node_name == daemon.service.config.node_name and status.segments
    with pytest.raises(InvalidRequestError):
        client.attach(AttachRequest(model_uri=URI, tensors=["nope"]))
    assert client.release(lease.lease_id).released
    with pytest.raises(NotFoundError):
        client.release(lease.lease_id)
    with pytest.raises(NotFoundError):
        client.read_range(lease.model_key, "model.safetensors", 0, 8)
    r = requests.get(daemon.url + "/v1/range", params={"model_key": "k", "file": "f", "start": "x", "end": "1"},
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert r.status_code == 400
    metrics = requests.get(daemon.url + "/metrics", timeout=5).text
    assert "loaderd_fetched_bytes_total" in metrics and "loaderd_resident_bytes" in metrics


def test_runtime_reads_through_the_daemon(daemon: LoaderDaemon) -> None:
    from safetensors.torch import load_file

    files = LoaderModelFiles(URI, daemon.url, TOKEN)
    source = tensor_source(files, files.stage_tensor_names())
    try:
        assert getattr(source, "via", "") == "loaderd"
        expected = load_file(str(daemon.root / "model.safetensors"))  # type: ignore[attr-defined]
        assert sorted(source.tensor_names()) == sorted(expected)
        for name, want in expected.items():
            got = source.get(name)
            assert got.dtype == want.dtype and got.shape == want.shape and bool((got == want).all())
        segs = daemon.client().status().segments
        assert all(s.refcount >= 1 for s in segs)
        pinned = {s.segment_id for s in segs if s.refcount > 1}  # also pinned by earlier prefetches
    finally:
        source.close()
    assert all(s.refcount == 0 for s in daemon.client().status().segments
               if s.segment_id not in pinned)


def test_unreachable_daemon_is_reported_as_unavailable() -> None:
    client = LoaderClient("http://127.0.0.1:9", TOKEN, timeout_s=2)
    assert not client.healthy()
    with pytest.raises(UnreachableError, match="did not answer") as info:
        client.status()
    assert info.value.retryable


def test_the_index_lists_every_tensor_with_its_byte_range(daemon: LoaderDaemon) -> None:
    from hydraserve.weights.model_files import LocalModelFiles

    answer = daemon.client().index(URI)
    local = LocalModelFiles(daemon.root).tensor_index()  # type: ignore[attr-defined]
    assert {t.name: t for t in answer.tensors} == local
    assert answer.model_key == daemon.client().prefetch(PrefetchRequest(model_uri=URI)).model_key
    r = requests.get(daemon.url + "/v1/index", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model_uri"
    assert requests.get(daemon.url + "/v1/index", params={"model_uri": URI}, timeout=5).status_code == 401


# ---- doors: what a worker's scoped token may do, pids, S3 endpoints -------------------------

def _worker(subject: str = "fn-1/0", model_uri: str = URI) -> str:
    return mint_worker_token({NODE: TOKEN}, subject=subject, model_uri=model_uri, expires_at=time.time() + 600)


def test_a_worker_token_reads_its_own_model_and_releases_only_its_own_leases(daemon: LoaderDaemon) -> None:
    mine = LoaderClient(daemon.url, _worker())
    lease = mine.attach(AttachRequest(model_uri=URI, pid=os.getpid()))
    assert mine.index(URI).tensors  # its model: allowed
    other = LoaderClient(daemon.url, _worker("fn-2/0"))
    with pytest.raises(NotFoundError):  # another worker's lease is unknown to it
        other.release(lease.lease_id)
    assert mine.release(lease.lease_id).released


@pytest.mark.parametrize("call", ["other model", "prefetch", "status", "range"])
def test_a_worker_token_cannot_act_as_the_daemon(daemon: LoaderDaemon, call: str) -> None:
    worker = LoaderClient(daemon.url, _worker())
    with pytest.raises(ForbiddenError):
        if call == "other model":
            worker.index("s3://bucket/another")
        elif call == "prefetch":
            worker.prefetch(PrefetchRequest(model_uri=URI))
        elif call == "status":
            worker.status()
        else:
            worker.read_range("k", "f", 0, 1)


def test_a_forged_or_foreign_token_is_refused(daemon: LoaderDaemon) -> None:
    forged = mint_worker_token({NODE: "x" * 32}, subject="fn-1/0", model_uri=URI,  # signed with another secret
                               expires_at=time.time() + 600)
    tampered = _worker()[:-2] + ("AA" if not _worker().endswith("AA") else "BB")
    for token in (forged, tampered, "hs2.garbage", "hs1.garbage", ""):
        assert _post(daemon, "/v1/attach", {"model_uri": URI}, token).status_code == 401


def test_a_lease_cannot_be_tied_to_a_process_that_is_not_the_caller(daemon: LoaderDaemon) -> None:
    def refs() -> int:
        return sum(s.refcount for s in LoaderClient(daemon.url, TOKEN).status().segments)

    before = refs()
    for token in (TOKEN, _worker()):  # not even with the daemon's own token
        refused = _post(daemon, "/v1/attach", {"model_uri": URI, "pid": 1}, token)
        assert refused.status_code == 403 and refused.json()["error"]["param"] == "pid"
    assert refs() == before  # no lease taken


def test_an_s3_endpoint_the_daemon_was_not_configured_for_is_refused(daemon: LoaderDaemon) -> None:
    refused = _post(daemon, "/v1/prefetch", {"model_uri": URI, "endpoint_url": "http://169.254.169.254"})
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "endpoint_url"


def test_a_worker_token_cannot_make_the_daemon_call_out_or_pin_forever(daemon: LoaderDaemon) -> None:
    """A worker naming peers would make the daemon call out where it says. A lease
    without a pid never ends: a worker must tie its lease to itself."""
    peers = _post(daemon, "/v1/attach", {"model_uri": URI, "pid": os.getpid(), "peers": ["http://127.0.0.1:9"]},
                  _worker())
    assert peers.status_code == 403 and peers.json()["error"]["param"] == "peers"
    unpinned = _post(daemon, "/v1/attach", {"model_uri": URI}, _worker())
    assert unpinned.status_code == 403 and unpinned.json()["error"]["param"] == "pid"  # nor a heartbeat


def test_a_heartbeat_lease_lives_while_renewed_and_is_dropped_when_its_reader_stops(daemon: LoaderDaemon) -> None:
    """A worker in a pod (another PID namespace: its pid means nothing here) renews its lease."""
    import time

    def refs() -> int:
        return sum(s.refcount for s in LoaderClient(daemon.url, TOKEN).status().segments)

    before = refs()
    mine, other = LoaderClient(daemon.url, _worker()), LoaderClient(daemon.url, _worker("fn-2/0"))
    lease = mine.attach(AttachRequest(model_uri=URI, heartbeat_s=1))
    for _ in range(3):  # 1.8 s in all: it would have expired without the renewals
        time.sleep(0.6)
        mine.renew(lease.lease_id)
        assert refs() > before
    with pytest.raises(NotFoundError):
        other.renew(lease.lease_id)  # only its owner renews it
    time.sleep(1.3)  # the reader stopped renewing (it died)
    assert refs() == before
    with pytest.raises(NotFoundError):
        mine.renew(lease.lease_id)
    pinned = mine.attach(AttachRequest(model_uri=URI, pid=os.getpid()))
    with pytest.raises(NotFoundError):  # a pid-tied lease has no heartbeat
        mine.renew(pinned.lease_id)
    assert mine.release(pinned.lease_id).released


def test_a_pod_workers_files_keep_their_heartbeat_lease_until_closed(daemon: LoaderDaemon,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from hydraserve.runtime import loader_files

    def refs() -> int:
        return sum(s.refcount for s in LoaderClient(daemon.url, TOKEN).status().segments)

    monkeypatch.setattr(loader_files, "HEARTBEAT_S", 1.2)  # renewed every 0.4 s
    before = refs()
    files = LoaderModelFiles(URI, daemon.url, _worker(), heartbeat=True)
    source = tensor_source(files, ["model.norm.weight"])
    time.sleep(2.5)  # two heartbeats' worth: only the renewals keep it
    assert refs() == before + 1
    source.close()
    assert refs() == before
